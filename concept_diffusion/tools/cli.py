"""Entry-point plumbing shared by the console scripts (experiments/): config names, one clear line for the
user's errors, the persistent compilation cache."""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, Sequence

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, KeyError, AttributeError)


def packaged_configs_dir() -> str | None:
  """The directory of the installed `configs` package (configs/*.py), or None."""
  spec = importlib.util.find_spec("configs")
  return os.path.dirname(spec.origin) if spec and spec.origin else None


def resolve_config_names(argv: Sequence[str]) -> list[str]:
  """`--config=quickstart` (a bare name, no such file here) -> `--config=<installed configs>/quickstart.py`, so the
  console scripts work from any directory; paths, and the `path:argument` form, pass through unchanged."""
  out, argv = [], list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith("--config=") or (i > 0 and argv[i - 1] == "--config"):
      prefix, value = ("--config=", arg[len("--config="):]) if arg.startswith("--config=") else ("", arg)
      name, sep, rest = value.partition(":")
      configs_dir = packaged_configs_dir()
      if name and os.sep not in name and not name.endswith(".py") and not os.path.exists(name) and configs_dir:
        candidate = os.path.join(configs_dir, f"{name}.py")
        if not os.path.exists(candidate):
          known = sorted(f[:-3] for f in os.listdir(configs_dir) if f.endswith(".py") and not f.startswith("_"))
          raise SystemExit(f"error: --config={name}: no such file and no packaged config of that name; "
                           f"packaged configs: {', '.join(known)}.")
        arg = f"{prefix}{candidate}{sep}{rest}"
    out.append(arg)
  return out


def run(main: Callable) -> None:
  """absl `app.run(main)`, but a config may be named (`--config=smoke`), and a bad flag, config override or input
  ends with `error: ...` and exit 2."""
  from absl import app  # pylint: disable=g-import-not-at-top
  sys.argv = resolve_config_names(sys.argv)
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
