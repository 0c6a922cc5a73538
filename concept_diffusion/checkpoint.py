"""Orbax CheckpointManager wiring: one manager per stage directory under the workdir.

A checkpoint holds two items: `state` (the stage's whole train state: parameters, EMA, optimiser state, BatchNorm
statistics, step) and `data` (the input pipeline's iterator state, JSON). The RNG is `fold_in(seed key, step)`,
so the step restores it. Saves are asynchronous by default (training continues while the arrays are written;
every process writes its own shards) and atomic: Orbax writes into a temporary directory and renames it when
complete, so a crash during a save leaves the previous checkpoint as the latest one.

A checkpoint can still be damaged afterwards (a disk error, a file truncated or deleted by hand). Restoring the
latest checkpoint then falls back to the newest one that reads, with a warning per unreadable step; a writing
manager also renames each unreadable newer step to `<step>.unreadable`, so that training can save that step again.
Nothing is ever deleted because it failed to read.

The directory may be remote (gs://bucket/run/diffusion): Orbax is given the URL unchanged (TensorStore writes the
arrays with its own GCS driver, etils.epath the rest), and the renames below go through epath.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

from etils import epath
import jax
import orbax.checkpoint as ocp

from concept_diffusion import parallel
from concept_diffusion import workdir as workdir_lib
from concept_diffusion.errors import UserError


class CheckpointError(ValueError):
  """No usable checkpoint where one was asked for (a ValueError, so the command line prints it as one line)."""


def first_line(error: BaseException) -> str:
  """`Type: first line` of an error, short enough for a one-line report."""
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)  # KeyError quotes itself
  text = (text.strip().splitlines() or [""])[0]
  text = text.split(" [tensorstore_spec=")[0]  # TensorStore appends its whole JSON spec to the line
  if len(text) > 300:
    text = text[:297] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_closed_loop_error(error: BaseException | None) -> bool:
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def quiet_closed_event_loop_errors() -> None:
  """Drops the 'RuntimeError: Event loop is closed' that Orbax's abandoned I/O prints after a failed read or write.

  When one array of a checkpoint fails to read or write, Orbax's event loop ends with that error and closes while
  TensorStore still completes the checkpoint's other operations; each of their callbacks then meets the closed
  loop, and Python prints it on stderr (as an unraisable error, or through sys.excepthook), at random, after the
  one-line report (seen: 1,320 of them for one full disk). Those operations are abandoned anyway. Installed once
  (from the first failed read on, and by the console scripts); every other error still goes to the hook before.
  """
  if getattr(sys.unraisablehook, "quiet_closed_loop", False):
    return
  previous_unraisable, previous_excepthook = sys.unraisablehook, sys.excepthook

  def unraisable_hook(unraisable: Any) -> None:
    if not _is_closed_loop_error(unraisable.exc_value):
      previous_unraisable(unraisable)

  def excepthook(kind, value, tb) -> None:
    if not _is_closed_loop_error(value):
      previous_excepthook(kind, value, tb)

  unraisable_hook.quiet_closed_loop = True
  sys.unraisablehook, sys.excepthook = unraisable_hook, excepthook


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
  """Saves and restores one stage's train state (and the data-iterator state); keeps the last `keep` steps.

  With `create=False` the manager is a reader: it creates no directory, leaves Orbax's temporary directories (a
  save in progress by another process) alone, and leaves an unreadable checkpoint where it is.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True, create: bool = True):
    self.directory = workdir_lib.absolute(directory)  # a URL stays one
    self._writes = create
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=create)
    self._manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)
    self._closed = False

  def __enter__(self) -> StageCheckpoints:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

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

  def restore(self, template: Any, step: int | None = None, what: str = "") -> Any:
    """The state at `step` (default latest) onto the structure, dtypes and shardings of `template`.

    `template` is a concrete state or one of ShapeDtypeStructs; leaves that carry a sharding are restored
    onto it (which may be another mesh than the one that saved them), others onto the first device.
    Without `step`, an unreadable checkpoint gives way to the one before it (see the module docstring); a
    requested `step` that does not read raises CheckpointError. `what` names the stage in messages.
    """
    abstract = jax.tree_util.tree_map(_abstract, template)
    read = functools.partial(self._read_state, abstract)
    if step is None:
      return self._newest_readable(read, what)[1]
    return self._read_requested(read, step, what)

  def restore_data_state(self, step: int) -> dict | None:
    """The input pipeline's state saved with `step` (None for checkpoints written without one, e.g. imports)."""
    if not (epath.Path(self.directory) / str(step) / "data").is_dir():
      return None
    return dict(self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data)

  def resume(self, template: Any, pipeline: Any, stage: str) -> Any:
    """The latest readable state, with the input pipeline (`get_state`/`set_state`) moved to the batch after it.

    A checkpoint whose input-pipeline state does not match its step counts as unreadable.
    """
    abstract = jax.tree_util.tree_map(_abstract, template)

    def read(step: int) -> tuple[Any, dict]:
      state = self._read_state(abstract, step)
      state_step = int(jax.device_get(state.step))
      data_state = self.restore_data_state(step)
      if data_state is None:  # e.g. an imported checkpoint: the batch order is a function of the step
        data_state = {"next_index": state_step}
      if int(data_state.get("next_index", -1)) != state_step:
        raise UserError(f"its input-pipeline state {data_state} does not match its step {state_step}")
      return state, data_state

    _, (state, data_state) = self._newest_readable(read, stage)
    pipeline.set_state(data_state)
    return state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    self._manager.wait_until_finished()
    self._manager.close()

  def _read_state(self, abstract: Any, step: int) -> Any:
    return self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state

  def _step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _read_requested(self, read: Callable[[int], Any], step: int, what: str) -> Any:
    """`read(step)`, or one error naming the step and the others there (a requested step has no fallback)."""
    prefix = f"{what}: " if what else ""
    steps = self.all_steps()
    if step not in steps:
      raise FileNotFoundError(f"{prefix}No checkpoint at step {step} in {self.directory}; available steps: {steps}.")
    try:
      return read(step)
    except Exception as e:  # pylint: disable=broad-except
      quiet_closed_event_loop_errors()
      others = [s for s in steps if s != step]
      raise CheckpointError(f"{prefix}cannot read checkpoint step {step} ({self._step_path(step)}): {first_line(e)}. "
                            f"Other steps in {self.directory}: {others or 'none'}.") from e

  def _newest_readable(self, read: Callable[[int], Any], what: str) -> tuple[int, Any]:
    """(step, read(step)) for the newest step that reads; those newer than it are reported and moved aside."""
    prefix = f"{what}: " if what else ""
    failed = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        value = read(step)
      except Exception as e:  # pylint: disable=broad-except  # whatever the damage, the step before may be whole
        quiet_closed_event_loop_errors()
        failed.append((step, first_line(e)))
        continue
      self._fall_back(failed, step, prefix)
      return step, value
    if not failed:
      raise FileNotFoundError(f"{prefix}No checkpoint in {self.directory}.")
    tried = "; ".join(f"step {step}: {line}" for step, line in failed)
    raise CheckpointError(
        f"{prefix}no checkpoint in {self.directory} can be read (tried {tried}). Nothing was deleted. If the config "
        f"changed since they were written, use the one they were written with; to start over, move {self.directory} "
        "aside or use a new --workdir.")

  def _fall_back(self, failed: list[tuple[int, str]], good: int, prefix: str) -> None:
    """Warns about each unreadable step newer than `good`; a writer renames them so those steps can be saved again.

    Left in place, an unreadable step would stop the save of the same step number later in the run (Orbax
    refuses an existing step) and count against `keep`, so that the good checkpoints would be deleted first.
    """
    if not failed:
      return
    moved = {}
    if self._writes:
      if jax.process_index() == 0:
        moved = {step: self._move_aside(step) for step, _ in failed}
      if jax.process_count() > 1:  # every process must see the renames before its manager lists the steps again
        ocp.multihost.sync_global_processes("concept_diffusion_checkpoint_fallback")
      self._manager.reload()
    for step, line in failed:
      fate = (f"moved it to {moved[step]} so that step {step} can be saved again" if step in moved
              else "left it in place")
      parallel.say(f"warning: {prefix}cannot read checkpoint step {step} ({self._step_path(step)}): {line}; {fate}. "
                   f"Using step {good}, the newest readable one.", stream=sys.stderr)

  def _move_aside(self, step: int) -> str:
    path = self._step_path(step)
    target, n = f"{path}.unreadable", 0
    while epath.Path(target).exists():
      n += 1
      target = f"{path}.unreadable-{n}"
    epath.Path(path).rename(target)  # remote: a copy and a delete (an object store has no rename)
    return target


def restore_checkpoint(directory: str, template: Any, step: int | None = None, what: str = "") -> Any:
  """The state at `step` (default latest) in a stage directory, with one clear error when it is not there.

  Only reads: a missing or empty directory stays as it is, and an unreadable latest checkpoint is left in place.
  """
  label = f"{what} checkpoint" if what else "checkpoint"
  with StageCheckpoints(directory, create=False) as ckpts:
    steps = ckpts.all_steps()
    if not steps:
      raise FileNotFoundError(f"No {label} in {directory}: train the run first (experiments/train.py) or pass the "
                              "right --workdir.")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"No {label} at step {step} in {directory}; available steps: {sorted(steps)}.")
    return ckpts.restore(template, step, what)
