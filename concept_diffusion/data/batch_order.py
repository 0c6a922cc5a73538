"""Deterministic, stateless batch order: the indices of step s are a pure function of (seed, s).

Each epoch is a fresh permutation of the dataset drawn from (seed, epoch); the stream of epochs is cut
into consecutive batches. Resuming at step s therefore needs nothing but s.
"""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_images: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_images)


def batch_indices(step: int, batch_size: int, num_images: int, seed: int) -> np.ndarray:
  """Dataset indices (batch_size,) for one global step."""
  start = step * batch_size
  out = np.empty(batch_size, dtype=np.int64)
  filled = 0
  while filled < batch_size:
    epoch, offset = divmod(start + filled, num_images)
    take = min(batch_size - filled, num_images - offset)
    out[filled:filled + take] = _epoch_permutation(num_images, seed, epoch)[offset:offset + take]
    filled += take
  return out
