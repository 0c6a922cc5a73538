"""VAE baselines: loss pieces on known inputs, the disentanglement_lib architecture, training, resume, evaluation."""
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion import data as data_lib
from concept_diffusion import parallel
from concept_diffusion.baselines import losses, trainer
from concept_diffusion.baselines.vae import GaussianVAE
from concept_diffusion.config import validate_config
from concept_diffusion.models.encdiff import build_model
from concept_diffusion.workdir import check_or_write_config
from configs import baseline_tcvae, baseline_vae, smoke
from experiments import aggregate


def _config(kind="beta_tcvae", num_steps=6):
  """Smoke-sized run of a baseline on the 60-image tiny_blocks dataset (tests/conftest.py), 16x16."""
  config = smoke.get_config()
  config.data.name = "tiny_blocks"
  bl = config.baseline
  bl.kind, bl.beta, bl.batch_size, bl.num_steps = kind, 6.0, 8, num_steps
  bl.log_every, bl.checkpoint_every = 3, 3
  bl.lr = 1e-3  # a few steps at disentanglement_lib's 1e-4 barely move the loss; the tests check the step, not lr
  config.eval.every = 0
  config.eval.final = False
  return config


def test_kl_of_the_prior_is_zero_and_of_a_shifted_mean_is_half_its_square():
  zeros = jnp.zeros((4, 10))
  assert float(losses.gaussian_kl(zeros, zeros)) == 0.0
  np.testing.assert_allclose(float(losses.gaussian_kl(jnp.full((4, 10), 2.0), zeros)), 10 * 0.5 * 4.0, rtol=1e-6)
  # Variance e: 0.5 * (e - 1 - 1) per latent.
  np.testing.assert_allclose(float(losses.gaussian_kl(zeros[:, :1], jnp.ones((4, 1)))), 0.5 * (math.e - 2), rtol=1e-6)


def _tc_brute_force(z, mean, log_var):
  """E_j[log sum_i prod_l q(z_jl|x_i) - sum_l log sum_i q(z_jl|x_i)], one density at a time."""
  b, d = z.shape
  out = []
  for j in range(b):
    q = np.array([[np.exp(-0.5 * ((z[j, l] - mean[i, l]) ** 2 / np.exp(log_var[i, l]) + log_var[i, l] +
                                  np.log(2 * np.pi))) for l in range(d)] for i in range(b)])  # [i, l]
    out.append(np.log(q.prod(axis=1).sum()) - np.log(q.sum(axis=0)).sum())
  return float(np.mean(out))


def test_total_correlation_matches_brute_force():
  rng = np.random.default_rng(0)
  mean, log_var = rng.normal(size=(6, 3)), rng.normal(scale=0.3, size=(6, 3))
  z = mean + np.exp(log_var / 2) * rng.normal(size=(6, 3))
  got = float(losses.total_correlation(jnp.asarray(z), jnp.asarray(mean), jnp.asarray(log_var)))
  np.testing.assert_allclose(got, _tc_brute_force(z, mean, log_var), rtol=1e-5)
  # Identical posteriors: log q(z) - sum_l log q(z_l) = log B - d log B (the dropped constant's complement).
  same = jnp.zeros((8, 5))
  np.testing.assert_allclose(float(losses.total_correlation(same, same, same)), -(5 - 1) * np.log(8), rtol=1e-6)


def test_bernoulli_reconstruction_and_regularizers():
  logits = jnp.array([[[[0.0, 2.0]]], [[[-1.0, 3.0]]]])  # (2, 1, 1, 2)
  targets = jnp.array([[[[1.0, 0.0]]], [[[0.5, 1.0]]]])
  p = 1 / (1 + np.exp(-np.asarray(logits)))
  expected = -(np.asarray(targets) * np.log(p) + (1 - np.asarray(targets)) * np.log(1 - p)).reshape(2, -1).sum(1)
  np.testing.assert_allclose(np.asarray(losses.bernoulli_reconstruction(targets, logits)), expected, rtol=1e-6)
  assert float(losses.regularizer("beta_vae", 4.0, 2.0, -3.0)) == 8.0
  assert float(losses.regularizer("beta_tcvae", 6.0, 2.0, -3.0)) == 2.0 + 5.0 * -3.0


def test_architecture_is_disentanglement_libs():
  model = GaussianVAE(latent_dim=10, image_size=64, channels=3)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
  shapes = {f"{m}/{l}/{k}": v.shape for m, layers in params.items() for l, p in layers.items() for k, v in p.items()}
  assert shapes["encoder/e3/kernel"] == (2, 2, 32, 64) and shapes["encoder/e5/kernel"] == (4 * 4 * 64, 256)
  assert shapes["decoder/d2/kernel"] == (256, 1024) and shapes["decoder/d6/kernel"] == (4, 4, 32, 3)
  # conv_encoder 310,228 + deconv_decoder 382,339 parameters at 64x64x3 with 10 latents.
  assert sum(int(np.prod(s)) for s in shapes.values()) == 310_228 + 382_339
  small = GaussianVAE(latent_dim=10, image_size=16, channels=3)
  variables = jax.jit(small.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  mean, log_var = small.apply(variables, jnp.zeros((2, 16, 16, 3)), method="encode")
  assert mean.shape == log_var.shape == (2, 10)
  assert small.apply(variables, mean, method="decode").shape == (2, 16, 16, 3)


def test_train_step_reduces_the_loss():
  config = _config()
  state = jax.jit(functools.partial(trainer.create_baseline_state, config))(jax.random.PRNGKey(0))
  step = trainer.make_train_step(config, parallel.make_mesh(config.mesh))
  images = jnp.asarray(data_lib.get_dataset(config.data).images(np.arange(0, 60, 4)))[:8]
  key = jax.random.PRNGKey(1)
  losses_seen = []
  for _ in range(15):
    state, metrics = step(state, images, key)
    losses_seen.append(float(metrics["loss"]))
  assert int(state.step) == 15 and all(np.isfinite(losses_seen))
  assert np.mean(losses_seen[-3:]) < 0.8 * np.mean(losses_seen[:3])


def test_resume_gives_the_same_parameters_and_the_run_is_evaluated(tmp_path):
  straight = trainer.train_baseline(_config(), str(tmp_path / "straight"))
  resumed_dir = str(tmp_path / "resumed")
  trainer.train_baseline(_config(num_steps=3), resumed_dir)
  config = _config()
  config.eval.final = True
  config.eval.metrics = ("factor_vae", "mig")
  resumed = trainer.train_baseline(config, resumed_dir)
  assert int(straight.step) == int(resumed.step) == 6
  for a, b in zip(jax.tree_util.tree_leaves(straight.params), jax.tree_util.tree_leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  dataset, values = aggregate.final_scores(resumed_dir)  # what experiments/aggregate.py reads
  assert dataset == "tiny_blocks" and 0.0 <= values["factor_vae.eval_accuracy"] <= 1.0
  assert np.load(os.path.join(resumed_dir, "eval", "codes_6.npy")).shape == (60, config.baseline.latent_dim)
  with open(os.path.join(resumed_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train_records = {r["step"]: r for r in records if r["stage"] == "baseline"}
  assert train_records[6]["images_seen"] == 6 * 8
  assert train_records[6]["wall_s"] > train_records[3]["wall_s"] > 0  # the clock continues across the resume
  (final,) = [r for r in records if r["stage"] == "eval"]
  assert final["step"] == 6 and final["wall_s"] == train_records[6]["wall_s"] and final["images_seen"] == 48
  again = trainer.train_baseline(config, resumed_dir)  # finished: nothing retrained or re-evaluated
  assert int(again.step) == 6
  with open(os.path.join(resumed_dir, "metrics.jsonl")) as f:
    assert len(f.readlines()) == len(records)


def test_configs_validate_and_old_workdirs_still_resume(tmp_path):
  for module in (baseline_vae, baseline_tcvae):
    validate_config(module.get_config())
  bad = _config()
  bad.baseline.kind = "beta-vae"
  with pytest.raises(ValueError, match="baseline.kind"):
    validate_config(bad)
  bad = _config()
  bad.unet.conditioning = "film"
  with pytest.raises(ValueError, match="unet.conditioning"):
    build_model(bad)
  # A config.json written before the baseline/conditioning fields existed describes the same (default) run.
  config = smoke.get_config()
  check_or_write_config(config, str(tmp_path))
  path = tmp_path / "config.json"
  saved = json.loads(path.read_text())
  del saved["baseline"], saved["unet"]["conditioning"]
  path.write_text(json.dumps(saved))
  check_or_write_config(config, str(tmp_path))
