"""Orbax CheckpointManager wiring: one manager per stage directory under the workdir.

A checkpoint holds two items: `state` (the stage's whole train state: parameters, EMA, optimiser state, BatchNorm
statistics, step) and `data` (the input pipeline's iterator state, JSON). The RNG is `fold_in(seed key, step)`,
so the step restores it. Saves are asynchronous by default (training continues while the arrays are written;
every process writes its own shards) and atomic: Orbax writes into a temporary directory and renames it when
complete, so a crash during a save leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abstract(leaf: Any) -> Any:
  """A restore target: ShapeDtypeStructs keep their sharding; concrete arrays lend theirs; else device 0."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    if leaf.sharding is None:
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return leaf
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return ocp.utils.to_shape_dtype_struct(leaf)


class StageCheckpoints:
  """Saves and restores one stage's train state (and the data-iterator state); keeps the last `keep` steps."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None = None, force: bool = False) -> bool:
    """Starts saving `state` (and `data_state`) as `step`; returns once the arrays are copied off the devices."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, template: Any, step: int | None = None) -> Any:
    """The state at `step` (default latest) onto the structure, dtypes and shardings of `template`.

    `template` is a concrete state or one of ShapeDtypeStructs; leaves that carry a sharding are restored
    onto it (which may be another mesh than the one that saved them), others onto the first device.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    abstract = jax.tree_util.tree_map(_abstract, template)
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored.state

  def restore_data_state(self, step: int) -> dict | None:
    """The input pipeline's state saved with `step` (None for checkpoints written without one, e.g. imports)."""
    if not os.path.isdir(os.path.join(self.directory, str(step), "data")):
      return None
    return dict(self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data)

  def resume(self, template: Any, pipeline: Any, stage: str) -> Any:
    """The latest state, with the input pipeline (`get_state`/`set_state`) moved to the batch that comes next."""
    state = self.restore(template)
    step = int(jax.device_get(state.step))
    data_state = self.restore_data_state(self.latest_step())
    if data_state is None:  # e.g. an imported checkpoint: the batch order is a function of the step
      data_state = {"next_index": step}
    if int(data_state.get("next_index", -1)) != step:
      raise ValueError(f"{stage}: the checkpoint at step {step} in {self.directory} holds an input-pipeline state "
                       f"{data_state} that does not match its step; the checkpoint is damaged. Delete that step's "
                       "directory to resume from the one before.")
    pipeline.set_state(data_state)
    return state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_checkpoint(directory: str, template: Any, step: int | None = None, what: str = "") -> Any:
  """The state at `step` (default latest) in a stage directory, with one clear error when it is not there."""
  label = f"{what} checkpoint" if what else "checkpoint"
  ckpts = StageCheckpoints(directory) if os.path.isdir(directory) else None
  try:
    steps = ckpts.all_steps() if ckpts else []
    if not steps:
      raise FileNotFoundError(f"No {label} in {directory}: train the run first (experiments/train.py) or pass the "
                              "right --workdir.")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"No {label} at step {step} in {directory}; available steps: {sorted(steps)}.")
    return ckpts.restore(template, step)
  finally:
    if ckpts:
      ckpts.close()
