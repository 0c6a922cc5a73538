"""Canonical (row-major) order from per-record factor labels.

Stored datasets are not always in canonical order (TFDS shuffles records on write), so readers rebuild the
order from the labels: `row_of[i]` is the stored row that holds canonical index i. The labels must name every
factor combination exactly once; anything else means a damaged or different dataset, which is reported
instead of silently training on misaligned factors.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from concept_diffusion.errors import UserError


def canonical_indices(labels: np.ndarray, factor_sizes: Sequence[int], factor_names: Sequence[str],
                      what: str) -> np.ndarray:
  """Canonical index (N,) int64 of each stored row, from its integer labels (N, num_factors).

  Raises:
    ValueError: a label is out of range, or the labels do not enumerate every combination exactly once.
  """
  labels = np.asarray(labels)
  num = math.prod(factor_sizes)
  if labels.ndim != 2 or labels.shape[1] != len(factor_sizes):
    raise UserError(f"{what}: expected labels of shape (N, {len(factor_sizes)}), got {labels.shape}.")
  if labels.shape[0] != num:
    raise UserError(f"{what}: {labels.shape[0]:,} records, but factor sizes {tuple(factor_sizes)} make {num:,}.")
  labels = labels.astype(np.int64)
  for k, (name, size) in enumerate(zip(factor_names, factor_sizes)):
    bad = (labels[:, k] < 0) | (labels[:, k] >= size)
    if bad.any():
      row = int(np.flatnonzero(bad)[0])
      raise UserError(f"{what}: record {row} has {name}={int(labels[row, k])}, outside 0..{size - 1}; the data "
                       f"does not have the factor sizes {tuple(factor_sizes)}.")
  index = np.ravel_multi_index(tuple(labels.T), tuple(factor_sizes)).astype(np.int64)
  counts = np.bincount(index, minlength=num)
  if (counts != 1).any():
    missing = int(np.flatnonzero(counts == 0)[0])
    repeated = int(np.flatnonzero(counts > 1)[0])
    raise UserError(f"{what}: the labels do not name every factor combination exactly once (e.g. "
                     f"{dict(zip(factor_names, np.unravel_index(repeated, tuple(factor_sizes))))} appears "
                     f"{int(counts[repeated])} times and index {missing} never); the data is damaged or not "
                     "the dataset it claims to be.")
  return index


def rows_of(canonical: np.ndarray) -> np.ndarray:
  """The inverse permutation: stored row (N,) int64 of each canonical index."""
  rows = np.empty_like(canonical)
  rows[canonical] = np.arange(len(canonical), dtype=np.int64)
  return rows


def discretize(values: np.ndarray, size: int, what: str) -> np.ndarray:
  """Float factor values (N,) -> class labels 0..size-1 by rank of the distinct values (as TFDS's shapes3d).

  Values are rounded to 6 significant decimals first so that float noise cannot split one value in two.
  """
  distinct, labels = np.unique(np.round(np.asarray(values, np.float64), 6), return_inverse=True)
  if len(distinct) != size:
    raise UserError(f"{what}: {len(distinct)} distinct values, expected {size}.")
  return labels.reshape(-1).astype(np.int64)
