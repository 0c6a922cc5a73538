r"""Draws a trained run's figures into W/figures/ (PNG) and TensorBoard.

  encdiff-visualize --workdir=runs/quickstart [--step=S] [--num_images=8] [--attention_side=8]

Swap grid, per-token cross-attention maps, traversals, reconstructions (MSE, SSIM), samples, loss curves, the DCI
importance matrix and the metric history (the last two once encdiff-evaluate has run).
"""
import jax
from absl import flags, logging

from concept_diffusion import api, visualize
from concept_diffusion.tools import cli
from concept_diffusion.workdir import MetricWriter

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by encdiff-train.")
_STEP = flags.DEFINE_integer("step", None, "Diffusion checkpoint step (default: the latest).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Images per figure (default: config.sample.num_images).")
_SIDE = flags.DEFINE_integer("attention_side", None, "Query-grid side of the attention layers to average "
                             "(default: the finest).")
flags.mark_flags_as_required(["workdir"])


def _main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  run = api.load_run(_WORKDIR.value, _STEP.value)
  writer = MetricWriter(_WORKDIR.value)
  paths = visualize.write_run_figures(run.config, run.workdir, run.dataset, run.model, run.variables, run.ae_params,
                                      jax.random.PRNGKey(run.config.seed), step=run.step,
                                      num_images=_NUM_IMAGES.value, attention_side=_SIDE.value, writer=writer)
  writer.close()
  print("\n".join(paths))


def main():
  cli.run(_main)


if __name__ == "__main__":
  main()
