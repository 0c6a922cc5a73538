"""Subprocess worker for tests/test_parallel.py: runs on 8 fake CPU devices (XLA_FLAGS set by the caller).

  python tests/parallel_worker.py steps OUT.npz      one step of both stages on several meshes
  python tests/parallel_worker.py remesh DIR OUT.npz save on (2,4), restore on (8,1) and on one device

Results go to an .npz the test compares; the worker itself asserts nothing.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from concept_diffusion import parallel, states  # noqa: E402
from concept_diffusion.checkpoint import StageCheckpoints  # noqa: E402
from concept_diffusion.tools import benchmark  # noqa: E402
from concept_diffusion.train import diffusion_stage, first_stage  # noqa: E402
from configs import smoke  # noqa: E402

# (2, 4) is covered by the remesh test, which saves a state sharded on it: one fewer pair of step compiles here.
MESHES = ((1, 1), (8, 1), (4, 2), (1, 8))


def sharded_config():
  """Smoke, cut further (one UNet level): every mesh compiles both steps, so compile time rules."""
  config = smoke.get_config()
  config.train.batch_size = 8
  config.first_stage.batch_size = 8
  config.first_stage.disc_layers = 1
  config.unet.channel_mult = (1,)
  config.unet.attention_resolutions = (1,)
  config.encoder.width = 8
  config.mesh.fsdp_min_size = 64  # so that the tiny model really gets sharded
  return config


def mesh_of(shape):
  data, fsdp = shape
  return parallel.make_mesh(parallel_config(data, fsdp), jax.devices()[:data * fsdp])


def parallel_config(data, fsdp):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


def flat(tree, prefix):
  return {f"{prefix}/{jax.tree_util.keystr(path)}": np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def spec_report(tree):
  """'path=spec' lines for every array that is not replicated."""
  return [f"{jax.tree_util.keystr(p)}={leaf.sharding.spec}" for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if any(s is not None for s in leaf.sharding.spec)]


def num_devices(tree):
  return max(len(leaf.sharding.device_set) for leaf in jax.tree_util.tree_leaves(tree))


def steps(out):
  config = sharded_config()
  images = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (8, 16, 16, 3), minval=-1, maxval=1))
  rng = jax.random.PRNGKey(7)
  # Initial states computed once and placed onto each mesh: only the steps compile per mesh.
  model, tx, _ = states.build_diffusion(config)
  fs_init = jax.device_get(jax.jit(lambda k: states.create_first_stage_state(config, k))(rng))
  init = jax.device_get(jax.jit(lambda k: states.create_state(model, tx, k))(rng))
  results = {}
  for shape in MESHES:
    mesh = mesh_of(shape)
    name = f"{shape[0]}x{shape[1]}"
    batch = jax.device_put(images, parallel.batch_sharding(mesh))
    fs_state = jax.device_put(fs_init, states.first_stage_state_shardings(config, mesh))
    fs_state, fs_metrics = first_stage.make_train_step(config, mesh)(fs_state, batch, rng)
    results.update(flat(fs_state, f"{name}/first_stage"))
    results[f"{name}/first_stage/loss"] = np.asarray(fs_metrics["total_loss"])
    state = jax.device_put(init, states.diffusion_state_shardings(model, tx, mesh, config.mesh.fsdp_min_size))
    step = diffusion_stage.step_for_config(config, model, mesh)[1]
    # Compiled as the benchmark does: GSPMD's remat warnings counted, the collectives against the minimum.
    lower = lambda: step.lower(state, batch, fs_state.ae_params, rng)
    compiled, *_, remat, _ = benchmark._compile_counting_remat(benchmark._CacheProbe(), lower, True)
    comm = benchmark.communication(compiled, model, state, fs_state.ae_params, batch, mesh)
    results[f"{name}/diffusion_comm"] = np.array([comm["collective_bytes_per_step"],
                                                  comm["min_collective_bytes_per_step"], remat])
    state, metrics = compiled(state, batch, fs_state.ae_params, rng)
    results.update(flat(state, f"{name}/diffusion"))
    results[f"{name}/diffusion/loss"] = np.asarray(metrics["loss"])
    results[f"{name}/specs"] = np.array(spec_report(state) + spec_report(fs_state) or [""])
    results[f"{name}/batch_sharding"] = np.array([str(batch.sharding.spec)])
    print(name, "done", flush=True)
  np.savez(out, **results)


def remesh(directory, out):
  config = sharded_config()
  rng = jax.random.PRNGKey(5)
  model, tx, _ = states.build_diffusion(config)
  state = diffusion_stage.create_sharded_state(model, tx, rng, mesh_of((2, 4)), config.mesh.fsdp_min_size)
  ckpts = StageCheckpoints(directory)
  ckpts.save(1, state, {"next_index": 1}, force=True)
  ckpts.wait()
  results = flat(state, "saved")
  results["saved/specs"] = np.array(spec_report(state))
  abstract = states.abstract_state(model, tx)
  for name, mesh in (("8x1", mesh_of((8, 1))), ("1x8", mesh_of((1, 8)))):
    restored = ckpts.restore(parallel.with_shardings(abstract, states.diffusion_state_shardings(model, tx, mesh,
                                                                                      config.mesh.fsdp_min_size)))
    results.update(flat(restored, name))
    results[f"{name}/specs"] = np.array(spec_report(restored) or [""])
    results[f"{name}/num_devices"] = np.array(num_devices(restored))
  single = ckpts.restore(abstract)  # no sharding: onto one device
  results.update(flat(single, "single"))
  results["single/num_devices"] = np.array(num_devices(single))
  results["data_state"] = np.array(ckpts.restore_data_state(1)["next_index"])
  ckpts.close()
  np.savez(out, **results)


if __name__ == "__main__":
  {"steps": lambda: steps(sys.argv[2]), "remesh": lambda: remesh(sys.argv[2], sys.argv[3])}[sys.argv[1]]()
