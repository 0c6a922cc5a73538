"""Reading and writing a run's files, on a local disk or a remote filesystem (gs://bucket/run; any scheme etils.epath
knows): one class for each, chosen by the path (`storage_for`).

Every file of a run is read and written through `etils.epath` (Orbax too: it is given the URL unchanged), so a
remote workdir lands in the bucket and never on local disk; only temporary files of the process go to the local
temporary directory (tempfile.gettempdir(), i.e. $TMPDIR). What differs on remote storage, and why:
  * Replacing a file (atomic_path): locally a temporary name beside the file, renamed onto it. Remotely the file is
    written locally and uploaded to its final name: an object store publishes an object only once its upload is
    complete, whole, replacing the previous one in one step (GCS: a simple or resumable upload, which gcsfs
    finalises on close), which is what the rename gives locally; GCS has no rename (gcsfs's mv is a copy + delete:
    twice the bytes, and a moment with both or neither).
  * Appending (metrics.jsonl): object stores cannot append, and gcsfs silently opens mode "a" as "w" (it would
    truncate the file). A remote file is read, extended and written whole.
  * Creating a file only if it does not exist (the workdir lock): O_EXCL does not exist remotely; see
    RemoteStorage.create_exclusive for what is done instead and its race.
  * Arrays read with a memory map (the code table) are read whole from a remote file (load_npy).
  * TensorBoard's event files go through epath too (_EpathEventFile).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Any, Iterator

from etils import epath
import numpy as np

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (gs://bucket/run, s3://...) rather than a local path."""
  return bool(_URL.match(os.fspath(path)))


class LocalStorage:
  """Files on a local (or mounted) filesystem: renames are atomic, appends and O_EXCL work."""

  def absolute(self, path: str) -> str:
    return os.path.abspath(path)

  @contextlib.contextmanager
  def atomic_path(self, path: str) -> Iterator[str]:
    """A temporary name beside `path` (a rename is atomic only within one filesystem) that keeps its extension
    (savefig and np.save pick the format from it), renamed onto `path`; its folders are created."""
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
  def local_copy(self, path: str) -> Iterator[str]:
    yield path

  def load_npy(self, path: str, mmap_mode: str | None = None) -> np.ndarray:
    return np.load(path, mmap_mode=mmap_mode)

  def append_text(self, path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
      f.write(text)

  def route_event_files(self, logdir: str) -> None:
    del logdir  # tensorboardX appends to local files itself

  def create_exclusive(self, path: str, text: str) -> bool:
    """Writes `text` to `path` if no file is there (O_EXCL: one of two racing creators wins); False if one is."""
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    return True


class RemoteStorage:
  """Objects in a bucket through etils.epath: no rename, no append, no O_EXCL (the module docstring says why each
  operation is done as it is)."""
  # How long a file made by create_exclusive is left before it is read back.
  SETTLE_S = 1.0

  def absolute(self, path: str) -> str:
    return path  # os.path.abspath would turn gs://b/x into <cwd>/gs:/b/x

  @contextlib.contextmanager
  def atomic_path(self, path: str) -> Iterator[str]:
    """A file in the local temporary directory, uploaded to `path` itself with no temporary object: the upload is
    already all-or-nothing, and a remote rename is not."""
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

  @contextlib.contextmanager
  def local_copy(self, path: str) -> Iterator[str]:
    fd, tmp = tempfile.mkstemp(prefix=".download-", suffix=os.path.splitext(path)[1])
    try:
      with os.fdopen(fd, "wb") as dst, epath.Path(path).open("rb") as src:
        shutil.copyfileobj(src, dst, 16 << 20)
      yield tmp
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)

  def load_npy(self, path: str, mmap_mode: str | None = None) -> np.ndarray:
    del mmap_mode  # a memory map needs a local file
    with epath.Path(path).open("rb") as f:
      return np.load(io.BytesIO(f.read()))

  def append_text(self, path: str, text: str) -> None:
    # A record appended by another process between the read and the write is lost (for metrics.jsonl: visualize
    # and training are the only writers, and only process 0 of a training writes); the cost is the file's size
    # per append, ~300 bytes a metrics record.
    remote = epath.Path(path)
    previous = remote.read_text(encoding="utf-8") if remote.exists() else ""
    remote.write_text(previous + text, encoding="utf-8")

  def route_event_files(self, logdir: str) -> None:
    """Routes tensorboardX's event files under `logdir`'s URL scheme (gs, s3, ...) through _EpathEventFile."""
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
    record_writer.register_writer_factory(logdir.split(":", 1)[0], _EpathEventFiles())

  def create_exclusive(self, path: str, text: str) -> bool:
    """Looks for `path`, writes `text` when there is none, and reads it back after SETTLE_S: another writer's
    content there means it won (False). GCS would do this in one step with an `ifGenerationMatch=0` precondition,
    but neither etils.epath nor gcsfs expose one. What remains is a race: two creators that both find no file,
    and whose writes and read-backs interleave within SETTLE_S, can both see their own content."""
    remote = epath.Path(path)
    if remote.exists():
      return False
    remote.write_text(text, encoding="utf-8")
    time.sleep(self.SETTLE_S)
    try:
      return remote.read_text(encoding="utf-8") == text
    except FileNotFoundError:
      return False


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


def storage_for(path: str | os.PathLike) -> LocalStorage | RemoteStorage:
  return RemoteStorage() if is_remote(path) else LocalStorage()


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute, a URL unchanged."""
  return storage_for(path).absolute(os.fspath(path))


def exists(path: str | os.PathLike) -> bool:
  return epath.Path(path).exists()


def read_text(path: str | os.PathLike) -> str:
  return epath.Path(path).read_text(encoding="utf-8")


def atomic_path(path: str | os.PathLike) -> contextlib.AbstractContextManager[str]:
  """A temporary local file name to write `path`'s content to; moved onto `path` when the block ends without an
  error, removed otherwise. A reader never sees a half-written file, and an interrupted write leaves the previous
  one intact (how, on each storage: LocalStorage.atomic_path, RemoteStorage.atomic_path)."""
  return storage_for(path).atomic_path(os.fspath(path))


def local_copy(path: str | os.PathLike) -> contextlib.AbstractContextManager[str]:
  """A local file name holding `path`'s content for the block: `path` itself when local, else a temporary download
  (for readers that need a file name: np.load with a memory map, safetensors, torch.load)."""
  return storage_for(path).local_copy(os.fspath(path))


def load_npy(path: str | os.PathLike, mmap_mode: str | None = None) -> np.ndarray:
  """np.load of a .npy file; a remote one is read whole into memory (a memory map needs a local file)."""
  return storage_for(path).load_npy(os.fspath(path), mmap_mode)


def append_text(path: str | os.PathLike, text: str) -> None:
  storage_for(path).append_text(os.fspath(path), text)


def write_json(path: str, value: Any, **dump_kwargs) -> None:
  """`value` as JSON at `path`, atomically (see atomic_path)."""
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, **dump_kwargs)
    f.write("\n")
