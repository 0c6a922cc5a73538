"""Large arrays on disk without loading them: .npz members (mapped or streamed) and cached .npy conversions.

The official files hold GBs of uint8 images (Shapes3D 5.9 GB, each MPI3D variant 12.7 GB) that a training
process reads a few hundred at a time, from several threads. Memory-mapped uncompressed .npy (or an
uncompressed .npz member, mapped in place) gives that random access at page-cache speed with bounded RAM.
Compressed or differently laid out sources are converted once, block by block, into such a .npy: written to a
temporary name and renamed, so an interrupted conversion never leaves a file that looks finished.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
import zipfile
import zlib
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from concept_diffusion.errors import UserError

# Bump when the layout of converted files changes, so old caches are rebuilt rather than misread.
CACHE_FORMAT = 1
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the 30-byte local file header of a zip member


class NpzMember:
  """One array of an .npz file: its header, plus mapped or streamed access to the data.

  np.load(npz)[key] would decompress and hold the whole array; this reads the member's .npy header only.
  """

  def __init__(self, path: str, key: str):
    self.path, self.key = path, key
    try:
      with zipfile.ZipFile(path) as archive:
        names = [name[:-4] for name in archive.namelist() if name.endswith(".npy")]
        if key not in names:
          raise UserError(f"{path} has no array {key!r} (it has {names}).")
        self._info = archive.getinfo(key + ".npy")
        with archive.open(self._info) as member:
          self.shape, self.dtype, self._header_size = _read_npy_header(member, f"{path}[{key}]")
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise UserError(f"{path} is not a readable .npz file ({type(e).__name__}: {e}); it is damaged or "
                       "incomplete: download it again.") from e

  @property
  def compressed(self) -> bool:
    return self._info.compress_type != zipfile.ZIP_STORED

  def memmap(self) -> np.ndarray:
    """The array mapped in place (read-only); only for uncompressed members (np.savez, not savez_compressed)."""
    if self.compressed:
      raise UserError(f"{self.path}[{self.key}] is compressed and cannot be mapped.")
    with open(self.path, "rb") as f:
      f.seek(self._info.header_offset)
      fields = _ZIP_LOCAL_HEADER.unpack(f.read(_ZIP_LOCAL_HEADER.size))
    name_length, extra_length = fields[-2], fields[-1]
    offset = self._info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length + self._header_size
    expected_end = offset + int(np.prod(self.shape)) * self.dtype.itemsize
    if expected_end > os.path.getsize(self.path):
      raise UserError(f"{self.path} is truncated: {self.key} needs {expected_end:,} bytes, the file has "
                       f"{os.path.getsize(self.path):,}; download it again.")
    return np.memmap(self.path, dtype=self.dtype, mode="r", offset=offset, shape=self.shape)

  def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start row, rows of the array) in order, decompressing `rows` rows at a time."""
    row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
    try:
      with zipfile.ZipFile(self.path) as archive, archive.open(self._info) as member:
        member.read(self._header_size)
        for start in range(0, self.shape[0], rows):
          count = min(rows, self.shape[0] - start)
          raw = member.read(count * row_bytes)
          if len(raw) != count * row_bytes:
            raise UserError(f"{self.path}[{self.key}] ends after {start + len(raw) // row_bytes:,} of "
                             f"{self.shape[0]:,} rows; the file is truncated: download it again.")
          yield start, np.frombuffer(raw, self.dtype).reshape((count,) + tuple(self.shape[1:]))
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
      raise UserError(f"{self.path}[{self.key}] could not be read ({type(e).__name__}: {e}); the file is damaged: "
                       "download it again.") from e


def _read_npy_header(f, what: str) -> tuple[tuple[int, ...], np.dtype, int]:
  """(shape, dtype, header bytes) of the .npy stream `f`, positioned at its start."""
  try:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
  except ValueError as e:
    raise UserError(f"{what} is not a valid .npy array ({e}).") from e
  if fortran:
    raise UserError(f"{what} is stored in Fortran order; the official files are C order.")
  # read_array_header_* leaves `f` just after the header, and `f` started at the header.
  return tuple(shape), np.dtype(dtype), f.tell()


def _stamp(sources: Sequence[str], shape: tuple[int, ...], dtype: np.dtype, extra: Optional[dict]) -> dict:
  # Size and mtime of every source: a replaced download makes the cache stale.
  return {"format": CACHE_FORMAT, "shape": list(shape), "dtype": np.dtype(dtype).str, "extra": extra or {},
          "sources": [[os.path.abspath(s), os.path.getsize(s), os.stat(s).st_mtime_ns] for s in sources]}


def _atomic_write_bytes(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def cached_array(path: str, sources: Sequence[str], shape: tuple[int, ...], dtype, fill: Callable[[np.ndarray], None],
                 *, extra: Optional[dict] = None, what: str = "") -> np.ndarray:
  """The .npy at `path` mapped read-only, first written by `fill(out)` unless a fresh one is there.

  A sidecar `path + ".json"` records the sources' sizes and mtimes, the shape and `extra`; a cache whose
  record does not match is rebuilt. Concurrent builders (several processes starting at once) each write a
  private temporary file and rename it; the results are identical, the last rename wins.
  """
  if "://" in path:  # without this, os.makedirs below would make a local folder named "gs:"
    raise UserError(f"{what}: the cache {path} must be on a local disk: it is memory-mapped and read at random "
                     "(a remote workdir is fine; set data.cache_dir to a local folder).")
  stamp = _stamp(sources, shape, dtype, extra)
  meta_path = path + ".json"
  if os.path.exists(path) and os.path.exists(meta_path):
    try:
      with open(meta_path) as f:
        fresh = json.load(f) == stamp
    except (OSError, ValueError):
      fresh = False
    if fresh:
      try:
        array = np.load(path, mmap_mode="r")
        if array.shape == tuple(shape) and array.dtype == np.dtype(dtype):
          return array
      except (OSError, ValueError):
        pass  # damaged cache: rebuild it below
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
    needed = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    free = shutil.disk_usage(folder).free
  except OSError as e:
    raise UserError(f"{what}: cannot create the cache folder {folder} ({e}); set data.cache_dir to a writable "
                     "folder.") from e
  if needed > free:
    raise UserError(f"{what}: converting to {path} needs {needed / 2**30:.1f} GiB, {folder} has "
                     f"{free / 2**30:.1f} GiB free; set data.cache_dir to a folder with room.")
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  try:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
    fill(out)
    out.flush()
    del out
    os.replace(tmp, path)
  except PermissionError as e:
    raise UserError(f"{what}: cannot write the cache {path} ({e}); set data.cache_dir to a writable folder.") from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  _atomic_write_bytes(meta_path, json.dumps(stamp).encode())
  return np.load(path, mmap_mode="r")
