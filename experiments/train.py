r"""Trains every stage the config lists (first stage, then concept diffusion) into --workdir.

  python experiments/train.py --config=configs/quickstart.py --workdir=runs/quickstart \
      [--config.train.batch_size=64]

Running the same command again resumes an unfinished stage and skips a finished one.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from concept_diffusion import cli  # noqa: E402

cli.add_repo_root_to_path()

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from concept_diffusion.train.run import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and figures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; progress goes to the bar instead
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
