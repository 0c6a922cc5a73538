"""experiments/train.py with a fault: SIGKILL right after the save of step $KILL_AFTER_SAVE_STEP has started (its
asynchronous write still in flight). tests/test_parallel.py resumes from what survives."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for experiments/

from concept_diffusion.checkpoint import StageCheckpoints  # noqa: E402
from experiments import train  # noqa: E402

STEP_ENV = "KILL_AFTER_SAVE_STEP"
_save = StageCheckpoints.save


def _save_then_kill(self, step, *args, **kwargs):
  out = _save(self, step, *args, **kwargs)
  if os.environ.get(STEP_ENV) == str(step):
    os.kill(os.getpid(), signal.SIGKILL)
  return out


if __name__ == "__main__":
  StageCheckpoints.save = _save_then_kill
  train.main()
