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


# XLA's compiled programs are kept here between processes, so a restart (resume, evaluate, a second benchmark run)
# loads the train step in about a second instead of compiling it for a minute. JAX's own environment variables
# override it: JAX_COMPILATION_CACHE_DIR=<dir> to move it, JAX_ENABLE_COMPILATION_CACHE=false to switch it off,
# JAX_COMPILATION_CACHE_MAX_SIZE=<bytes> to bound it (default here 4 GiB, least recently used entries go first).
DEFAULT_COMPILATION_CACHE = os.path.join("~", ".cache", "concept_diffusion", "jax_compilation_cache")


def enable_compilation_cache(path: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache (`path`, else JAX_COMPILATION_CACHE_DIR, else the default).

  Returns the directory in use, or None when JAX_ENABLE_COMPILATION_CACHE switches the cache off.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_enable_compilation_cache:
    return None
  path = path or jax.config.jax_compilation_cache_dir or DEFAULT_COMPILATION_CACHE
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  if jax.config.jax_compilation_cache_max_size == -1:  # JAX's default is unbounded; drop least recently used
    jax.config.update("jax_compilation_cache_max_size", 4 * 2 ** 30)
  return path
