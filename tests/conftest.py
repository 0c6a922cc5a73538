"""Shared test set-up: the repo root on sys.path (for `configs`), CPU only, one compilation cache for the suite."""
import atexit
import os
import pathlib
import shutil
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The repo root (for `configs`) and this folder (for `tiny_blocks`, also when a subprocess imports tests.conftest).
for _path in (REPO_ROOT, REPO_ROOT / "tests"):
  if str(_path) not in sys.path:
    sys.path.insert(0, str(_path))

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The trainer pins JAX's non-partitionable threefry for its runs (train/trainer.py: XLA:CPU compiles parameter
# initialisation ~8x faster); tests that initialise models outside train() and their subprocesses do the same.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
# One persistent compilation cache for the whole run, made by the first process (the xdist controller, before it
# starts the workers, which inherit it) and removed when that process ends: a test that builds a model the suite
# already compiled (a re-train in the same process, a console script in a subprocess) loads the executable instead
# of compiling it again. Tests of the cache itself pass their own directory.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _suite_cache = tempfile.mkdtemp(prefix="concept-diffusion-test-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _suite_cache
  atexit.register(shutil.rmtree, _suite_cache, ignore_errors=True)


import pytest  # noqa: E402

from tiny_blocks import TinyBlocks  # noqa: E402,F401  (registers the "tiny_blocks" dataset; tests import it from here)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A persistent JAX compilation cache shared by a module's subprocesses (same config: one compile)."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def subprocess_env(cache_dir: str, devices: int, **extra: str) -> dict:
  """Environment for a JAX subprocess on `devices` fake CPU devices using the compilation cache `cache_dir`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.update(extra)
  return env
