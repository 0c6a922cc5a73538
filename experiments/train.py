r"""Trains every stage the config lists (first stage, then concept diffusion) into --workdir.

  python experiments/train.py --config=configs/quickstart.py --workdir=runs/quickstart \
      [--config.train.batch_size=64]

Running the same command again resumes an unfinished stage and skips a finished one.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs`

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from concept_diffusion.train.run import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and figures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    # One clear message instead of a traceback for the errors that are the user's to fix.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
