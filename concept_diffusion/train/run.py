"""`train(config, workdir)`: every stage the config lists, skipping finished ones and resuming the rest."""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from tqdm.auto import tqdm

from concept_diffusion import data as data_lib
from concept_diffusion import generate, visualize
from concept_diffusion.checkpoint import StageCheckpoints
from concept_diffusion.data.sampling import batch_indices
from concept_diffusion.evaluation.evaluate import evaluate_run, format_table
from concept_diffusion.train import diffusion_stage, first_stage
from concept_diffusion.train.loop import run_loop
from concept_diffusion.train.workdir import check_or_write_config, computation_config, validate_config
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


def make_batch_fn(dataset, batch_size: int, seed: int):
  render = jax.jit(dataset.images_jax) if dataset.renders_on_device else None

  def batch_fn(step: int) -> jax.Array:
    indices = batch_indices(step, batch_size, dataset.num_images, seed)
    return render(jnp.asarray(indices)) if render is not None else jnp.asarray(dataset.images(indices))
  return batch_fn


def _first_stage_dir(config, workdir: str) -> str:
  """Where the first stage lives: this workdir, or first_stage.checkpoint when this run does not train it."""
  source = workdir if "first_stage" in config.stages else (config.first_stage.checkpoint or workdir)
  return os.path.join(source, AE_DIR)


def _restore_ae_params(config, ckpts: StageCheckpoints) -> Any:
  create = functools.partial(first_stage.create_first_stage_state, config)
  return ckpts.restore(jax.eval_shape(create, jax.random.PRNGKey(0))).ae_params


@functools.lru_cache(maxsize=4)
def _jitted_first_stage_step(frozen_config):
  return jax.jit(functools.partial(first_stage.first_stage_train_step, config=frozen_config), donate_argnums=0)


def _first_stage_params(config, workdir: str, dataset, writer: MetricWriter, rng: jax.Array) -> Any:
  """Trains (or resumes, or skips) the first stage; returns its parameters (None in pixel space)."""
  fs = config.first_stage
  if fs.kind == "none":
    return None
  create = functools.partial(first_stage.create_first_stage_state, config)
  ckpts = StageCheckpoints(_first_stage_dir(config, workdir), keep=config.train.keep_checkpoints)
  if "first_stage" not in config.stages:
    if ckpts.latest_step() is None or ckpts.latest_step() < fs.num_steps:
      raise FileNotFoundError(
          f"No finished first-stage checkpoint in {ckpts.directory} (need step >= "
          f"first_stage.num_steps={fs.num_steps}, found {ckpts.latest_step()}). Add 'first_stage' to "
          "config.stages to train it, or point first_stage.checkpoint at a workdir that has one.")
    return _restore_ae_params(config, ckpts)
  latest = ckpts.latest_step() or 0
  if latest >= fs.num_steps and latest > 0:
    _say(f"first_stage: finished at step {latest}; skipping.")
    return _restore_ae_params(config, ckpts)
  state = ckpts.restore(jax.eval_shape(create, rng)) if latest else create(rng)
  step_fn = _jitted_first_stage_step(computation_config(config))
  state = run_loop(stage="first_stage", state=state, start_step=latest, num_steps=fs.num_steps, step_fn=step_fn,
                   batch_fn=make_batch_fn(dataset, fs.batch_size, config.seed), rng=jax.random.fold_in(rng, 1),
                   ckpts=ckpts, writer=writer, log_every=fs.log_every, checkpoint_every=fs.checkpoint_every,
                   batch_size=fs.batch_size)
  ckpts.close()
  return state.ae_params


def _diffusion_stage(config, workdir: str, dataset, ae_params: Any, writer: MetricWriter,
                     rng: jax.Array) -> tuple[diffusion_stage.DiffusionState, bool]:
  """The trained (or resumed, or restored) state, and whether any step ran in this call."""
  tc = config.train
  ckpts = StageCheckpoints(os.path.join(workdir, DIFFUSION_DIR), keep=tc.keep_checkpoints)
  create = functools.partial(diffusion_stage.create_diffusion_state, config)
  latest = ckpts.latest_step() or 0
  batch_fn = make_batch_fn(dataset, tc.batch_size, config.seed + 1)
  if latest:
    state = ckpts.restore(jax.eval_shape(create, rng))
  else:
    state = create(rng)
    state = state.replace(scale_factor=diffusion_stage.compute_scale_factor(computation_config(config), ae_params,
                                                                            batch_fn(0)))
    _say(f"diffusion: scale_factor = {float(state.scale_factor):.5f} (1/std of the first batch's latents)")
  if latest >= tc.num_steps:
    _say(f"diffusion: finished at step {latest}; skipping.")
    ckpts.close()
    return state, False
  train_step = diffusion_stage.make_train_step(config)
  step_fn = lambda s, images, key: train_step(s, images, ae_params, key)

  def evaluate_during_training(step: int, s: diffusion_stage.DiffusionState) -> None:
    if step < tc.num_steps and jax.process_index() == 0:  # the final evaluation uses the full metric set
      # Code tables are kept for the final evaluation only (480,000 x 20 floats = 38 MB each).
      scores, _ = evaluate_run(config, s, dataset, workdir, step, metrics=config.eval.train_metrics, progress=False,
                               save_codes=False)
      writer.scalars(step, scores, "eval")

  def figures_during_training(step: int, s: diffusion_stage.DiffusionState) -> None:
    if step < tc.num_steps and jax.process_index() == 0:
      visualize.write_run_figures(config, workdir, dataset, s, ae_params, jax.random.fold_in(rng, step),
                                  writer=writer, light=True)

  state = run_loop(stage="diffusion", state=state, start_step=latest, num_steps=tc.num_steps, step_fn=step_fn,
                   batch_fn=batch_fn, rng=jax.random.fold_in(rng, 2), ckpts=ckpts, writer=writer,
                   log_every=tc.log_every, checkpoint_every=tc.checkpoint_every, batch_size=tc.batch_size,
                   hooks=[(config.eval.every, evaluate_during_training), (tc.figure_every, figures_during_training)])
  ckpts.close()
  return state, True


def restore_diffusion_state(config, workdir: str, step: int | None = None) -> diffusion_stage.DiffusionState:
  """The diffusion-stage state of a run (latest step by default), with a clear error when there is none."""
  ckpts = StageCheckpoints(os.path.join(workdir, DIFFUSION_DIR), keep=config.train.keep_checkpoints)
  steps = ckpts.all_steps()
  if not steps:
    raise FileNotFoundError(f"No diffusion checkpoint in {os.path.join(workdir, DIFFUSION_DIR)}: train the run "
                            "first (experiments/train.py) or pass the right --workdir.")
  if step is not None and step not in steps:
    raise FileNotFoundError(f"No diffusion checkpoint at step {step} in {workdir}; available steps: {steps}.")
  create = functools.partial(diffusion_stage.create_diffusion_state, config)
  state = ckpts.restore(jax.eval_shape(create, jax.random.PRNGKey(0)), step)
  ckpts.close()
  return state


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
  validate_config(config)
  is_main = jax.process_index() == 0
  check_or_write_config(config, workdir, write=is_main)
  dataset = load_dataset(config)
  writer = MetricWriter(workdir, enabled=is_main)
  rng = jax.random.PRNGKey(config.seed)
  ae_params = _first_stage_params(config, workdir, dataset, writer, jax.random.fold_in(rng, 10))
  state, trained = None, True
  if "diffusion" in config.stages:
    state, trained = _diffusion_stage(config, workdir, dataset, ae_params, writer, jax.random.fold_in(rng, 20))
  if state is not None and config.eval.final and is_main:
    final_path = os.path.join(workdir, "eval", f"metrics_{int(state.step)}.json")
    if trained or not os.path.exists(final_path):
      scores, _ = evaluate_run(config, state, dataset, workdir, int(state.step))
      writer.scalars(int(state.step), scores, "eval")
      _say(f"evaluation at step {int(state.step)}:\n{format_table(scores)}")
  figures_exist = os.path.exists(os.path.join(workdir, "figures", "reconstructions.png"))
  if is_main and (trained or not figures_exist):
    for path in write_final_figures(config, workdir, dataset, state, ae_params, jax.random.fold_in(rng, 30), writer):
      _say(f"wrote {path}")
  writer.close()
  return state
