"""The input pipeline: global, sharded batches from a ground-truth dataset, resumable from a checkpoint.

The global batch of step s is `batch_indices(s, ...)`: a fresh permutation of the dataset per epoch drawn
from the run seed, cut into consecutive batches (infinite epochs). It does not depend on the number of
processes or devices, so a run gives the same batches on 1 CPU and on a pod. Each process loads only the
rows its devices hold (`parallel.process_rows`) and the rows are assembled into one global `jax.Array`
sharded over the mesh's data axes.

Reading runs in grain: a `MapDataset` over step numbers, read by `loader_threads` threads and
`prefetch_batches` ahead of the train step. Its iterator state ({"next_index": step}) is saved with every
checkpoint; restoring it continues with exactly the batch that would have come next. Datasets that render on
device (the procedural ones) only produce indices here; the pixels are rendered by one jitted call whose
output is already sharded.
"""
from __future__ import annotations

from typing import Any, Iterator

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from concept_diffusion import parallel
from concept_diffusion.data.base import GroundTruthDataset
from concept_diffusion.data.batch_order import batch_indices
from concept_diffusion.errors import UserError

_NUM_STEPS = 2 ** 40  # "infinite": grain's MapDataset wants a length


class InputPipeline(Iterator[jax.Array]):
  """Iterator of global image batches (B, H, W, C) float32 in [-1, 1], sharded over `mesh`."""

  def __init__(self, dataset: GroundTruthDataset, batch_size: int, seed: int, mesh: Mesh, *, start_step: int = 0,
               loader_threads: int = 4, prefetch_batches: int = 8, what: str = "train.batch_size"):
    parallel.check_batch_size(batch_size, mesh, what)
    self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
    self.sharding = parallel.batch_sharding(mesh)
    self.rows = parallel.process_rows(self.sharding, batch_size)
    self._render = None
    if dataset.renders_on_device:
      self._render = jax.jit(dataset.images_jax, out_shardings=self.sharding)
    source = grain.MapDataset.range(0, _NUM_STEPS).map(self._load_rows)
    self._iter_dataset = source.to_iter_dataset(
        grain.ReadOptions(num_threads=max(loader_threads, 0), prefetch_buffer_size=max(prefetch_batches, 0)))
    self._iterator = iter(self._iter_dataset)
    if start_step:
      self._iterator.set_state({"next_index": int(start_step)})

  def indices(self, step: int) -> np.ndarray:
    """Dataset indices of the whole global batch of `step`."""
    return batch_indices(step, self.batch_size, self.dataset.num_images, self.seed)

  def _load_rows(self, step: int) -> dict[str, np.ndarray]:
    local = self.indices(int(step))[self.rows]
    if self._render is not None:
      return {"step": np.int64(step), "indices": local.astype(np.int32)}
    images = np.asarray(self.dataset.images(local), np.float32)
    return {"step": np.int64(step), "images": images}

  @property
  def next_step(self) -> int:
    return int(self.get_state()["next_index"])

  def __next__(self) -> jax.Array:
    return self._to_global(next(self._iterator))

  def _to_global(self, element: dict[str, np.ndarray]) -> jax.Array:
    if self._render is not None:
      indices = parallel.global_batch_array(element["indices"], self.sharding, self.batch_size)
      return self._render(indices)
    return parallel.global_batch_array(element["images"], self.sharding, self.batch_size)

  def get_state(self) -> dict[str, Any]:
    return dict(self._iterator.get_state())

  def set_state(self, state: dict[str, Any]) -> None:
    if "next_index" not in state:
      raise UserError(f"Not an input-pipeline state (expected a 'next_index' entry): {state!r}.")
    self._iterator.set_state(dict(state))

  def batch_at(self, step: int) -> jax.Array:
    """The global batch of `step`, outside the iteration (e.g. the first batch for scale_by_std)."""
    return self._to_global(self._load_rows(step))

