"""Surviving at scale: multi-process training, exact resume after SIGKILL, preemption, NaN guard, the pipeline.

Training runs in subprocesses (experiments/train.py) that share a persistent compilation cache, so runs of the
same config compile once. Meshes and sharding rules: tests/test_meshes.py.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion import data as data_lib
from concept_diffusion import parallel, states
from concept_diffusion.checkpoint import StageCheckpoints
from concept_diffusion.data.pipeline import InputPipeline
from concept_diffusion.models.encdiff import build_model
from concept_diffusion.train import diffusion_stage, loop
from concept_diffusion.workdir import MetricWriter, load_config
from configs import smoke
from conftest import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Pixel-space EncDiff with one UNet level on procedural Shapes at 16x16: the smallest real training run.
PIXEL_CONFIG = textwrap.dedent("""
    from configs import smoke

    def get_config():
      config = smoke.get_config()
      config.first_stage.kind = "none"
      config.stages = ("diffusion",)
      config.unet.channel_mult = (1,)
      config.unet.attention_resolutions = (1,)
      config.encoder.width = 8
      config.train.batch_size = 8
      config.train.num_steps = 6
      config.train.log_every = 2
      config.train.checkpoint_every = 2
      config.sample.final_figures = False
      config.mesh.fsdp_min_size = 64
      return config
""")


@pytest.fixture(scope="module")
def pixel_config_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("configs") / "pixel_smoke.py"
  path.write_text(PIXEL_CONFIG)
  return str(path)


def _train_cmd(config_path, workdir, *flags, script=os.path.join(REPO, "experiments", "train.py")):
  return [sys.executable, script, f"--config={config_path}", f"--workdir={workdir}", *flags]


def _train(config_path, workdir, env, *flags, timeout=900, script=os.path.join(REPO, "experiments", "train.py")):
  proc = subprocess.run(_train_cmd(config_path, workdir, *flags, script=script), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  return proc


def _final_state(workdir, step=None):
  config = load_config(workdir)
  ckpts = StageCheckpoints(os.path.join(workdir, "diffusion"))
  state = ckpts.restore(states.abstract_state(*states.build_diffusion(config)[:2]), step)
  data_state = ckpts.restore_data_state(step or ckpts.latest_step())
  ckpts.close()
  return jax.device_get(state), data_state


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# --- multi-process -----------------------------------------------------------------------------------------------

def test_two_processes_train_like_one_process_with_eight_devices(tmp_path, cache_dir, pixel_config_path):
  single = str(tmp_path / "single")
  proc = _train(pixel_config_path, single, subprocess_env(cache_dir, 8))
  assert proc.returncode == 0, proc.stderr[-3000:]
  multi = str(tmp_path / "multi")
  # Through the local launcher (experiments/launch.py): two pinned, single-threaded processes of 4 devices each.
  launcher = [sys.executable, os.path.join(REPO, "experiments", "launch.py"), "--processes=2", "--"]
  proc = subprocess.run(launcher + _train_cmd(pixel_config_path, multi), cwd=REPO, env=subprocess_env(cache_dir, 4),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh: {'data': 8, 'fsdp': 1} over 8 cpu device(s), 2 process(es)" in proc.stdout
  a, _ = _final_state(single)
  b, _ = _final_state(multi)
  assert int(a.step) == int(b.step) == 6
  la, lb = _leaves(a), _leaves(b)
  for key in la:
    np.testing.assert_allclose(lb[key], la[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # Only process 0 writes logs: one record per log step.
  with open(os.path.join(multi, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if json.loads(line)["stage"] == "diffusion"]
  assert steps == [2, 4, 6]


# --- exact resume after SIGKILL, also during an asynchronous save; preemption -----------------------------------

def test_sigkill_during_an_async_save_then_resume_is_bitwise_identical(tmp_path, cache_dir, pixel_config_path):
  env = subprocess_env(cache_dir, 1)
  straight = str(tmp_path / "straight")
  proc = _train(pixel_config_path, straight, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  killed = str(tmp_path / "killed")
  proc = _train(pixel_config_path, killed, dict(env, KILL_AFTER_SAVE_STEP="4"),
                script=os.path.join(REPO, "tests", "train_killed_after_save.py"))
  assert proc.returncode == -signal.SIGKILL
  ckpts = StageCheckpoints(os.path.join(killed, "diffusion"))
  survived = ckpts.latest_step()
  ckpts.close()
  assert survived in (2, 4)  # step 4's write may or may not have finished; step 2 is intact either way
  _, data_state = _final_state(killed)
  assert data_state == {"next_index": survived}
  proc = _train(pixel_config_path, killed, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  a, _ = _final_state(straight)
  b, data_state = _final_state(killed)
  assert data_state == {"next_index": 6}
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys()
  for key in la:
    np.testing.assert_array_equal(lb[key], la[key], err_msg=key)


def test_sigterm_saves_at_the_next_step_and_exits_zero(tmp_path, cache_dir, pixel_config_path):
  workdir = str(tmp_path / "preempted")
  proc = subprocess.Popen(_train_cmd(pixel_config_path, workdir, "--config.train.num_steps=100000",
                                     "--config.train.checkpoint_every=50000"),
                          cwd=REPO, env=subprocess_env(cache_dir, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0) and time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "interrupted (SIGTERM); saved step" in err
  state, data_state = _final_state(workdir)
  assert 2 <= int(state.step) < 100000
  assert data_state == {"next_index": int(state.step)}


# --- the non-finite guard ----------------------------------------------------------------------------------------

def _pixel_config():
  namespace = {}
  exec(PIXEL_CONFIG, namespace)  # pylint: disable=exec-used
  config = namespace["get_config"]()
  config.data.name = "tiny_blocks"
  return config


@pytest.fixture(scope="module")
def pixel_step():
  """(config, mesh, model, tx, jitted step) of the pixel config on tiny_blocks; the step compiles once per module."""
  config = _pixel_config()
  mesh = parallel.make_mesh(config.mesh)
  model = build_model(config)
  tx, step_fn = diffusion_stage.step_for_config(config, model, mesh)
  return config, mesh, model, tx, step_fn


class _Batches:
  """Batches of one fixed image set; NaN images at the given (0-based) steps."""

  def __init__(self, images, nan_steps):
    self.images, self.nan_steps, self.step = images, nan_steps, 0

  def __next__(self):
    images = self.images * np.nan if self.step in self.nan_steps else self.images
    self.step += 1
    return jnp.asarray(images)

  def get_state(self):
    return {"next_index": self.step}


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nan_is_never_applied_and_stops_or_is_counted(tmp_path, mode, pixel_step):
  config, mesh, model, tx, step_fn = pixel_step
  images = data_lib.get_dataset(config.data).images(np.arange(8))
  state = diffusion_stage.create_sharded_state(model, tx, jax.random.PRNGKey(0), mesh, config.mesh.fsdp_min_size)
  ckpts = StageCheckpoints(str(tmp_path / "diffusion"))
  writer = MetricWriter(str(tmp_path), enabled=True)
  kwargs = dict(stage="diffusion", num_steps=6, step_fn=lambda s, x, k: step_fn(s, x, None, k),
                batches=_Batches(images, {2}), rng=jax.random.PRNGKey(1), ckpts=ckpts, writer=writer, log_every=2,
                checkpoint_every=2, batch_size=8, on_nonfinite=mode)
  if mode == "stop":
    with pytest.raises(FloatingPointError, match=r"loss.* at step 3; .*Last good checkpoint: step 2"):
      loop.run_loop(state=state, **kwargs)
    ckpts.wait()
    assert ckpts.all_steps() == [2]
    saved = ckpts.restore(states.abstract_state(model, tx))
    assert int(saved.nonfinite_steps) == 0
  else:
    final = loop.run_loop(state=state, **kwargs)
    assert int(final.step) == 6 and int(final.nonfinite_steps) == 1
    assert all(np.isfinite(v).all() for v in jax.tree_util.tree_leaves(jax.device_get(final.params)))
    with open(tmp_path / "metrics.jsonl") as f:
      records = [json.loads(line) for line in f]
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 1]
    assert all(np.isfinite(r["loss"]) for r in records)
  ckpts.close()


def test_a_nan_step_leaves_the_state_as_it_was(pixel_step):
  config, mesh, model, tx, step_fn = pixel_step
  state = diffusion_stage.create_sharded_state(model, tx, jax.random.PRNGKey(0), mesh, config.mesh.fsdp_min_size)
  before = jax.device_get(state)
  after, metrics = step_fn(state, jnp.full((8, 16, 16, 3), jnp.nan), None, jax.random.PRNGKey(1))
  after = jax.device_get(after)
  assert int(metrics["nonfinite"]) == 1 and int(after.step) == 1 and int(after.nonfinite_steps) == 1
  for a, b in zip(jax.tree_util.tree_leaves(after.params), jax.tree_util.tree_leaves(before.params)):
    np.testing.assert_array_equal(a, b)


# --- the input pipeline ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny_blocks", "procedural_shapes"])
def test_pipeline_state_resumes_with_exactly_the_next_batch(name):
  config = smoke.get_config()
  config.data.name = name
  dataset = data_lib.get_dataset(config.data)
  mesh = parallel.make_mesh(config.mesh)
  first = InputPipeline(dataset, 8, seed=3, mesh=mesh, loader_threads=2, prefetch_batches=3)
  seen = [np.asarray(next(first)) for _ in range(9)]  # past the first epoch of tiny_blocks (60 images)
  state = first.get_state()
  assert state == {"next_index": 9}
  resumed = InputPipeline(dataset, 8, seed=3, mesh=mesh, loader_threads=2, prefetch_batches=3)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.asarray(next(resumed)), np.asarray(next(first)))
  np.testing.assert_array_equal(np.asarray(first.batch_at(4)), seen[4])
  np.testing.assert_array_equal(seen[4], dataset.images(first.indices(4)))
  assert not np.array_equal(seen[0], seen[1])
  with pytest.raises(ValueError, match="next_index"):
    resumed.set_state({"step": 3})


def test_pipeline_epochs_are_permutations_of_the_whole_dataset():
  config = smoke.get_config()
  config.data.name = "tiny_blocks"
  dataset = data_lib.get_dataset(config.data)
  pipeline = InputPipeline(dataset, 6, seed=0, mesh=parallel.make_mesh(config.mesh), loader_threads=0,
                           prefetch_batches=0)
  epoch = np.concatenate([pipeline.indices(s) for s in range(10)])
  assert sorted(epoch) == list(range(60))
  assert not np.array_equal(np.concatenate([pipeline.indices(s) for s in range(10, 20)]), epoch)
  np.testing.assert_array_equal(parallel.process_rows(pipeline.sharding, 6), np.arange(6))


def test_launcher_pins_one_core_each_and_stops_the_others_when_one_fails(tmp_path):
  """The launcher's own contract, with a stand-in command (tools/launch.py): each process gets its distributed
  flags, its own core and single-threaded XLA; a failing process ends the run with its code and the processes
  still waiting (in a collective, in a real run) are stopped instead of hanging."""
  from concept_diffusion.tools import launch  # pylint: disable=g-import-not-at-top
  assert launch.core_sets(2, [0, 1]) == [{0}, {1}]
  assert launch.core_sets(2, [0, 1, 2, 3, 4]) == [{0, 1, 2}, {3, 4}]
  assert launch.core_sets(3, [5]) == [{5}, {5}, {5}]
  report = tmp_path / "report"
  script = (f"import os, sys, json; pid = sys.argv[-1].split('=')[1]; "
            f"open(r'{report}' + pid, 'w').write(json.dumps([sys.argv[1:], sorted(os.sched_getaffinity(0)), "
            f"os.environ['XLA_FLAGS']]))")
  assert launch.launch([sys.executable, "-c", script], 2, env=dict(os.environ, XLA_FLAGS="--keep_me")) == 0
  cores = sorted(os.sched_getaffinity(0))
  for i in (0, 1):
    argv, affinity, xla_flags = json.loads((tmp_path / f"report{i}").read_text())
    assert argv[1:] == ["--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
    assert argv[0].startswith("--config.distributed.coordinator_address=127.0.0.1:")
    assert affinity == sorted(launch.core_sets(2, cores)[i])
    assert xla_flags == "--keep_me " + launch.SINGLE_THREAD_XLA_FLAGS
  # Process 1 fails at once; process 0 would sleep for 10 minutes.
  hang_or_fail = "import sys, time; sys.exit(7) if sys.argv[-1].endswith('=1') else time.sleep(600)"
  start = time.monotonic()
  assert launch.launch([sys.executable, "-c", hang_or_fail], 2, grace_s=5) == 7
  assert time.monotonic() - start < 60
