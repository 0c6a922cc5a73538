"""`train(config, workdir)`: every stage the config lists, skipping finished ones and resuming the rest."""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh
from tqdm.auto import tqdm

from concept_diffusion import data as data_lib
from concept_diffusion import parallel, visualize
from concept_diffusion.checkpoint import StageCheckpoints, restore_checkpoint
from concept_diffusion.data.pipeline import InputPipeline
from concept_diffusion.evaluation.evaluate import evaluate_run, format_table
from concept_diffusion.train import diffusion_stage, first_stage, sharded
from concept_diffusion.train.loop import run_loop
from concept_diffusion.train.workdir import check_or_write_config, computation_config, eval_path, validate_config
from concept_diffusion.train.writer import MetricWriter, read_metrics

AE_DIR, DIFFUSION_DIR = "autoencoder", "diffusion"


def _say(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.write(message)


def load_dataset(config) -> data_lib.GroundTruthDataset:
  dataset = data_lib.get_dataset(config.data)
  expected = (config.data.image_size, config.data.image_size, config.data.channels)
  if tuple(dataset.image_shape) != expected:
    raise ValueError(f"Dataset {config.data.name!r} yields images of shape {tuple(dataset.image_shape)}, but the "
                     f"config expects {expected} (data.image_size, data.channels). Set them to match.")
  return dataset


def make_pipeline(config, dataset, batch_size: int, seed: int, mesh: Mesh, what: str) -> InputPipeline:
  return InputPipeline(dataset, batch_size, seed, mesh, loader_threads=config.data.loader_threads,
                       prefetch_batches=config.data.prefetch_batches, what=what)


def _first_stage_dir(config, workdir: str) -> str:
  """Where the first stage lives: this workdir, or first_stage.checkpoint when this run does not train it."""
  source = workdir if "first_stage" in config.stages else (config.first_stage.checkpoint or workdir)
  return os.path.join(source, AE_DIR)


def _restore_ae_params(config, ckpts: StageCheckpoints, mesh: Mesh | None = None) -> Any:
  template = first_stage.abstract_state(config)
  if mesh is not None:
    template = parallel.with_shardings(template, first_stage.state_shardings(config, mesh))
  return ckpts.restore(template).ae_params


def _first_stage_params(config, workdir: str, dataset, writer: MetricWriter, rng: jax.Array,
                        mesh: Mesh | None = None) -> Any:
  """Trains (or resumes, or skips) the first stage; returns its parameters (None in pixel space)."""
  fs = config.first_stage
  if fs.kind == "none":
    return None
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  ckpts = StageCheckpoints(_first_stage_dir(config, workdir), keep=config.train.keep_checkpoints,
                           async_save=config.train.async_checkpoints)
  if "first_stage" not in config.stages:
    if ckpts.latest_step() is None or ckpts.latest_step() < fs.num_steps:
      raise FileNotFoundError(
          f"No finished first-stage checkpoint in {ckpts.directory} (need step >= "
          f"first_stage.num_steps={fs.num_steps}, found {ckpts.latest_step()}). Add 'first_stage' to "
          "config.stages to train it, or point first_stage.checkpoint at a workdir that has one.")
    return _restore_ae_params(config, ckpts, mesh)
  latest = ckpts.latest_step() or 0
  if latest >= fs.num_steps and latest > 0:
    _say(f"first_stage: finished at step {latest}; skipping.")
    return _restore_ae_params(config, ckpts, mesh)
  shardings = first_stage.state_shardings(config, mesh)
  pipeline = make_pipeline(config, dataset, fs.batch_size, config.seed, mesh, "first_stage.batch_size")
  if latest:
    state = ckpts.resume(parallel.with_shardings(first_stage.abstract_state(config), shardings), pipeline,
                    "first_stage")
  else:
    state = sharded.create_sharded(functools.partial(first_stage.create_first_stage_state, config), rng, shardings)
  state = run_loop(stage="first_stage", state=state, num_steps=fs.num_steps,
                   step_fn=first_stage.make_train_step(config, mesh), batches=pipeline,
                   rng=jax.random.fold_in(rng, 1), ckpts=ckpts, writer=writer, log_every=fs.log_every,
                   checkpoint_every=fs.checkpoint_every, batch_size=fs.batch_size,
                   on_nonfinite=config.train.on_nonfinite)
  ckpts.close()
  return state.ae_params


def _diffusion_stage(config, workdir: str, dataset, ae_params: Any, writer: MetricWriter, rng: jax.Array,
                     mesh: Mesh | None = None) -> tuple[diffusion_stage.DiffusionState, bool]:
  """The trained (or resumed, or restored) state, and whether any step ran in this call."""
  tc = config.train
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  ckpts = StageCheckpoints(os.path.join(workdir, DIFFUSION_DIR), keep=tc.keep_checkpoints,
                           async_save=tc.async_checkpoints)
  shardings = diffusion_stage.state_shardings(config, mesh)
  latest = ckpts.latest_step() or 0
  pipeline = make_pipeline(config, dataset, tc.batch_size, config.seed + 1, mesh, "train.batch_size")
  if latest:
    state = ckpts.resume(parallel.with_shardings(diffusion_stage.abstract_state(config), shardings), pipeline,
                    "diffusion")
  else:
    state = diffusion_stage.create_sharded_state(config, rng, mesh)
    scale = diffusion_stage.compute_scale_factor(computation_config(config), ae_params, pipeline.batch_at(0))
    state = state.replace(scale_factor=jax.device_put(scale, shardings.scale_factor))
    _say(f"diffusion: scale_factor = {float(jax.device_get(scale)):.5f} (1/std of the first batch's latents)")
  if latest >= tc.num_steps:
    _say(f"diffusion: finished at step {latest}; skipping.")
    ckpts.close()
    return state, False

  def evaluate_during_training(step: int, s: diffusion_stage.DiffusionState) -> None:
    if step < tc.num_steps:  # the final evaluation uses the full metric set
      # Code tables are kept for the final evaluation only (480,000 x 20 floats = 38 MB each).
      scores, _ = evaluate_run(config, s, dataset, workdir, step, metrics=config.eval.train_metrics, progress=False,
                               save_codes=False, ae_params=host_ae_params)
      writer.scalars(step, {**scores, **writer.progress("diffusion", step)}, "eval")

  host_ae_params = parallel.fetch_to_host(ae_params, mesh)

  def figures_during_training(step: int, s: diffusion_stage.DiffusionState) -> None:
    if step < tc.num_steps:
      visualize.write_run_figures(config, workdir, dataset, s, host_ae_params, jax.random.fold_in(rng, step),
                                  writer=writer, light=True)

  train_step = diffusion_stage.make_train_step(config, mesh)
  state = run_loop(stage="diffusion", state=state, num_steps=tc.num_steps,
                   step_fn=lambda s, images, key: train_step(s, images, ae_params, key), batches=pipeline,
                   rng=jax.random.fold_in(rng, 2), ckpts=ckpts, writer=writer, log_every=tc.log_every,
                   checkpoint_every=tc.checkpoint_every, batch_size=tc.batch_size, on_nonfinite=tc.on_nonfinite,
                   hooks=[(config.eval.every, parallel.on_main_host(evaluate_during_training, mesh)),
                          (tc.figure_every, parallel.on_main_host(figures_during_training, mesh))])
  ckpts.close()
  return state, True


def restore_diffusion_state(config, workdir: str, step: int | None = None) -> diffusion_stage.DiffusionState:
  """The diffusion-stage state of a run (latest step by default), with a clear error when there is none."""
  return restore_checkpoint(os.path.join(workdir, DIFFUSION_DIR), diffusion_stage.abstract_state(config), step,
                            "diffusion")


def restore_first_stage_params(config, workdir: str) -> Any:
  """The trained first stage of a run (None in pixel space), with a clear error when it is missing."""
  if config.first_stage.kind == "none":
    return None
  ckpts = StageCheckpoints(_first_stage_dir(config, workdir), keep=config.train.keep_checkpoints)
  if ckpts.latest_step() is None:
    raise FileNotFoundError(f"No first-stage checkpoint in {ckpts.directory}.")
  params = _restore_ae_params(config, ckpts)
  ckpts.close()
  return params


def write_final_figures(config, workdir: str, dataset, state, ae_params: Any, rng: jax.Array,
                        writer: MetricWriter | None = None) -> list[str]:
  """Every figure of the run (visualize.write_run_figures); only the loss curves without a diffusion stage."""
  if state is None:
    path = os.path.join(workdir, "figures", "loss_curves.png")
    visualize.plot_curves(read_metrics(workdir), path)
    return [path]
  return visualize.write_run_figures(config, workdir, dataset, state, ae_params, rng, writer=writer)


def train(config: ml_collections.ConfigDict, workdir: str) -> diffusion_stage.DiffusionState | None:
  """Runs config.stages on the config's mesh; returns the diffusion state (on the host) or None."""
  validate_config(config)
  is_main = jax.process_index() == 0
  check_or_write_config(config, workdir, write=is_main)
  dataset = load_dataset(config)
  mesh = parallel.make_mesh(config.mesh)
  _say(f"mesh: {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} device(s), "
       f"{jax.process_count()} process(es)")
  writer = MetricWriter(workdir, enabled=is_main)
  rng = jax.random.PRNGKey(config.seed)
  ae_params = _first_stage_params(config, workdir, dataset, writer, jax.random.fold_in(rng, 10), mesh)
  state, trained = None, True
  if "diffusion" in config.stages:
    state, trained = _diffusion_stage(config, workdir, dataset, ae_params, writer, jax.random.fold_in(rng, 20), mesh)
  # Evaluation and figures run on process 0 from host copies (gathering is collective: every process joins).
  state, ae_params = parallel.fetch_to_host((state, ae_params), mesh)
  if state is not None and config.eval.final and is_main:
    if trained or not os.path.exists(eval_path(workdir, "metrics", state.step)):
      scores, _ = evaluate_run(config, state, dataset, workdir, int(state.step), ae_params=ae_params)
      writer.scalars(int(state.step), {**scores, **writer.progress("diffusion", int(state.step))}, "eval")
      _say(f"evaluation at step {int(state.step)}:\n{format_table(scores)}")
  figures_exist = os.path.exists(os.path.join(workdir, "figures", "reconstructions.png"))
  if is_main and config.sample.final_figures and (trained or not figures_exist):
    for path in write_final_figures(config, workdir, dataset, state, ae_params, jax.random.fold_in(rng, 30), writer):
      _say(f"wrote {path}")
  writer.close()
  return state
