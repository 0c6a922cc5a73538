"""`train(config, workdir, hooks)`: every stage the config lists, skipping finished ones and resuming the rest.

Evaluation and figures are not the trainer's business: it calls `hooks` (experiments/train.py wires in
concept_diffusion.evaluation and concept_diffusion.visualize), during training and once the run is finished.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Callable, Optional

import jax
import ml_collections
from jax.sharding import Mesh
from tqdm.auto import tqdm

from concept_diffusion import data as data_lib
from concept_diffusion import parallel, states
from concept_diffusion.checkpoint import StageCheckpoints
from concept_diffusion.config import validate_config
from concept_diffusion.data.pipeline import InputPipeline
from concept_diffusion.models.encdiff import EncDiff, build_model, compute_dtype_name
from concept_diffusion.train import diffusion_stage, first_stage, jit_step
from concept_diffusion.train.loop import run_loop
from concept_diffusion.workdir import (DIFFUSION_DIR, MetricWriter, check_or_write_config, eval_path, exists,
                                       figure_path, first_stage_dir, workdir_lock)


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """A trained state as the hooks see it: host copies (evaluation and figures run on process 0)."""
  config: ml_collections.ConfigDict
  workdir: str
  dataset: data_lib.GroundTruthDataset
  model: EncDiff
  state: Optional[states.DiffusionState]  # has the fields of EncDiffVariables; None: no diffusion stage ran
  ae_params: Any
  step: int
  final: bool  # the finished run (full metric set, every figure) rather than a periodic check
  writer: MetricWriter
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class Hooks:
  """evaluate(snapshot) -> scores (logged to metrics.jsonl as stage "eval" and printed when final);
  figures(snapshot) -> paths written. Periodic calls follow eval.every / train.figure_every."""
  evaluate: Optional[Callable[[Snapshot], dict[str, float]]] = None
  figures: Optional[Callable[[Snapshot], list[str]]] = None
  format_scores: Callable[[dict[str, float]], str] = lambda scores: "\n".join(
      f"{k:<24}  {v:.4f}" for k, v in sorted(scores.items()))
  # describe(snapshot) -> text printed after the final scores (the per-factor lines: which token carries what).
  describe: Optional[Callable[[Snapshot], str]] = None


def _say(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.write(message)


def make_pipeline(config, dataset, batch_size: int, seed: int, mesh: Mesh, what: str) -> InputPipeline:
  return InputPipeline(dataset, batch_size, seed, mesh, loader_threads=config.data.loader_threads,
                       prefetch_batches=config.data.prefetch_batches, what=what)


def _first_stage_params(config, workdir: str, dataset, writer: MetricWriter, rng: jax.Array, mesh: Mesh) -> Any:
  """Trains (or resumes, or skips) the first stage; returns its parameters (None in pixel space)."""
  fs = config.first_stage
  if fs.kind == "none":
    return None
  # A first stage taken from another run is only read: its directory is neither created nor changed.
  # The manager is closed on every exit, so no background save is cut off and nothing else is reported.
  with StageCheckpoints(first_stage_dir(config, workdir), keep=config.train.keep_checkpoints,
                        async_save=config.train.async_checkpoints, create="first_stage" in config.stages) as ckpts:
    return _train_first_stage(config, dataset, ckpts, writer, rng, mesh)


def _train_first_stage(config, dataset, ckpts: StageCheckpoints, writer: MetricWriter, rng: jax.Array,
                       mesh: Mesh) -> Any:
  fs = config.first_stage
  if "first_stage" not in config.stages:
    restored = states.restore_first_stage_state(config, ckpts, mesh) if ckpts.latest_step() is not None else None
    step = None if restored is None else int(jax.device_get(restored.step))
    if step is None or step < fs.num_steps:
      raise FileNotFoundError(
          f"No finished first-stage checkpoint in {ckpts.directory} (need step >= "
          f"first_stage.num_steps={fs.num_steps}, found {step}). Add 'first_stage' to "
          "config.stages to train it, or point first_stage.checkpoint at a workdir that has one.")
    return restored.ae_params
  latest = ckpts.latest_step() or 0
  if latest >= fs.num_steps and latest > 0:
    restored = states.restore_first_stage_state(config, ckpts, mesh)
    step = int(jax.device_get(restored.step))
    if step >= fs.num_steps:
      _say(f"first_stage: finished at step {step}; skipping.")
      return restored.ae_params
    latest = step  # the finished checkpoint was unreadable: train on from the newest readable one
  shardings = states.first_stage_state_shardings(config, mesh)
  pipeline = make_pipeline(config, dataset, fs.batch_size, config.seed, mesh, "first_stage.batch_size")
  if latest:
    state = ckpts.resume(parallel.with_shardings(states.abstract_first_stage_state(config), shardings), pipeline,
                         "first_stage")
  else:
    state = jit_step.create_sharded(functools.partial(states.create_first_stage_state, config), rng, shardings)
  state = run_loop(stage="first_stage", state=state, num_steps=fs.num_steps,
                   step_fn=first_stage.make_train_step(config, mesh), batches=pipeline,
                   rng=jax.random.fold_in(rng, 1), ckpts=ckpts, writer=writer, log_every=fs.log_every,
                   checkpoint_every=fs.checkpoint_every, batch_size=fs.batch_size,
                   on_nonfinite=config.train.on_nonfinite)
  return state.ae_params


def _diffusion_stage(config, workdir: str, dataset, model: EncDiff, ae_params: Any, writer: MetricWriter,
                     rng: jax.Array, mesh: Mesh, hooks: Hooks) -> tuple[states.DiffusionState, bool]:
  """The trained (or resumed, or restored) state, and whether any step ran in this call."""
  tc = config.train
  tx, train_step = diffusion_stage.step_for_config(config, model, mesh)
  with StageCheckpoints(os.path.join(workdir, DIFFUSION_DIR), keep=tc.keep_checkpoints,
                        async_save=tc.async_checkpoints) as ckpts:
    return _train_diffusion(config, workdir, dataset, model, ae_params, writer, rng, mesh, hooks, tx, train_step,
                            ckpts)


def _train_diffusion(config, workdir: str, dataset, model: EncDiff, ae_params: Any, writer: MetricWriter,
                     rng: jax.Array, mesh: Mesh, hooks: Hooks, tx, train_step: jit_step.TrainStep,
                     ckpts: StageCheckpoints) -> tuple[states.DiffusionState, bool]:
  tc = config.train
  shardings = states.state_shardings(model, tx, mesh, config.mesh.fsdp_min_size)
  latest = ckpts.latest_step() or 0
  pipeline = make_pipeline(config, dataset, tc.batch_size, config.seed + 1, mesh, "train.batch_size")
  if latest:
    state = ckpts.resume(parallel.with_shardings(states.abstract_state(model, tx), shardings), pipeline,
                         "diffusion")
    latest = int(jax.device_get(state.step))  # an unreadable newest checkpoint falls back to an older one
  else:
    state = diffusion_stage.create_sharded_state(model, tx, rng, mesh, config.mesh.fsdp_min_size)
    if model.first_stage is not None and tc.scale_by_std:
      scale = diffusion_stage.compute_scale_factor(model, ae_params, pipeline.batch_at(0))
      state = state.replace(scale_factor=jax.device_put(scale, shardings.scale_factor))
      _say(f"diffusion: scale_factor = {float(jax.device_get(scale)):.5f} (1/std of the first batch's latents)")
  if latest >= tc.num_steps:
    _say(f"diffusion: finished at step {latest}; skipping.")
    return state, False

  host_ae_params = parallel.fetch_to_host(ae_params, mesh)

  def periodic(hook: Optional[Callable], log: bool) -> Callable[[int, Any], None]:
    def run(step: int, s: states.DiffusionState) -> None:
      if hook is None or step >= tc.num_steps:  # the finished run is evaluated and drawn in full afterwards
        return
      out = hook(Snapshot(config, workdir, dataset, model, s, host_ae_params, step, False, writer,
                          jax.random.fold_in(rng, step)))
      if log:
        writer.scalars(step, {**out, **writer.progress("diffusion", step)}, "eval")
    return parallel.on_main_host(run, mesh)

  state = run_loop(stage="diffusion", state=state, num_steps=tc.num_steps,
                   step_fn=train_step.bind(ae_params), batches=pipeline,
                   rng=jax.random.fold_in(rng, 2), ckpts=ckpts, writer=writer, log_every=tc.log_every,
                   checkpoint_every=tc.checkpoint_every, batch_size=tc.batch_size, on_nonfinite=tc.on_nonfinite,
                   compute_dtype=compute_dtype_name(config),
                   hooks=[(config.eval.every, periodic(hooks.evaluate, log=True)),
                          (tc.figure_every, periodic(hooks.figures, log=False))])
  return state, True


def train(config: ml_collections.ConfigDict, workdir: str, hooks: Hooks = Hooks()) -> states.DiffusionState | None:
  """Runs config.stages on the config's mesh; returns the diffusion state (on the host) or None.

  Parameters are initialised with JAX's non-partitionable threefry unless JAX_THREEFRY_PARTITIONABLE is set: XLA:CPU
  compiles the initialisation ~8x faster that way (37 s vs 4.5 s for the smoke encoder on 2 cores), and random
  values are independent of the sharding either way. Set here, not at import, so importing the package changes
  no global JAX flag.
  """
  with prng_context():
    return _train(config, workdir, hooks)


def prng_context():
  """JAX's non-partitionable threefry for a training run, unless JAX_THREEFRY_PARTITIONABLE says otherwise."""
  if "JAX_THREEFRY_PARTITIONABLE" in os.environ:
    return contextlib.nullcontext()
  return jax.threefry_partitionable(False)


def _train(config: ml_collections.ConfigDict, workdir: str, hooks: Hooks) -> states.DiffusionState | None:
  validate_config(config)
  model = build_model(config)  # checks the names the config gives (encoder, conditioning, ...) before any work
  is_main = jax.process_index() == 0
  with workdir_lock(workdir, enabled=is_main):
    return _train_locked(config, workdir, model, hooks, is_main)


def _train_locked(config: ml_collections.ConfigDict, workdir: str, model: EncDiff, hooks: Hooks,
                  is_main: bool) -> states.DiffusionState | None:
  check_or_write_config(config, workdir, write=is_main)
  dataset = data_lib.get_dataset(config.data)
  mesh = parallel.make_mesh(config.mesh)
  _say(f"mesh: {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} device(s), "
       f"{jax.process_count()} process(es)")
  writer = MetricWriter(workdir, enabled=is_main)
  rng = jax.random.PRNGKey(config.seed)
  ae_params = _first_stage_params(config, workdir, dataset, writer, jax.random.fold_in(rng, 10), mesh)
  state, trained = None, True
  if "diffusion" in config.stages:
    state, trained = _diffusion_stage(config, workdir, dataset, model, ae_params, writer,
                                      jax.random.fold_in(rng, 20), mesh, hooks)
  # Evaluation and figures run on process 0 from host copies (gathering is collective: every process joins).
  state, ae_params = parallel.fetch_to_host((state, ae_params), mesh)
  if is_main:
    snapshot = Snapshot(config, workdir, dataset, model, state, ae_params, 0 if state is None else int(state.step),
                        True, writer, jax.random.fold_in(rng, 30))
    if (state is not None and hooks.evaluate and config.eval.final
        and (trained or not exists(eval_path(workdir, "metrics", snapshot.step)))):
      scores = hooks.evaluate(snapshot)
      writer.scalars(snapshot.step, {**scores, **writer.progress("diffusion", snapshot.step)}, "eval")
      _say(f"evaluation at step {snapshot.step}:\n{hooks.format_scores(scores)}")
      description = hooks.describe(snapshot) if hooks.describe else ""
      if description:
        _say(description)
    figures_exist = exists(figure_path(workdir, "reconstructions.png"))
    if hooks.figures and config.sample.final_figures and (trained or not figures_exist):
      for path in hooks.figures(snapshot):
        _say(f"wrote {path}")
  writer.close()
  return state
