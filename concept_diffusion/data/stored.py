"""Real datasets (Shapes3D, dSprites, MPI3D, Cars3D) as `GroundTruthDataset`s over stored uint8 images.

`build_stored(name, ...)` picks the storage (`source`): "files" reads the official downloads in manual_dir
(converted once to a memory-mapped .npy where they are compressed), "tfds" reads a prepared TFDS dataset
(array_record) in tfds_data_dir, "auto" is tfds when tfds_data_dir is set, else files. Either way the images
come out in canonical order, as float32 in [-1, 1], optionally block-averaged down to a smaller image_size.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from concept_diffusion.data import base, catalog
from concept_diffusion.errors import UserError

SOURCES = ("auto", "tfds", "files")
Reader = Callable[[np.ndarray], np.ndarray]  # canonical indices (n,) -> uint8 images (n, H, W, C)


class StoredDataset(base.GroundTruthDataset):
  """Stored images by canonical index; `source` says where they come from (for messages and logs)."""

  def __init__(self, spec: catalog.DatasetSpec, read: Reader, factor_sizes: Sequence[int], image_size: int,
               source: str):
    self.name, self.factor_names = spec.name, spec.factor_names
    self.factor_sizes = tuple(int(size) for size in factor_sizes)
    self.source = source
    image_size = check_image_size(spec, image_size)
    self._factor = spec.image_shape[0] // image_size
    self.image_shape = (image_size, image_size, spec.image_shape[2])
    self._read = read
    self._scale = 2.0 / spec.pixel_max

  def images(self, indices: np.ndarray) -> np.ndarray:
    """Images (n, H, W, C) float32 in [-1, 1]; downsampled by averaging f x f blocks when image_size < native."""
    indices = self.check_indices(indices)
    images = self._read(indices).astype(np.float32) * np.float32(self._scale) - np.float32(1.0)
    if self._factor > 1:
      n, height, width, channels = images.shape
      f = self._factor
      images = images.reshape(n, height // f, f, width // f, f, channels).mean(axis=(2, 4))
    return images


def check_image_size(spec: catalog.DatasetSpec, image_size: int) -> int:
  """`image_size` if the stored images can be block-averaged to it, else a ValueError that says which can."""
  image_size = base.validate_image_size(image_size)
  native = spec.image_shape[0]
  if native % image_size:
    raise UserError(f"{spec.name} images are {native}x{native}; data.image_size must divide {native} "
                     f"(e.g. {native}, {native // 2}, {native // 4}), got {image_size}.")
  return image_size


def memmap_reader(array: np.ndarray) -> Reader:
  """Reads rows of a (memory-mapped) canonical array in sorted order (disk locality), returned as asked."""

  def read(indices: np.ndarray) -> np.ndarray:
    order = np.argsort(indices, kind="stable")
    out = np.empty((len(indices),) + array.shape[1:], array.dtype)
    out[order] = array[indices[order]]
    return out

  return read


def resolve_factor_sizes(spec: catalog.DatasetSpec, factor_sizes: Sequence[int]) -> tuple[int, ...]:
  """data.factor_sizes, or the official sizes when it is empty; checked for length and values."""
  if not factor_sizes:
    return spec.factor_sizes
  sizes = tuple(factor_sizes)
  if (len(sizes) != len(spec.factor_names) or
      not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in sizes)):
    raise UserError(f"data.factor_sizes={sizes!r} must be {len(spec.factor_names)} positive ints, one per factor "
                     f"{spec.factor_names} (official: {spec.factor_sizes}), or () for the official sizes.")
  return tuple(int(s) for s in sizes)


def build_stored(name: str, *, image_size: int, source: str = "auto", manual_dir: str = "", tfds_data_dir: str = "",
                 cache_dir: str = "", factor_sizes: Sequence[int] = ()) -> StoredDataset:
  """The dataset `name` (a key of catalog.SPECS) from official files or a prepared TFDS dataset.

  Raises:
    FileNotFoundError: the data is not where the config says, with what to download and how to prepare it.
    ValueError: the data is there but wrong (shape, dtype, count, damaged), or the config is inconsistent.
  """
  spec = catalog.SPECS[name]
  sizes = resolve_factor_sizes(spec, factor_sizes)
  check_image_size(spec, image_size)  # before a conversion that may take minutes
  if source not in SOURCES:
    raise UserError(f"data.source must be one of {SOURCES}, got {source!r}.")
  if source == "auto":
    source = "tfds" if tfds_data_dir else "files"
  if source == "tfds":
    from concept_diffusion.data.tfds_source import TfdsImages  # pylint: disable=g-import-not-at-top
    reader = TfdsImages(spec, tfds_data_dir, sizes, cache_dir)
    where = f"tfds:{reader.where}"
  else:
    from concept_diffusion.data import official_files  # pylint: disable=g-import-not-at-top
    reader = memmap_reader(official_files.open_canonical_images(spec, manual_dir, sizes, cache_dir))
    where = f"files:{manual_dir}"
  return StoredDataset(spec, reader, sizes, image_size, where)
