"""The ground-truth dataset contract every dataset (procedural or file-backed) implements.

Disentanglement metrics enumerate the whole dataset and rely on one fixed order: index <-> factor tuple is
row-major over `factor_sizes` (the order of the official Shapes3D / dSprites arrays and of
disentanglement_lib). Keeping that mapping here, as pure numpy, means every dataset gets it identically and
only has to say how to produce pixels.
"""
from __future__ import annotations

import abc
import math
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from concept_diffusion.errors import UserError

RandomState = Union[np.random.RandomState, np.random.Generator, int, None]

# The first stage downsamples by 4 (f=4) and the official datasets are 64x64; larger would need upsampling.
MAX_IMAGE_SIZE = 64
IMAGE_SIZE_MULTIPLE = 4


def validate_image_size(image_size: object) -> int:
  """Returns `image_size` as an int, or raises a ValueError that says which sizes are allowed."""
  if (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size <= 0 or
      image_size > MAX_IMAGE_SIZE or image_size % IMAGE_SIZE_MULTIPLE):
    raise UserError(f"data.image_size must be a positive int <= {MAX_IMAGE_SIZE} and a multiple of "
                     f"{IMAGE_SIZE_MULTIPLE} (e.g. 16, 32, 64), got {image_size!r}.")
  return int(image_size)


def unravel_jax(indices: jax.Array, factor_sizes: tuple[int, ...]) -> jax.Array:
  """Row-major index -> factor tuple (n, num_factors) int32 in jnp: `index_to_factors` for traced indices."""
  factors = []
  remainder = jnp.asarray(indices).astype(jnp.int32)
  for size in reversed(factor_sizes):
    factors.append(remainder % size)
    remainder = remainder // size
  return jnp.stack(factors[::-1], axis=-1)


def _as_rng(random_state: RandomState) -> Union[np.random.RandomState, np.random.Generator]:
  # Both numpy RNG APIs are accepted: disentanglement_lib passes RandomState, new code uses Generator.
  if random_state is None or isinstance(random_state, (int, np.integer)):
    return np.random.default_rng(random_state)
  return random_state


def _random_integers(random_state: Union[np.random.RandomState, np.random.Generator], high: int,
                     size: int) -> np.ndarray:
  if isinstance(random_state, np.random.Generator):
    return random_state.integers(0, high, size=size, dtype=np.int64)
  return random_state.randint(0, high, size=size).astype(np.int64)


class GroundTruthDataset(abc.ABC):
  """Images addressable by factor tuple; index order is row-major over the factors.

  Subclasses set the four class/instance attributes below and implement `images`. Datasets that can render
  on an accelerator also override `images_jax` (and set `renders_on_device = True`) so the training loop
  can produce batches inside or beside its jitted step without a host round trip.
  """
  name: str
  factor_names: tuple[str, ...]
  factor_sizes: tuple[int, ...]
  image_shape: tuple[int, int, int]  # (H, W, C)
  renders_on_device: bool = False

  @property
  def num_factors(self) -> int:
    return len(self.factor_sizes)

  @property
  def num_images(self) -> int:
    return math.prod(self.factor_sizes)

  def index_to_factors(self, indices: np.ndarray) -> np.ndarray:
    """Factor tuples (n, num_factors) int64 of the 1-D `indices` (row-major, as np.unravel_index)."""
    indices = self.check_indices(indices)
    return np.stack(np.unravel_index(indices, self.factor_sizes), axis=-1).astype(np.int64).reshape(
        len(indices), self.num_factors)

  def factors_to_index(self, factors: np.ndarray) -> np.ndarray:
    """Indices (n,) int64 of factor tuples (n, num_factors), or of a single tuple (num_factors,)."""
    factors = self.check_factors(factors)
    return np.ravel_multi_index(tuple(factors.T), self.factor_sizes).astype(np.int64)

  def check_indices(self, indices: np.ndarray) -> np.ndarray:
    """Returns `indices` as a 1-D int64 array, or raises a ValueError that names the valid range."""
    indices = np.atleast_1d(np.asarray(indices))
    if indices.ndim != 1:
      raise UserError(f"{self.name}: indices must be a 1-D array, got shape {indices.shape}.")
    if indices.size and not np.issubdtype(indices.dtype, np.integer):
      raise UserError(f"{self.name}: indices must be integers, got dtype {indices.dtype}.")
    indices = indices.astype(np.int64)
    bad = (indices < 0) | (indices >= self.num_images)
    if bad.any():
      raise UserError(f"{self.name}: index {int(indices[bad][0])} is out of range; valid indices are "
                       f"0..{self.num_images - 1} ({self.num_images} images).")
    return indices

  def check_factors(self, factors: np.ndarray) -> np.ndarray:
    """Returns `factors` as an (n, num_factors) int64 array, or raises a ValueError naming the bad factor."""
    factors = np.asarray(factors)
    if factors.ndim == 1:
      factors = factors[None]
    if factors.ndim != 2 or factors.shape[1] != self.num_factors:
      raise UserError(f"{self.name}: expected factor tuples of length {self.num_factors} "
                       f"{self.factor_names}, got an array of shape {factors.shape}.")
    if factors.size and not np.issubdtype(factors.dtype, np.integer):
      raise UserError(f"{self.name}: factors must be integers, got dtype {factors.dtype}.")
    factors = factors.astype(np.int64)
    for k, (name, size) in enumerate(zip(self.factor_names, self.factor_sizes)):
      bad = (factors[:, k] < 0) | (factors[:, k] >= size)
      if bad.any():
        raise UserError(f"{self.name}: factor {name!r} = {int(factors[bad, k][0])} is out of range; "
                         f"valid values are 0..{size - 1}.")
    return factors

  @abc.abstractmethod
  def images(self, indices: np.ndarray) -> np.ndarray:
    """Images (n, H, W, C) float32 in [-1, 1]; the same index always gives the same pixels."""

  def images_jax(self, indices: jax.Array) -> jax.Array:
    """Jit-able device rendering of `images`; only datasets with `renders_on_device` provide it."""
    raise NotImplementedError(f"{self.name} reads stored images and cannot render on device; use images().")

  def images_from_factors(self, factors: np.ndarray) -> np.ndarray:
    return self.images(self.factors_to_index(factors))

  def sample_factors(self, num: int, random_state: RandomState) -> np.ndarray:
    """Factor tuples (num, num_factors) int64 drawn uniformly and independently per factor."""
    rng = _as_rng(random_state)
    columns = [_random_integers(rng, size, num) for size in self.factor_sizes]
    return np.stack(columns, axis=-1).reshape(num, self.num_factors)

  def sample(self, num: int, random_state: RandomState) -> tuple[np.ndarray, np.ndarray]:
    """(factors, images) of `num` uniformly drawn examples (disentanglement_lib's `sample`)."""
    factors = self.sample_factors(num, random_state)
    return factors, self.images_from_factors(factors)
