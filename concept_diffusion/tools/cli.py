"""Entry-point plumbing shared by the console scripts (experiments/): config names, one clear line for the
user's errors, the persistent compilation cache."""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
from typing import Callable, Sequence

from concept_diffusion import checkpoint, interrupts, workdir
from concept_diffusion import config as config_lib
from concept_diffusion.errors import UserError

# Errors that are the user's to fix: the project's own (a bad value, a missing file, a busy workdir, an unreadable
# checkpoint, a loss that went non-finite) and a filesystem that refuses a read or a write: one line, exit 2.
# Anything else is a bug and keeps its traceback. --verbose (or CONCEPT_DIFFUSION_VERBOSE=1) re-raises these too,
# for whoever extends the code.
USER_ERRORS = (UserError, OSError, workdir.WorkdirInUse, FloatingPointError)
# What ml_collections' config_flags raises for a --config.<field>=... override that names no field (KeyError,
# AttributeError with "Did you mean") or has a value of the wrong type (ValueError, TypeError): the user's too, but
# only while the flags are parsed; the same types raised later are bugs.
OVERRIDE_ERRORS = (KeyError, AttributeError, ValueError, TypeError)
VERBOSE_ENV = "CONCEPT_DIFFUSION_VERBOSE"


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
          raise UserError(f"--config={name}: no such file and no packaged config of that name; "
                           f"packaged configs: {', '.join(known)}.")
        arg = f"{prefix}{candidate}{sep}{rest}"
      elif name and not os.path.exists(name):
        raise UserError(f"--config={name}: no such file. Pass a config file (configs/*.py) or the name of a "
                         "packaged config (e.g. --config=quickstart).")
    out.append(arg)
  return out


def run(main: Callable) -> None:
  """absl `app.run(main)`, but a config may be named (`--config=smoke`), a bad flag, config override, input or file
  ends with `error: ...` and exit 2, and SIGINT/SIGTERM from the first line on end with one line (interrupts.py)."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  interrupts.install()
  if not _verbose_env() and "--verbose" not in sys.argv:
    _quiet_background_io_errors()
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, f"Full tracebacks instead of one-line errors (or {VERBOSE_ENV}=1).")
  try:
    sys.argv = resolve_config_names(sys.argv)
    import_extensions_named_in(sys.argv)
    app.run(main)
  except interrupts.Interrupted as e:
    print(str(e), file=sys.stderr)
    sys.exit(e.exit_code)
  except Exception as e:  # pylint: disable=broad-except
    parsing = not flags.FLAGS.is_parsed()
    if not (isinstance(e, USER_ERRORS) or (parsing and isinstance(e, OVERRIDE_ERRORS)) or _disk_full(e)):
      raise
    if _verbose_env() or (not parsing and flags.FLAGS.verbose) or "--verbose" in sys.argv:
      raise
    print(f"error: {error_line(e, parsing)}", file=sys.stderr)
    sys.exit(2)


def _disk_full(e: BaseException) -> bool:
  """TensorStore (Orbax's arrays) reports a full disk as a ValueError, not an OSError."""
  return isinstance(e, ValueError) and ("No space left on device" in str(e) or "os_error_code='28'" in str(e))


def import_extensions_named_in(argv: Sequence[str]) -> None:
  """Imports the modules of `--config.extensions=...` before the flags are parsed: what they register adds its
  fields to the schema (config.add_extension_fields), and `--config.encoder.<name>.<field>=...` overrides need
  those fields to exist when config_flags applies them."""
  for i, arg in enumerate(argv):
    value = arg[len("--config.extensions="):] if arg.startswith("--config.extensions=") else (
        argv[i + 1] if arg == "--config.extensions" and i + 1 < len(argv) else None)
    if value is None:
      continue
    try:
      names = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      names = value  # a bare module name
    config_lib.import_modules((names,) if isinstance(names, str) else tuple(names))


def _verbose_env() -> bool:
  return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _quiet_background_io_errors() -> None:
  """Keeps a failed checkpoint write (a full disk, a lost mount) to the one line `run` prints.

  Orbax writes in background threads: when a write fails, each thread logs the error with its traceback at ERROR
  level, and TensorStore's late callbacks meet a closed event loop (checkpoint.quiet_closed_event_loop_errors).
  The error itself is raised in the main thread at the next save or at the end, and `run` prints it. --verbose
  keeps all of it.
  """
  import logging  # pylint: disable=g-import-not-at-top

  class DropOrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
      return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)

  logging.getLogger().addFilter(DropOrbaxErrors())
  for handler in logging.getLogger().handlers:
    handler.addFilter(DropOrbaxErrors())
  logging.getLogger("absl").addFilter(DropOrbaxErrors())
  checkpoint.quiet_closed_event_loop_errors()


def error_line(e: BaseException, parsing_flags: bool = False) -> str:
  """One line for the user: the message, and for a failed file operation the path and the cause."""
  if isinstance(e, OSError) and e.strerror and not isinstance(e, FileNotFoundError):
    where = f": {e.filename}" if e.filename else ""
    return (f"{e.strerror}{where}. Use a --workdir (or data directory) this process can write, or free the space, "
            "and run the same command again; nothing finished was lost.")
  message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
  if "No space left on device" in message or "os_error_code='28'" in message:  # TensorStore's ENOSPC
    message = (f"{message.split(' [tensorstore_spec=')[0]}. The disk is full: free space (or use another --workdir) "
               "and run the same command again; the last finished checkpoint is intact (Orbax renames a save into "
               "place only when it is complete)")
  if parsing_flags and isinstance(e, (KeyError, AttributeError)):
    # config_flags's message is the missing key ("'hidden'") and maybe a 'Did you mean "..." instead of "..."?'.
    key = re.search(r"'(\w+)", message)
    key = key.group(1) if key else message
    hint = re.search(r"Did you mean [^?]*\?", message)
    overrides = [a[2:].split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")]
    field = next((o[len("config."):] for o in overrides if key in o.split(".")), key)
    message = (f"unknown config field {field}{'. ' + hint.group(0) if hint else ''} (an extension's own fields "
               "exist once its module is in --config.extensions; the schema is concept_diffusion/config.py)")
  return message or type(e).__name__


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
