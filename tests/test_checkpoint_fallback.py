"""A damaged latest checkpoint: restore and resume fall back to the one before, with a warning and nothing deleted."""
import glob
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion import states
from concept_diffusion.checkpoint import CheckpointError, StageCheckpoints, restore_checkpoint
from configs import smoke


@flax.struct.dataclass
class TinyState:
  step: jax.Array
  weights: jax.Array
  bias: jax.Array


def tiny_state(step: int) -> TinyState:
  return TinyState(step=jnp.asarray(step, jnp.int32), weights=jnp.full((4, 3), float(step)),
                   bias=jnp.arange(5.0) + step)


class FakePipeline:
  """The input pipeline's get_state/set_state, and nothing else."""

  def __init__(self, next_index: int = 0):
    self.state = {"next_index": next_index}

  def get_state(self) -> dict:
    return dict(self.state)

  def set_state(self, state: dict) -> None:
    self.state = dict(state)


def delete_metadata(step_dir: str) -> None:
  os.remove(os.path.join(step_dir, "state", "_METADATA"))  # Orbax 0.12 keeps the tree's metadata under state/


def empty_state(step_dir: str) -> None:
  shutil.rmtree(os.path.join(step_dir, "state"))
  os.mkdir(os.path.join(step_dir, "state"))


def truncate_data(step_dir: str) -> None:
  # The arrays are read through state/d/ (the OCDBT root); the per-process copies under ocdbt.process_0/ are not.
  files = glob.glob(os.path.join(step_dir, "state", "d", "*"))
  assert files, os.listdir(os.path.join(step_dir, "state"))
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(10)


DAMAGE = {"metadata_deleted": delete_metadata, "state_emptied": empty_state, "data_truncated": truncate_data}


def saved(directory: str, steps=(2, 4)) -> str:
  with StageCheckpoints(directory, async_save=False) as ckpts:
    for step in steps:
      ckpts.save(step, tiny_state(step), {"next_index": step}, force=True)
  return directory


def files_under(path: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, name), path)
                for root, _, names in os.walk(path) for name in names)


def assert_is_step(state: TinyState, step: int) -> None:
  assert int(state.step) == step
  np.testing.assert_array_equal(state.weights, np.full((4, 3), float(step)))
  np.testing.assert_array_equal(state.bias, np.arange(5.0) + step)


@pytest.mark.parametrize("how", ["restore", "resume"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_falls_back_and_is_moved_aside(tmp_path, capsys, damage, how):
  directory = saved(str(tmp_path / "diffusion"))
  DAMAGE[damage](os.path.join(directory, "4"))
  left = files_under(os.path.join(directory, "4"))
  step2 = files_under(os.path.join(directory, "2"))
  pipeline = FakePipeline()
  with StageCheckpoints(directory, async_save=False) as ckpts:
    if how == "restore":
      state = ckpts.restore(tiny_state(0), what="diffusion")
    else:
      state = ckpts.resume(tiny_state(0), pipeline, "diffusion")
      assert pipeline.state == {"next_index": 2}
    assert_is_step(state, 2)
    assert ckpts.all_steps() == [2]
    assert ckpts.latest_step() == 2
    ckpts.save(4, tiny_state(4), {"next_index": 4}, force=True)  # the step that failed to read is saved again
    assert ckpts.all_steps() == [2, 4]

  warning = capsys.readouterr().err
  moved = os.path.join(directory, "4.unreadable")
  assert f"warning: diffusion: cannot read checkpoint step 4 ({os.path.join(directory, '4')}): " in warning
  assert f"moved it to {moved}" in warning
  assert "Using step 2, the newest readable one." in warning
  assert len([line for line in warning.splitlines() if "warning:" in line]) == 1
  assert files_under(moved) == left  # moved, not deleted
  assert files_under(os.path.join(directory, "2")) == step2
  with StageCheckpoints(directory, async_save=False) as ckpts:
    assert ckpts.all_steps() == [2, 4]
    assert_is_step(ckpts.restore(tiny_state(0)), 4)
  assert "warning" not in capsys.readouterr().err


def test_second_move_aside_gets_a_suffix(tmp_path, capsys):
  directory = saved(str(tmp_path / "autoencoder"))
  os.mkdir(os.path.join(directory, "4.unreadable"))  # left from an earlier fallback
  empty_state(os.path.join(directory, "4"))
  with StageCheckpoints(directory, async_save=False) as ckpts:
    assert_is_step(ckpts.restore(tiny_state(0)), 2)
  assert os.path.isdir(os.path.join(directory, "4.unreadable-1", "state"))
  assert os.listdir(os.path.join(directory, "4.unreadable")) == []
  assert "4.unreadable-1" in capsys.readouterr().err


def test_resume_treats_a_mismatched_data_state_as_unreadable(tmp_path, capsys):
  directory = saved(str(tmp_path / "diffusion"))
  with open(os.path.join(directory, "4", "data", "metadata"), "w") as f:
    f.write('{"next_index": 3}')
  pipeline = FakePipeline()
  with StageCheckpoints(directory, async_save=False) as ckpts:
    assert_is_step(ckpts.resume(tiny_state(0), pipeline, "diffusion"), 2)
  assert pipeline.state == {"next_index": 2}
  assert "input-pipeline state {'next_index': 3} does not match its step 4" in capsys.readouterr().err
  assert os.path.isdir(os.path.join(directory, "4.unreadable"))


def test_no_readable_checkpoint_is_one_error_and_moves_nothing(tmp_path, capsys):
  directory = saved(str(tmp_path / "diffusion"))
  empty_state(os.path.join(directory, "4"))
  delete_metadata(os.path.join(directory, "2"))
  with StageCheckpoints(directory, async_save=False) as ckpts:
    with pytest.raises(CheckpointError) as error:
      ckpts.resume(tiny_state(0), FakePipeline(), "diffusion")
    assert ckpts.all_steps() == [2, 4]
  message = str(error.value)
  assert isinstance(error.value, ValueError)  # the command line prints ValueErrors as one line
  assert "\n" not in message
  assert message.startswith(f"diffusion: no checkpoint in {directory} can be read (tried step 4: ValueError: "
                            "pytree structure error")
  assert "; step 2: ValueError: pytree structure error" in message
  assert "Nothing was deleted." in message
  assert f"move {directory} aside or use a new --workdir." in message
  assert sorted(os.listdir(directory)) == ["2", "4"]
  assert "warning" not in capsys.readouterr().err


def test_requested_step_that_fails_does_not_fall_back(tmp_path, capsys):
  directory = saved(str(tmp_path / "diffusion"))
  truncate_data(os.path.join(directory, "4"))
  with StageCheckpoints(directory, async_save=False) as ckpts:
    with pytest.raises(CheckpointError) as error:
      ckpts.restore(tiny_state(0), step=4, what="diffusion")
  message = str(error.value)
  assert message.startswith(f"diffusion: cannot read checkpoint step 4 ({os.path.join(directory, '4')}): "
                            "ValueError: OUT_OF_RANGE")
  assert "tensorstore_spec" not in message and "\n" not in message
  assert message.endswith(f"Other steps in {directory}: [2].")
  assert sorted(os.listdir(directory)) == ["2", "4"]
  assert "warning" not in capsys.readouterr().err


def test_restore_checkpoint_reads_without_moving_or_creating(tmp_path, capsys):
  directory = saved(str(tmp_path / "diffusion"))
  delete_metadata(os.path.join(directory, "4"))
  assert_is_step(restore_checkpoint(directory, tiny_state(0), what="diffusion"), 2)
  assert "left it in place. Using step 2" in capsys.readouterr().err
  assert sorted(os.listdir(directory)) == ["2", "4"]  # a reader leaves the move to the next training run

  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="No diffusion checkpoint in"):
    restore_checkpoint(str(empty / "diffusion"), tiny_state(0), what="diffusion")
  with pytest.raises(FileNotFoundError, match="No checkpoint in"):
    restore_checkpoint(str(empty), tiny_state(0))
  assert os.listdir(empty) == []


def test_first_stage_from_an_empty_directory_creates_nothing(tmp_path):
  config = smoke.get_config()
  config.stages = ("diffusion",)
  config.first_stage.checkpoint = str(tmp_path / "elsewhere")
  os.mkdir(config.first_stage.checkpoint)
  with pytest.raises(FileNotFoundError, match="No first-stage checkpoint in .*elsewhere/autoencoder"):
    states.restore_first_stage_params(config, str(tmp_path / "run"))
  assert sorted(os.listdir(tmp_path)) == ["elsewhere"]
  assert os.listdir(config.first_stage.checkpoint) == []
