"""Faults a user can cause, each with the exit code, the one line it must print and what must survive it.

The command-line cases run the installed console scripts in subprocesses (what a user types); the concurrency and
interrupt case runs two real trainings on one workdir. Cases that need a filesystem this machine cannot provide
(read-only, full) raise the same OSError inside the command (cli.run) instead.
"""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion import interrupts
from concept_diffusion.checkpoint import StageCheckpoints
from concept_diffusion.evaluation.encode import encode_dataset
from concept_diffusion.tools import cli
from concept_diffusion.train.loop import run_loop
from concept_diffusion.workdir import LOCK_FILE, MetricWriter, WorkdirInUse, workdir_lock
from conftest import TinyBlocks, subprocess_env

BIN = os.path.dirname(sys.executable)


def _run(args, cwd, env=None, timeout=300):
  return subprocess.run([os.path.join(BIN, args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _one_line_error(proc, fragment: str, code: int = 2) -> None:
  assert proc.returncode == code, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert fragment in proc.stderr, proc.stderr[-3000:]


# (name, command after the script, expected fragment of the error line). Every one must stop before any work: the
# workdir is not created.
REFUSED_BEFORE_ANY_WORK = [
    ("keep_checkpoints_0", ["encdiff-train", "--config=smoke", "--config.train.keep_checkpoints=0"],
     "train.keep_checkpoints=0; it must be >= 1"),
    ("negative_lr", ["encdiff-train", "--config=smoke", "--config.train.lr=-1"], "train.lr=-1.0; it must be > 0"),
    ("negative_first_stage_steps", ["encdiff-train", "--config=smoke", "--config.first_stage.num_steps=-5"],
     "first_stage.num_steps=-5; it must be >= 0"),
    ("checkpoint_every_0", ["encdiff-train", "--config=smoke", "--config.train.checkpoint_every=0"],
     "train.checkpoint_every=0; it must be >= 1"),
    ("log_every_0", ["encdiff-train", "--config=smoke", "--config.first_stage.log_every=0"],
     "first_stage.log_every=0; it must be >= 1"),
    ("missing_config_file", ["encdiff-train", "--config=no/such/config.py"], "--config=no/such/config.py: no such file"),
    ("heads_do_not_divide", ["encdiff-summary", "--config=smoke", "--config.unet.num_heads=3"],
     "unet.num_heads=3 does not divide 16 channels"),
]


@pytest.mark.parametrize("name,args,fragment", REFUSED_BEFORE_ANY_WORK, ids=[c[0] for c in REFUSED_BEFORE_ANY_WORK])
def test_bad_values_are_refused_before_any_work(tmp_path, name, args, fragment):
  workdir = tmp_path / "w"
  extra = [f"--workdir={workdir}"] if args[0] == "encdiff-train" else []
  proc = _run(args + extra, cwd=tmp_path)
  _one_line_error(proc, fragment)
  assert not workdir.exists(), name


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  path = tmp_path / "taken"
  path.write_text("mine")
  proc = _run(["encdiff-train", "--config=smoke", f"--workdir={path}"], cwd=tmp_path)
  _one_line_error(proc, "is a file, not a directory")
  assert path.read_text() == "mine"


def test_an_invalid_config_json_is_named(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  proc = _run(["encdiff-evaluate", f"--workdir={tmp_path}"], cwd=tmp_path)
  _one_line_error(proc, f"{tmp_path / 'config.json'} is not a valid run config")
  assert (tmp_path / "config.json").read_text() == "{not json"


def test_an_empty_first_stage_checkpoint_dir_is_named_and_left_empty(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = _run(["encdiff-train", "--config=smoke", f"--workdir={tmp_path / 'w'}", "--config.stages=('diffusion',)",
               f"--config.first_stage.checkpoint={empty}"], cwd=tmp_path)
  _one_line_error(proc, "No finished first-stage checkpoint")
  assert list(empty.iterdir()) == []


@pytest.mark.parametrize("code,cause", [(errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left"),
                                        (errno.EACCES, "Permission denied")])
def test_filesystem_errors_are_one_line_naming_the_path(monkeypatch, capsys, code, cause):
  # Raised where the commands raise them (os.makedirs/open/Orbax): the message names the path and the cause.
  def main(argv):
    del argv
    raise OSError(code, os.strerror(code), "/data/runs/x/diffusion")
  monkeypatch.setattr(sys, "argv", ["encdiff-train"])
  monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and cause in err and "/data/runs/x/diffusion" in err


def test_verbose_shows_the_traceback(monkeypatch):
  def main(argv):
    del argv
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro")
  monkeypatch.setattr(sys, "argv", ["encdiff-train"])
  monkeypatch.setenv(cli.VERBOSE_ENV, "1")
  with pytest.raises(OSError):
    cli.run(main)


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x"}))
  with workdir_lock(str(tmp_path)):
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(WorkdirInUse, match=f"in use by process {os.getpid()} on {socket.gethostname()}"):
      with workdir_lock(str(tmp_path)):
        pass
  assert f"left by process {dead.pid}" in capsys.readouterr().err
  assert not (tmp_path / LOCK_FILE).exists()  # released
  # Another host's lock is never taken over: that process may be alive.
  (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": dead.pid, "started": "x"}))
  with pytest.raises(WorkdirInUse, match="on elsewhere"):
    with workdir_lock(str(tmp_path)):
      pass


class _InterruptedAfter(TinyBlocks):
  """TinyBlocks whose reads raise Interrupted (as Ctrl-C does in a command) after `batches` batches."""

  def __init__(self, batches: int):
    self.left = batches

  def images(self, indices):
    if self.left == 0:
      raise interrupts.Interrupted(signal.SIGINT)
    self.left -= 1
    return super().images(indices)


def test_an_interrupted_encoding_keeps_the_earlier_code_table(tmp_path):
  path = str(tmp_path / "codes_4.npy")
  encode = lambda scale, images: images.reshape(images.shape[0], -1)[:, :3] * scale  # noqa: E731
  first = np.asarray(encode_dataset(encode, 1.0, TinyBlocks(), 16, out_path=path, progress=False))
  with pytest.raises(interrupts.Interrupted):
    encode_dataset(encode, 2.0, _InterruptedAfter(2), 16, out_path=path, progress=False)
  np.testing.assert_array_equal(np.load(path), first)  # the earlier table, whole
  assert os.listdir(tmp_path) == ["codes_4.npy"]  # no temporary left behind
  encode_dataset(encode, 2.0, TinyBlocks(), 16, out_path=path, progress=False)
  np.testing.assert_array_equal(np.load(path), 2 * first)


def test_interrupt_exit_codes():
  assert interrupts.Interrupted(signal.SIGINT, saved_step=4).exit_code == 130
  assert interrupts.Interrupted(signal.SIGTERM, saved_step=4).exit_code == 0  # preempted and saved: restart it
  assert interrupts.Interrupted(signal.SIGTERM).exit_code == 143


def _steps(directory):
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def test_two_trainings_on_one_workdir_ctrl_c_and_a_damaged_checkpoint(tmp_path, cache_dir):
  """The second training stops at once naming the first; Ctrl-C saves the first at the next step and exits 130
  with one line; the lock is released; a later change of a resumable field to a bad value loses nothing; a resume
  whose newest checkpoint is unreadable goes on from the one before, which it names, and deletes nothing."""
  workdir = tmp_path / "w"
  train = ["encdiff-train", "--config=smoke", f"--workdir={workdir}", "--config.first_stage.kind=none",
           "--config.train.num_steps=100000", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
           "--config.sample.final_figures=False"]
  env = subprocess_env(cache_dir, 1)
  first = subprocess.Popen([os.path.join(BIN, train[0]), *train[1:]], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 600
    while not _steps(workdir / "diffusion") and time.time() < deadline:  # a first checkpoint is complete
      assert first.poll() is None, first.stderr.read()[-3000:]
      time.sleep(0.5)
    second = _run(train, cwd=tmp_path, env=env)
    _one_line_error(second, f"is in use by process {first.pid} on {socket.gethostname()}")
    assert first.poll() is None  # the first run goes on
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=300)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 130, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  saved = _steps(workdir / "diffusion")
  assert saved and f"interrupted (SIGINT); saved step {saved[-1]}" in err
  assert not (workdir / LOCK_FILE).exists()
  # keep_checkpoints may change on a resume, but never to a value that would delete every checkpoint.
  proc = _run(train + ["--config.train.keep_checkpoints=0"], cwd=tmp_path, env=env)
  _one_line_error(proc, "train.keep_checkpoints=0; it must be >= 1")
  assert _steps(workdir / "diffusion") == saved
  # The newest checkpoint damaged (its array metadata gone): the resume names it and goes on from the one before.
  newest, older = saved[-1], saved[-2]
  os.remove(workdir / "diffusion" / str(newest) / "state" / "_METADATA")
  proc = _run(train[:4] + ["--config.train.num_steps=%d" % (newest + 1)] + train[5:], cwd=tmp_path, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"cannot read checkpoint step {newest}" in proc.stderr and f"Using step {older}" in proc.stderr
  assert (workdir / "diffusion" / f"{newest}.unreadable").is_dir()
  assert _steps(workdir / "diffusion")[-1] == newest + 1


@flax.struct.dataclass
class _CountingState:
  step: jax.Array
  nonfinite_steps: jax.Array


class _Batches:
  def __init__(self):
    self.next_index = 0

  def __next__(self):
    self.next_index += 1
    return jnp.zeros((1,))

  def get_state(self):
    return {"next_index": self.next_index}


def test_a_signal_inside_the_loop_saves_at_the_next_step_then_stops(tmp_path):
  def step_fn(state, images, rng):
    del images, rng
    if int(state.step) == 2:
      os.kill(os.getpid(), signal.SIGINT)  # arrives during the step: the loop finishes it, saves, then stops
    return state.replace(step=state.step + 1), {"loss": jnp.float32(0.5), "nonfinite": jnp.int32(0)}

  before = signal.getsignal(signal.SIGINT)
  ckpts = StageCheckpoints(str(tmp_path / "stage"), async_save=False)
  writer = MetricWriter(str(tmp_path), enabled=False)
  state = _CountingState(step=jnp.int32(0), nonfinite_steps=jnp.int32(0))
  with pytest.raises(interrupts.Interrupted) as info:
    run_loop(stage="stage", state=state, num_steps=1000, step_fn=step_fn, batches=_Batches(),
             rng=jax.random.PRNGKey(0), ckpts=ckpts, writer=writer, log_every=1000, checkpoint_every=1000,
             batch_size=1)
  ckpts.close()
  assert info.value.saved_step == 3 and info.value.exit_code == 130
  assert "interrupted (SIGINT); saved step 3" in str(info.value)
  assert StageCheckpoints(str(tmp_path / "stage")).all_steps() == [3]
  assert signal.getsignal(signal.SIGINT) is before  # the loop's handler is gone with the loop


def test_outside_the_loop_a_signal_stops_at_once():
  before = {sig: signal.getsignal(sig) for sig in interrupts.SIGNALS}
  try:
    interrupts.install()
    with pytest.raises(interrupts.Interrupted) as info:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)  # the handler raises at the next bytecode; the sleep is never finished
    assert info.value.saved_step is None and info.value.exit_code == 143
  finally:
    for sig, handler in before.items():
      signal.signal(sig, handler)


def test_without_a_terminal_the_loop_logs_plain_lines(tmp_path, capsys):
  # SLURM and `--worker=all` output: no progress bar (no carriage returns), one line per log point with an ETA.
  ckpts = StageCheckpoints(str(tmp_path / "stage"), async_save=False)
  state = _CountingState(step=jnp.int32(0), nonfinite_steps=jnp.int32(0))
  step_fn = lambda s, images, rng: (s.replace(step=s.step + 1), {"loss": jnp.float32(0.5),  # noqa: E731
                                                                   "nonfinite": jnp.int32(0)})
  run_loop(stage="stage", state=state, num_steps=4, step_fn=step_fn, batches=_Batches(), rng=jax.random.PRNGKey(0),
           ckpts=ckpts, writer=MetricWriter(str(tmp_path), enabled=False), log_every=2, checkpoint_every=4,
           batch_size=8)
  ckpts.close()
  err = capsys.readouterr().err
  assert "\r" not in err
  lines = [line for line in err.splitlines() if line.startswith("stage step")]
  assert [line.split()[2] for line in lines] == ["2/4", "4/4"]
  assert all("loss 0.5000" in line and "img/s" in line and "ETA" in line for line in lines)
  assert lines[-1].endswith("ETA 0:00:00")


def test_a_full_disk_during_an_async_save_is_one_line_and_background_noise_is_dropped(monkeypatch, capsys):
  # What a full disk looks like here (seen with a 300 KB tmpfs workdir): Orbax's background threads log the error
  # with tracebacks, TensorStore's late callbacks meet a closed event loop, and the main thread gets a ValueError.
  import logging  # pylint: disable=g-import-not-at-top
  enospc = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/w/diffusion/2.orbax-checkpoint-tmp/x\": "
                      "Failed to write 360220 bytes to file 7: No space left on device [os_error_code='28']")

  def main(argv):
    del argv
    record = logging.LogRecord("absl", logging.ERROR, "/site-packages/orbax/checkpoint/future.py", 1,
                               "_SignalingThread.run() raised an exception", None, None)
    logging.getLogger().handle(record)
    sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"),
                                             exc_traceback=None, err_msg=None, object=None))
    raise enospc
  monkeypatch.setattr(sys, "argv", ["encdiff-train"])
  monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
  monkeypatch.setattr(sys, "excepthook", sys.excepthook)
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Event loop" not in err and "_SignalingThread" not in err
  assert "No space left on device" in err and "The disk is full" in err and "checkpoint is intact" in err
