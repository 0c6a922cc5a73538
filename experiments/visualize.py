r"""Draws a trained run's figures into W/figures/ (PNG) and TensorBoard.

  python experiments/visualize.py --workdir=runs/quickstart [--step=S] [--num_images=8] [--attention_side=8]

Swap grid, per-token cross-attention maps, traversals, reconstructions (MSE, SSIM), samples, loss curves, the DCI
importance matrix and the metric history (the last two once experiments/evaluate.py has run).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from concept_diffusion import cli  # noqa: E402

cli.add_repo_root_to_path()

from absl import flags, logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments/train.py.")
_STEP = flags.DEFINE_integer("step", None, "Diffusion checkpoint step (default: the latest).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Images per figure (default: config.sample.num_images).")
_SIDE = flags.DEFINE_integer("attention_side", None, "Query-grid side of the attention layers to average "
                             "(default: the finest).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  from concept_diffusion import visualize  # pylint: disable=g-import-not-at-top
  from concept_diffusion.train import run  # pylint: disable=g-import-not-at-top
  from concept_diffusion.train.workdir import load_config  # pylint: disable=g-import-not-at-top
  from concept_diffusion.train.writer import MetricWriter  # pylint: disable=g-import-not-at-top
  config = load_config(_WORKDIR.value)
  if config.baseline.kind:
    raise ValueError(f"{_WORKDIR.value} is a {config.baseline.kind} baseline run; visualize.py draws EncDiff's "
                     "figures (swaps, attention, traversals). Its loss curves are in figures/loss_curves.png.")
  state = run.restore_diffusion_state(config, _WORKDIR.value, _STEP.value)
  ae_params = run.restore_first_stage_params(config, _WORKDIR.value)
  writer = MetricWriter(_WORKDIR.value)
  paths = visualize.write_run_figures(config, _WORKDIR.value, run.load_dataset(config), state, ae_params,
                                      jax.random.PRNGKey(config.seed), num_images=_NUM_IMAGES.value,
                                      attention_side=_SIDE.value, writer=writer)
  writer.close()
  print("\n".join(paths))


if __name__ == "__main__":
  cli.run(main)
