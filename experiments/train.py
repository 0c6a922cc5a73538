r"""Trains every stage the config lists (first stage, then concept diffusion) into --workdir.

  python experiments/train.py --config=configs/quickstart.py --workdir=runs/quickstart \
      [--config.train.batch_size=64]

Running the same command again resumes an unfinished stage and skips a finished one. On SIGTERM (or a TPU
preemption notice) the run saves at the next step and exits 0; run the command again to continue.
With config.baseline.kind set (configs/baseline_vae.py, configs/baseline_tcvae.py) it trains that VAE baseline
instead, with the same workdir layout, resume and evaluation.
Multi-host: run the same command on every host (see README "Running on Cloud TPU").
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from concept_diffusion import cli  # noqa: E402

cli.add_repo_root_to_path()

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from concept_diffusion import parallel  # noqa: E402
from concept_diffusion.train.loop import Preempted  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and figures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; progress goes to the bar instead
  config = _CONFIG.value
  # Before any other JAX call: multi-process start-up must precede backend initialisation.
  parallel.maybe_initialize_distributed(config.distributed)
  cli.enable_compilation_cache()  # a restart loads the compiled steps instead of compiling them again
  if config.baseline.kind:  # a VAE baseline (configs/baseline_*.py) instead of EncDiff
    from concept_diffusion.baselines.trainer import train_baseline as train  # pylint: disable=g-import-not-at-top
  else:
    from concept_diffusion.train.run import train  # pylint: disable=g-import-not-at-top
  try:
    train(config, _WORKDIR.value)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(0)


if __name__ == "__main__":
  cli.run(main)
