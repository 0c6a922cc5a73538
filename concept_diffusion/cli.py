"""Shared entry-point plumbing for the experiments/ scripts: one clear line for the user's errors."""
from __future__ import annotations

import os
import sys
from typing import Callable

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, KeyError, AttributeError)


def add_repo_root_to_path() -> None:
  """configs/*.py import `concept_diffusion` and sibling configs; make both importable from any cwd."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for path in (root, os.getcwd()):
    if path not in sys.path:
      sys.path.insert(0, path)


def run(main: Callable) -> None:
  """absl `app.run(main)`, but a bad flag, config override or input ends with `error: ...` and exit 2."""
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    app.run(main)
  except USER_ERRORS as e:
    message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    if isinstance(e, AttributeError) and "Did you mean" in message:
      message = f"unknown config field {message}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
