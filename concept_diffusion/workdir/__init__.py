"""Every file of a run: the workdir layout, config.json, metrics.jsonl + TensorBoard, the evaluation files.

  W/config.json            the run's full config (what evaluate/visualize/load_run read)
  W/autoencoder/<step>/    first-stage checkpoints (Orbax)      W/diffusion/<step>/  diffusion-stage checkpoints
  W/baseline/<step>/       a VAE baseline's checkpoints         W/metrics.jsonl      one JSON record per log point
  W/tensorboard/           event files                          W/figures/*.png      figures
  W/eval/metrics_<step>.json, W/eval/codes_<step>.npy           an evaluation's scores and the code table behind them
  W/lock.json              while a training runs: its host, pid and start time (one training per workdir)

W may be a local path or a URL of a remote filesystem (gs://bucket/run; any scheme etils.epath knows). Every file
of a run is read and written through `etils.epath` (Orbax too: it is given the URL unchanged), so a remote workdir
lands in the bucket and never on local disk; only temporary files of the process go to the local temporary
directory (tempfile.gettempdir(), i.e. $TMPDIR). What differs on remote storage, and why:
  * Replacing a file (atomic_path): locally a temporary name beside the file, renamed onto it. Remotely the file is
    written locally and uploaded to its final name: an object store publishes an object only once its upload is
    complete, whole, replacing the previous one in one step (GCS: a simple or resumable upload, which gcsfs
    finalises on close), which is what the rename gives locally; GCS has no rename (gcsfs's mv is a copy + delete:
    twice the bytes, and a moment with both or neither).
  * Appending (metrics.jsonl): object stores cannot append, and gcsfs silently opens mode "a" as "w" (it would
    truncate the file). A remote metrics.jsonl is read, extended and written whole at each log point.
  * The lock (lock.json): O_EXCL does not exist remotely; see workdir_lock for what is done instead and its race.
  * TensorBoard: tensorboardX's event files go through epath too (see _EpathEventFile).
  * Arrays read with a memory map (the code table) are read whole from a remote file (load_npy).
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Iterator, Mapping

from etils import epath
import ml_collections
import numpy as np

from concept_diffusion import config as config_lib
from concept_diffusion.errors import UserError

AE_DIR, DIFFUSION_DIR, BASELINE_DIR = "autoencoder", "diffusion", "baseline"
FIGURES_DIR, EVAL_DIR, TENSORBOARD_DIR = "figures", "eval", "tensorboard"
CONFIG_FILE, METRICS_FILE, LOCK_FILE = "config.json", "metrics.jsonl", "lock.json"

# An evaluation at step S writes W/eval/metrics_S.json (its scores) and W/eval/codes_S.npy (the code table they
# were computed from); every reader and writer of those names goes through these two functions.
EVAL_FILE_SUFFIXES = {"metrics": ".json", "codes": ".npy"}


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (gs://bucket/run, s3://...) rather than a local path."""
  return bool(_URL.match(os.fspath(path)))


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute, a URL unchanged (os.path.abspath would turn gs://b/x into <cwd>/gs:/b/x)."""
  return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str | os.PathLike) -> bool:
  return epath.Path(path).exists()


def read_text(path: str | os.PathLike) -> str:
  return epath.Path(path).read_text(encoding="utf-8")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """A temporary local file name to write `path`'s content to; moved onto `path` when the block ends without an
  error, removed otherwise. A reader never sees a half-written file, and an interrupted write leaves the previous
  one intact.

  Local `path`: the temporary name is beside it (a rename is atomic only within one filesystem), keeps the
  extension (savefig and np.save pick the format from it), and its folders are created. Remote `path` (a URL):
  the temporary file is in the local temporary directory and is uploaded to `path` itself, with no temporary
  object: the upload is already all-or-nothing (see the module docstring), and a remote rename is not.
  """
  path = os.fspath(path)
  if is_remote(path):
    root, ext = os.path.splitext(path.rsplit("/", 1)[-1])
    fd, tmp = tempfile.mkstemp(prefix=f".{root}.tmp-", suffix=ext)
    os.close(fd)
    try:
      yield tmp
      with open(tmp, "rb") as src, epath.Path(path).open("wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    return
  directory, name = os.path.split(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  root, ext = os.path.splitext(name)
  tmp = os.path.join(directory, f".{root}.tmp-{os.getpid()}{ext}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[str]:
  """A local file name holding `path`'s content for the block: `path` itself when local, else a temporary download
  (for readers that need a file name: np.load with a memory map, safetensors, torch.load)."""
  path = os.fspath(path)
  if not is_remote(path):
    yield path
    return
  fd, tmp = tempfile.mkstemp(prefix=".download-", suffix=os.path.splitext(path)[1])
  try:
    with os.fdopen(fd, "wb") as dst, epath.Path(path).open("rb") as src:
      shutil.copyfileobj(src, dst, 16 << 20)
    yield tmp
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def load_npy(path: str | os.PathLike, mmap_mode: str | None = None) -> np.ndarray:
  """np.load of a .npy file; a remote one is read whole into memory (a memory map needs a local file)."""
  if not is_remote(path):
    return np.load(path, mmap_mode=mmap_mode)
  with epath.Path(path).open("rb") as f:
    return np.load(io.BytesIO(f.read()))


def write_json(path: str, value: Any, **dump_kwargs) -> None:
  """`value` as JSON at `path`, atomically (see atomic_path)."""
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, **dump_kwargs)
    f.write("\n")


def eval_path(workdir: str, kind: str, step: int) -> str:
  """W/eval/metrics_<step>.json (kind "metrics") or W/eval/codes_<step>.npy (kind "codes")."""
  return os.path.join(workdir, EVAL_DIR, f"{kind}_{int(step)}{EVAL_FILE_SUFFIXES[kind]}")


def eval_steps(workdir: str, kind: str) -> list[int]:
  """Steps with an evaluation file of this kind in W/eval, ascending."""
  eval_dir = epath.Path(workdir) / EVAL_DIR
  names = [p.name for p in eval_dir.iterdir()] if eval_dir.is_dir() else []
  pattern = re.compile(rf"{kind}_(\d+){re.escape(EVAL_FILE_SUFFIXES[kind])}")
  return sorted(int(m.group(1)) for m in map(pattern.fullmatch, names) if m)


def eval_history(workdir: str) -> list[dict]:
  """Every W/eval/metrics_<step>.json record, by step."""
  records = []
  for step in eval_steps(workdir, "metrics"):
    records.append(json.loads(read_text(eval_path(workdir, "metrics", step))))
  return records


def token_factor_matrix(record: dict[str, Any] | None) -> tuple[np.ndarray | None, str]:
  """(num_tokens, num_factors) how much each token's scalar says about each factor, and its source: DCI's
  importance matrix when the record has one (the boosted trees see all codes at once), else MIG's mutual
  information over the factor's entropy; (None, "") when the record has neither."""
  for key, source in (("dci.importance_matrix", "DCI importance"), ("mig.normalized_mutual_info", "MIG's I/H")):
    if record and key in record:
      return np.asarray(record[key], np.float64), source
  return None, ""


def figure_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, FIGURES_DIR, name)


def first_stage_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the first stage lives: this workdir, or first_stage.checkpoint when this run does not train it."""
  source = workdir if "first_stage" in config.stages else (config.first_stage.checkpoint or workdir)
  return os.path.join(source, AE_DIR)


class WorkdirInUse(RuntimeError):
  """Another live process holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def ensure_workdir(workdir: str) -> None:
  """Creates the workdir, with one clear error when the path is taken by a file."""
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f"--workdir {workdir} is a file, not a directory: pass a directory (a new one starts a "
                             "new run).")
  path.mkdir(parents=True, exist_ok=True)  # remote: a no-op but for a missing bucket (an object store has no folders)


@contextlib.contextmanager
def workdir_lock(workdir: str, enabled: bool = True) -> Iterator[None]:
  """Holds W/lock.json ({host, pid, started}) for the block: a second training on the workdir stops at once, naming
  the holder. A lock left by a dead process on this host is taken over with a warning. On a shared filesystem only
  process 0 takes it (`enabled`), so the hosts of one pod run do not lock each other out.

  A remote workdir (gs://...) has no O_EXCL create: GCS would do it with an `ifGenerationMatch=0` precondition, but
  neither etils.epath nor gcsfs expose one. There the lock is taken by looking for an existing lock.json (refused or
  taken over as above), writing ours, and reading it back after a moment (another writer's lock.json replacing ours
  means it won: this run stops). What remains is a race: two trainings that both find no lock, and whose writes and
  read-backs interleave within that moment (about a second), can both go on. It guards against the common mistake
  (a second command on a workdir in use, minutes or days later), not against two starts in the same second.
  """
  if not enabled:
    yield
    return
  ensure_workdir(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  mine = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  if is_remote(path):
    with _remote_lock(workdir, path, mine):
      yield
    return
  while True:
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        with open(path, encoding="utf-8") as f:
          holder = json.load(f)
      except (OSError, ValueError):  # being written this instant, or damaged: treat as held by an unknown process
        holder = {}
      if _left_by_dead_process(holder, mine, path):
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
        continue
      raise _in_use(workdir, path, holder) from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(mine, f)
    break
  try:
    yield
  finally:
    with contextlib.suppress(OSError, ValueError):
      with open(path, encoding="utf-8") as f:
        still_mine = json.load(f) == mine
      if still_mine:
        os.remove(path)


def _left_by_dead_process(holder: dict, mine: dict, path: str) -> bool:
  """Whether the lock `holder` is a process of this host that is gone (warns that it is taken over)."""
  if holder.get("host") == mine["host"] and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
    print(f"warning: {path} was left by process {holder['pid']} (started {holder.get('started', '?')}), which "
          "is gone; taking the workdir over.", file=sys.stderr)
    return True
  return False


def _in_use(workdir: str, path: str, holder: dict) -> WorkdirInUse:
  who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
         if holder else "an unknown process")
  return WorkdirInUse(f"{workdir} is in use by {who} (its lock: {path}). Wait for that run to finish or stop it, "
                      "or use another --workdir. If that process is gone (e.g. its machine crashed), delete "
                      f"{path}.")


def _read_lock(path: epath.Path) -> dict | None:
  """The holder recorded in a lock file; None when there is none, {} when it cannot be read."""
  try:
    holder = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    return None
  except (OSError, ValueError):  # damaged: held by an unknown process
    return {}
  return holder if isinstance(holder, dict) else {}


REMOTE_LOCK_SETTLE_S = 1.0  # how long a remote lock is left before it is read back (see workdir_lock)


@contextlib.contextmanager
def _remote_lock(workdir: str, path_str: str, mine: dict) -> Iterator[None]:
  """workdir_lock on a remote filesystem: check, write, read back (see workdir_lock for the race that remains)."""
  path = epath.Path(path_str)
  holder = _read_lock(path)
  if holder is not None and not _left_by_dead_process(holder, mine, path_str):
    raise _in_use(workdir, path_str, holder)
  path.write_text(json.dumps(mine), encoding="utf-8")
  time.sleep(REMOTE_LOCK_SETTLE_S)
  holder = _read_lock(path)
  if holder != mine:
    raise _in_use(workdir, path_str, holder or {})
  try:
    yield
  finally:
    with contextlib.suppress(OSError, ValueError):
      if _read_lock(path) == mine:
        path.unlink()


def check_or_write_config(config: ml_collections.ConfigDict, workdir: str, write: bool = True) -> None:
  """Refuses a workdir whose config.json describes a different run; writes config.json otherwise."""
  ensure_workdir(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  if exists(path):
    saved = _read_config_json(path)
    diffs = config_lib.differing_fields(config, saved)
    if diffs:
      lines = "\n".join(f"  {k}: workdir has {old!r}, this run has {new!r}" for k, old, new in diffs[:20])
      raise UserError(
          f"The workdir {workdir} holds a run with a different config:\n{lines}\n"
          "Use a new --workdir, or pass the workdir's values (see its config.json) to resume it.")
  if write:
    write_json(path, config_lib.config_to_dict(config), indent=2, sort_keys=True)


def _read_config_json(path: str) -> dict[str, Any]:
  def invalid(reason: str) -> UserError:
    return UserError(f"{path} is not a valid run config ({reason}). Restore it from a copy, or write it again: run "
                     "encdiff-train with the run's --config on this --workdir.")
  try:
    saved = json.loads(read_text(path))
  except ValueError as e:
    raise invalid(f"{type(e).__name__}: {e}") from None
  if not isinstance(saved, dict):
    raise invalid(f"a JSON {type(saved).__name__}, not an object")
  # Its extensions add fields to the schema: one that cannot be imported is named as such, not as a bad file.
  config_lib.import_modules(saved.get("extensions", ()))
  try:
    config_lib.config_from_dict(saved)  # every field it names must be in the schema
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise invalid(f"{type(e).__name__}: {e}") from None
  return saved


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config from its config.json (for evaluate/visualize/load_run, which take only the workdir); imports
  the extensions it names, so their registered models can be built."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a workdir written by encdiff-train?")
  return config_lib.config_from_dict(_read_config_json(path))


class MetricWriter:
  """Appends one JSON line per logged step to W/metrics.jsonl and mirrors scalars/images to TensorBoard
  (tensorboardX: event files without TensorFlow). Only process 0 writes, so multi-host runs log once."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._workdir = workdir
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      logdir = os.path.join(workdir, TENSORBOARD_DIR)
      if is_remote(logdir):
        _register_epath_event_files(logdir)
      self._tb = SummaryWriter(logdir)

  def scalars(self, step: int, values: Mapping[str, float], stage: str) -> None:
    if not self.enabled:
      return
    record = {"stage": stage, "step": int(step), **{k: float(v) for k, v in values.items()}}
    line = json.dumps(record) + "\n"
    path = os.path.join(self._workdir, METRICS_FILE)
    if is_remote(path):
      # No append on an object store (see the module docstring): read, extend, write whole. A record appended by
      # another process between the read and the write is lost (visualize and training are the only writers, and
      # only process 0 of a training writes); the cost is the file's size per log point, ~300 bytes a record.
      remote = epath.Path(path)
      previous = remote.read_text(encoding="utf-8") if remote.exists() else ""
      remote.write_text(previous + line, encoding="utf-8")
    else:
      with open(path, "a", encoding="utf-8") as f:
        f.write(line)
    for key, value in values.items():
      self._tb.add_scalar(f"{stage}/{key}", float(value), int(step))

  def progress(self, stage: str, step: int) -> dict[str, float]:
    """{"wall_s", "images_seen"} of `stage`'s training record at `step` ({} if there is none).

    The loop logs at every checkpoint and hook step, so an evaluation at `step` can carry how long the stage had
    trained and on how many images; a resumed run continues its clock from here. Step 0 (an untrained model) is
    zero on both, so its evaluation sits at the origin of the metric-vs-time curves.
    """
    found = {"wall_s": 0.0, "images_seen": 0} if step == 0 else {}
    for record in read_metrics(self._workdir):  # the last record wins: a resume may re-log a step
      if record.get("stage") == stage and record.get("step") == step and "wall_s" in record:
        found = {k: record[k] for k in ("wall_s", "images_seen") if k in record}
    return found

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """image: (H, W, 3) uint8."""
    if self.enabled:
      self._tb.add_image(tag, image, int(step), dataformats="HWC")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _EpathEventFile:
  """A tensorboardX event file on a remote filesystem, written through etils.epath.

  tensorboardX appends records to the file and flushes it (every flush_secs=120 s and at close). An object store
  cannot append, so the records are kept in memory and each flush that has new ones writes the object whole (each
  upload all-or-nothing: TensorBoard reads the previous or the new version). To bound memory and the bytes written
  per flush, the records go on in a new object, `<name>.<n>` (TensorBoard reads every file of the folder with
  "tfevents" in its name), once one holds ROTATE_BYTES. tensorboardX's own gs:// writer does the same rewrite but
  through google-cloud-storage with its own credentials and endpoint; this one uses whatever epath uses.
  """
  ROTATE_BYTES = 32 << 20

  def __init__(self, path: str):
    self._base, self._part, self._buffer, self._dirty = path, 0, io.BytesIO(), False
    self._lock = threading.Lock()

  def _path(self) -> epath.Path:
    return epath.Path(self._base if self._part == 0 else f"{self._base}.{self._part}")

  def write(self, data: bytes) -> None:
    with self._lock:
      self._buffer.write(data)
      self._dirty = True

  def flush(self) -> None:
    with self._lock:
      if not self._dirty:
        return
      self._path().write_bytes(self._buffer.getvalue())
      self._dirty = False
      if self._buffer.tell() >= self.ROTATE_BYTES:  # flushes come between whole records
        self._part, self._buffer = self._part + 1, io.BytesIO()

  def close(self) -> None:
    self.flush()


class _EpathEventFiles:
  """tensorboardX's writer-factory interface (record_writer.register_writer_factory) over _EpathEventFile."""

  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # an object store has no folders to create


def _register_epath_event_files(logdir: str) -> None:
  """Routes tensorboardX's event files under `logdir`'s URL scheme (gs, s3, ...) through _EpathEventFile."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  record_writer.register_writer_factory(logdir.split(":", 1)[0], _EpathEventFiles())


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
