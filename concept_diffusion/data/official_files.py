"""Readers of the official download files, each yielding (canonical indices, uint8 images) blocks.

Every reader checks the file against the dataset's layout (keys, shape, dtype, image count = prod of the
factor sizes) when it is opened, so a wrong, partial or damaged download stops with a ValueError that names
the file, before any conversion starts. `blocks()` streams the whole file in stored order with bounded memory;
it feeds both the one-time .npy conversion (`open_canonical_images`) and the TFDS builders.

Canonical order: Shapes3D and dSprites rows are placed by their labels (the official files are already
canonical, but the labels are the ground truth); MPI3D files have no labels and are row-major by
construction; Cars3D index = elevation * 4392 + azimuth * 183 + object, objects in *sorted* file-name order
(the official code uses os.listdir order, which is filesystem-dependent).
"""
from __future__ import annotations

import glob
import math
import os
from typing import Iterator, Optional, Sequence

import numpy as np

from concept_diffusion.data import array_files, canonical
from concept_diffusion.data.catalog import DatasetSpec, no_data_message
from concept_diffusion.errors import UserError

Block = tuple[np.ndarray, np.ndarray]  # (canonical indices (n,), images (n, H, W, C) uint8)
_ROWS_PER_BLOCK = 8192  # 100 MB of 64x64x3 images


def _expected_count_message(spec: DatasetSpec, factor_sizes: Sequence[int], found: int, path: str) -> str:
  message = (f"{spec.name}: {path} holds {found:,} images, but factor sizes {tuple(factor_sizes)} make "
             f"{math.prod(factor_sizes):,}.")
  if spec.name.startswith("mpi3d") and found == 460_800:
    message += (" This looks like MPI3D real_complex (factor sizes 4, 4, 2, 3, 3, 40, 40): set "
                "data.factor_sizes=(4, 4, 2, 3, 3, 40, 40) to use it.")
  elif tuple(factor_sizes) == spec.factor_sizes:
    message += " The file is incomplete or another dataset: download it again, or set data.factor_sizes."
  return message


def _check_images(spec: DatasetSpec, path: str, shape: tuple[int, ...], dtype: np.dtype, image_shape) -> None:
  if len(shape) != 1 + len(image_shape) or tuple(shape[1:]) != tuple(image_shape):
    raise UserError(f"{spec.name}: {path} holds images of shape {tuple(shape[1:])}, expected {tuple(image_shape)} "
                     f"(the official {spec.files}).")
  if np.dtype(dtype) != np.uint8:
    raise UserError(f"{spec.name}: {path} holds images of dtype {np.dtype(dtype)}, expected uint8 (the official "
                     f"{spec.files}).")


def _find_file(spec: DatasetSpec, manual_dir: str, filename: str) -> str:
  if not manual_dir:
    raise FileNotFoundError(no_data_message(spec, "data.manual_dir is not set."))
  path = os.path.join(manual_dir, filename)
  if not os.path.isfile(path):
    raise FileNotFoundError(no_data_message(spec, f"{path} does not exist."))
  return path


class Shapes3DFile:
  """3dshapes.h5: `images` (N, 64, 64, 3) uint8, `labels` (N, 6) float factor values."""

  def __init__(self, spec: DatasetSpec, manual_dir: str, factor_sizes: Sequence[int]):
    import h5py  # pylint: disable=g-import-not-at-top
    self.spec, self.factor_sizes = spec, tuple(factor_sizes)
    self.path = _find_file(spec, manual_dir, "3dshapes.h5")
    self.sources = (self.path,)
    self._h5py = h5py
    with self._open() as f:
      for key in ("images", "labels"):
        if key not in f:
          raise UserError(f"{spec.name}: {self.path} has no dataset {key!r} (it has {sorted(f.keys())}); "
                           "it is not the official 3dshapes.h5.")
      images, labels = f["images"], f["labels"]
      self.num_images = images.shape[0]
      _check_images(spec, self.path, images.shape, images.dtype, spec.image_shape)
      if self.num_images != math.prod(self.factor_sizes):
        raise UserError(_expected_count_message(spec, self.factor_sizes, self.num_images, self.path))
      if labels.shape != (self.num_images, len(spec.factor_names)):
        raise UserError(f"{spec.name}: {self.path} labels have shape {labels.shape}, expected "
                         f"({self.num_images}, {len(spec.factor_names)}).")
      values = self._read(labels, slice(None))
    what = f"{spec.name} {self.path} labels"
    classes = np.stack([canonical.discretize(values[:, k], size, f"{what} column {k} ({name})")
                        for k, (name, size) in enumerate(zip(spec.factor_names, self.factor_sizes))], axis=1)
    self.canonical = canonical.canonical_indices(classes, self.factor_sizes, spec.factor_names, what)

  def _open(self):
    try:
      return self._h5py.File(self.path, "r")
    except OSError as e:
      raise UserError(f"{self.spec.name}: {self.path} is not a readable HDF5 file ({e}); it is damaged or "
                       f"incomplete: download it again from {self.spec.download}.") from e

  def _read(self, dataset, rows) -> np.ndarray:
    try:
      return dataset[rows]
    except (OSError, ValueError, RuntimeError) as e:  # h5py reports damaged chunks as OSError
      raise UserError(f"{self.spec.name}: reading {self.path} failed ({e}); the file is damaged: download it "
                       "again.") from e

  def direct(self) -> Optional[np.ndarray]:
    return None  # HDF5 chunks are compressed: convert once to .npy

  def blocks(self) -> Iterator[Block]:
    with self._open() as f:
      images = f["images"]
      for start in range(0, self.num_images, _ROWS_PER_BLOCK):
        stop = min(start + _ROWS_PER_BLOCK, self.num_images)
        yield self.canonical[start:stop], self._read(images, slice(start, stop))


class DSpritesFile:
  """dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz: `imgs` (N, 64, 64) uint8 0/1, `latents_classes` (N, 6)."""

  FILENAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"

  def __init__(self, spec: DatasetSpec, manual_dir: str, factor_sizes: Sequence[int]):
    self.spec, self.factor_sizes = spec, tuple(factor_sizes)
    self.path = _find_file(spec, manual_dir, self.FILENAME)
    self.sources = (self.path,)
    self._imgs = array_files.NpzMember(self.path, "imgs")
    self.num_images = self._imgs.shape[0]
    _check_images(spec, self.path, self._imgs.shape + (1,), self._imgs.dtype, spec.image_shape)
    if self.num_images != math.prod(self.factor_sizes):
      raise UserError(_expected_count_message(spec, self.factor_sizes, self.num_images, self.path))
    classes_member = array_files.NpzMember(self.path, "latents_classes")
    if classes_member.shape != (self.num_images, 1 + len(spec.factor_names)):
      raise UserError(f"{spec.name}: {self.path} latents_classes has shape {classes_member.shape}, expected "
                       f"({self.num_images}, {1 + len(spec.factor_names)}) (color, then {spec.factor_names}).")
    classes = np.concatenate([block for _, block in classes_member.blocks(self.num_images)])
    if (classes[:, 0] != 0).any():
      raise UserError(f"{spec.name}: {self.path} latents_classes column 0 (color) is not constant 0.")
    self.canonical = canonical.canonical_indices(classes[:, 1:], self.factor_sizes, spec.factor_names,
                                                 f"{spec.name} {self.path} latents_classes")

  def direct(self) -> Optional[np.ndarray]:
    return None  # the official .npz is compressed

  def blocks(self) -> Iterator[Block]:
    for start, images in self._imgs.blocks(_ROWS_PER_BLOCK * 3):
      if images.max(initial=0) > 1:
        raise UserError(f"{self.spec.name}: {self.path} imgs has pixel values up to {images.max()}; dSprites "
                         "images are binary 0/1.")
      yield self.canonical[start:start + len(images)], images[..., None]


class Mpi3DFile:
  """mpi3d_<variant>.npz: `images` (N, 64, 64, 3) uint8, row-major over the factors (no labels)."""

  def __init__(self, spec: DatasetSpec, manual_dir: str, factor_sizes: Sequence[int]):
    self.spec, self.factor_sizes = spec, tuple(factor_sizes)
    self.path = _find_file(spec, manual_dir, f"{spec.name}.npz")
    self.sources = (self.path,)
    self._images = array_files.NpzMember(self.path, "images")
    self.num_images = self._images.shape[0]
    _check_images(spec, self.path, self._images.shape, self._images.dtype, spec.image_shape)
    if self.num_images != math.prod(self.factor_sizes):
      raise UserError(_expected_count_message(spec, self.factor_sizes, self.num_images, self.path))

  def direct(self) -> Optional[np.ndarray]:
    # Uncompressed members (np.savez) are mapped in place: no 12.7 GB copy.
    return None if self._images.compressed else self._images.memmap()

  def blocks(self) -> Iterator[Block]:
    for start, images in self._images.blocks(_ROWS_PER_BLOCK):
      yield np.arange(start, start + len(images), dtype=np.int64), images


def find_cars3d_files(spec: DatasetSpec, manual_dir: str, num_objects: int) -> list[str]:
  """The .mat files, sorted by name, from manual_dir/data/cars, manual_dir/cars or manual_dir."""
  if not manual_dir:
    raise FileNotFoundError(no_data_message(spec, "data.manual_dir is not set."))
  for folder in (os.path.join(manual_dir, "data", "cars"), os.path.join(manual_dir, "cars"), manual_dir):
    files = sorted(glob.glob(os.path.join(glob.escape(folder), "*.mat")))
    if files:
      break
  else:
    raise FileNotFoundError(no_data_message(spec, f"no .mat files in {manual_dir} (nor in its data/cars/ or cars/)."))
  if len(files) != num_objects:
    raise UserError(f"{spec.name}: found {len(files)} .mat files in {folder}, expected {num_objects} (one per "
                     f"object_type); the archive was not fully extracted or files were removed: extract "
                     f"{os.path.basename(spec.download)} again.")
  return files


def resize_like_official(image: np.ndarray, size: int) -> np.ndarray:
  """(128, 128, 3) uint8 -> (size, size, 3) uint8 with PIL thumbnail + LANCZOS, as the official Cars3D loader."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  picture = PIL.Image.fromarray(image)
  picture.thumbnail((size, size), PIL.Image.LANCZOS)
  return np.asarray(picture)


class Cars3DFiles:
  """data/cars/*.mat: `im` (128, 128, 3, azimuth, elevation) uint8 per object, resized to 64x64."""

  SOURCE_SHAPE = (128, 128, 3)

  def __init__(self, spec: DatasetSpec, manual_dir: str, factor_sizes: Sequence[int]):
    self.spec, self.factor_sizes = spec, tuple(factor_sizes)
    self.sources = tuple(find_cars3d_files(spec, manual_dir, self.factor_sizes[2]))
    self.path = os.path.dirname(self.sources[0])
    self.num_images = math.prod(self.factor_sizes)
    self._im_shape = self.SOURCE_SHAPE + (self.factor_sizes[1], self.factor_sizes[0])
    self.load(self.sources[0])  # fail now, not minutes into a conversion, if the layout is wrong

  def load(self, path: str) -> np.ndarray:
    """The `im` array of one .mat file, checked."""
    import scipy.io  # pylint: disable=g-import-not-at-top
    try:
      mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises ValueError, OSError, TypeError... on damaged files
      raise UserError(f"{self.spec.name}: {path} is not a readable .mat file ({type(e).__name__}: {e}); it is "
                       "damaged: extract the archive again.") from e
    if "im" not in mat:
      raise UserError(f"{self.spec.name}: {path} has no variable 'im' (it has "
                       f"{sorted(k for k in mat if not k.startswith('__'))}).")
    im = mat["im"]
    if im.shape != self._im_shape or im.dtype != np.uint8:
      raise UserError(f"{self.spec.name}: {path} 'im' is {im.dtype} {im.shape}, expected uint8 {self._im_shape} "
                       "(height, width, rgb, azimuth, elevation).")
    return im

  def direct(self) -> Optional[np.ndarray]:
    return None  # resized once into the cache

  def blocks(self) -> Iterator[Block]:
    num_elevations, num_azimuths, num_objects = self.factor_sizes
    size = self.spec.image_shape[0]
    elevation, azimuth = np.meshgrid(np.arange(num_elevations), np.arange(num_azimuths), indexing="ij")
    for obj, path in enumerate(self.sources):
      im = self.load(path)
      images = np.stack([resize_like_official(im[:, :, :, a, e], size)
                         for e, a in zip(elevation.ravel(), azimuth.ravel())])
      index = (elevation.ravel() * num_azimuths + azimuth.ravel()) * num_objects + obj
      yield index.astype(np.int64), images


READERS = {"shapes3d": Shapes3DFile, "dsprites": DSpritesFile, "cars3d": Cars3DFiles,
           **{f"mpi3d_{variant}": Mpi3DFile for variant in ("toy", "realistic", "real")}}


def open_official(spec: DatasetSpec, manual_dir: str, factor_sizes: Sequence[int]):
  return READERS[spec.name](spec, manual_dir, factor_sizes)


def open_canonical_images(spec: DatasetSpec, manual_dir: str, factor_sizes: Sequence[int],
                          cache_dir: str = "") -> np.ndarray:
  """All images (N, H, W, C) uint8 in canonical order, memory-mapped; converted once into `cache_dir`.

  `cache_dir` "" means beside the files (data.manual_dir, or the Cars3D folder).
  """
  reader = open_official(spec, manual_dir, factor_sizes)
  direct = reader.direct()
  if direct is not None:
    return direct
  folder = cache_dir or (reader.path if os.path.isdir(reader.path) else os.path.dirname(reader.path))
  base = spec.name if spec.name == "cars3d" else os.path.basename(reader.path)
  shape = (reader.num_images,) + tuple(spec.image_shape)

  def fill(out: np.ndarray) -> None:
    for index, images in reader.blocks():
      if len(index) and index[-1] - index[0] == len(index) - 1 and (np.diff(index) == 1).all():
        out[index[0]:index[-1] + 1] = images  # canonical files: sequential writes
      else:
        out[index] = images

  return array_files.cached_array(os.path.join(folder, f"{base}.canonical_images.npy"), reader.sources, shape,
                                  np.uint8, fill, extra={"factor_sizes": list(factor_sizes)},
                                  what=f"{spec.name}")
