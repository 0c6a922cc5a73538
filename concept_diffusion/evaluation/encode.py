"""Whole-dataset encoding in canonical order: the code table the metrics index into.

Each index 0..N-1 is encoded exactly once, in order; the last partial batch is padded to the batch
size (one compiled shape) and the padding dropped. Memory is bounded by the batch (and the output table,
optionally a memory-mapped .npy), never by the images of the dataset.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from concept_diffusion.data.base import GroundTruthDataset
from concept_diffusion.workdir import atomic_path
from concept_diffusion.errors import UserError

EncodeFn = Callable[[Any, jax.Array], jax.Array]


def encode_dataset(encode_fn: EncodeFn, params: Any, dataset: GroundTruthDataset, batch_size: int, *,
                   out_path: str | None = None, progress: bool = True) -> np.ndarray:
  """codes[i] = encode_fn(params, image i) for every index of `dataset`, as (num_images, ...) float32.

  `encode_fn` maps (params, images (B, H, W, C)) to codes (B, ...); params are an argument, not a
  closure, so they are not baked into the compiled code. When the dataset renders on device,
  rendering and encoding run in one compiled call per batch.
  """
  if batch_size < 1:
    raise UserError(f"eval.batch_size must be >= 1, got {batch_size}.")
  num = dataset.num_images
  step, fetch = make_encode_step(encode_fn, dataset)
  # Written under a temporary name and renamed when complete: an interrupted pass never leaves a partial table
  # behind for --from_codes to score, and the table of an earlier evaluation stays until then.
  with atomic_path(out_path) if out_path else contextlib.nullcontext() as tmp_path:
    codes = None
    bar = tqdm(total=num, desc=f"encode {dataset.name}", unit="img", disable=not progress, mininterval=1.0)
    for start in range(0, num, batch_size):
      indices = np.arange(start, min(start + batch_size, num))
      padded = np.concatenate([indices, np.full(batch_size - len(indices), indices[-1])])
      out = np.asarray(step(params, fetch(padded)), dtype=np.float32)[:len(indices)]
      if codes is None:
        shape = (num,) + out.shape[1:]
        codes = (np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.float32, shape=shape) if tmp_path
                 else np.empty(shape, np.float32))
      codes[start:start + len(indices)] = out
      bar.update(len(indices))
    bar.close()
    if isinstance(codes, np.memmap):
      codes.flush()
  return codes


def make_encode_step(encode_fn: EncodeFn, dataset: GroundTruthDataset) -> tuple[Callable, Callable]:
  """(step, fetch): codes = step(params, fetch(indices)), one batch as `encode_dataset` computes it (rendering
  and encoding in one compiled call when the dataset renders on device). Also what the benchmark times."""
  if getattr(dataset, "renders_on_device", False):
    return jax.jit(lambda p, idx: encode_fn(p, dataset.images_jax(idx))), lambda idx: jnp.asarray(idx)
  return jax.jit(encode_fn), lambda idx: jnp.asarray(dataset.images(idx))
