"""beta-TCVAE baseline (disentanglement_lib's unsupervised study) on the procedural Shapes of configs/repro_cpu.py.

  python experiments/train.py --config=configs/baseline_tcvae.py --workdir=runs/beta_tcvae_seed0 --config.seed=0

Everything as configs/baseline_vae.py except the regularizer: KL + (beta - 1) * TC, with TC estimated on each
batch by minibatch-weighted sampling (disentanglement_lib's `total_correlation`).
"""
import ml_collections

from configs import baseline_vae


def get_config() -> ml_collections.ConfigDict:
  config = baseline_vae.get_config()
  config.name = "baseline_beta_tcvae"
  config.baseline.kind = "beta_tcvae"
  # disentanglement_lib sweeps 1, 2, 4, 6, 8, 10; 6 is what Chen et al. (2018) used for their beta-TCVAE runs.
  config.baseline.beta = 6.0
  return config
