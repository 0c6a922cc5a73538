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

from concept_diffusion import data as data_lib
from concept_diffusion import parallel, states
from concept_diffusion.checkpoint import StageCheckpoints
from concept_diffusion.config import validate_config
from concept_diffusion.models.encdiff import EncDiff, build_model, compute_dtype_name
from concept_diffusion.train import diffusion_stage, first_stage, jit_step
from concept_diffusion.train.stage import OpenRun, Stage, make_pipeline, open_run, run_stage
from concept_diffusion.workdir import DIFFUSION_DIR, MetricWriter, eval_path, exists, figure_path, first_stage_dir


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


def _first_stage_params(config, workdir: str, dataset, writer: MetricWriter, rng: jax.Array, mesh: Mesh) -> Any:
  """Trains (or resumes, or skips) the first stage; returns its parameters (None in pixel space)."""
  fs = config.first_stage
  if fs.kind == "none":
    return None
  # A first stage taken from another run is only read: its directory is neither created nor changed.
  # The manager is closed on every exit, so no background save is cut off and nothing else is reported.
  with StageCheckpoints(first_stage_dir(config, workdir), keep=config.train.keep_checkpoints,
                        async_save=config.train.async_checkpoints, create="first_stage" in config.stages) as ckpts:
    if "first_stage" not in config.stages:
      return _finished_first_stage(config, ckpts, mesh).ae_params
    shardings = states.first_stage_state_shardings(config, mesh)
    stage = Stage(
        name="first_stage", num_steps=fs.num_steps, batch_size=fs.batch_size, log_every=fs.log_every,
        checkpoint_every=fs.checkpoint_every, abstract_state=states.abstract_first_stage_state(config),
        shardings=shardings, step=first_stage.make_train_step(config, mesh),
        init=lambda _: jit_step.create_sharded(functools.partial(states.create_first_stage_state, config), rng,
                                               shardings),
        pipeline=lambda: make_pipeline(config, dataset, fs.batch_size, config.seed, mesh, "first_stage.batch_size"))
    state, _ = run_stage(stage, ckpts, writer, jax.random.fold_in(rng, 1), config.train.on_nonfinite)
    return state.ae_params


def _finished_first_stage(config, ckpts: StageCheckpoints, mesh: Mesh) -> states.FirstStageState:
  """The first stage another run trained (first_stage.checkpoint), or a clear error when it is not finished."""
  fs = config.first_stage
  restored = states.restore_first_stage_state(config, ckpts, mesh) if ckpts.latest_step() is not None else None
  step = None if restored is None else int(jax.device_get(restored.step))
  if step is None or step < fs.num_steps:
    raise FileNotFoundError(
        f"No finished first-stage checkpoint in {ckpts.directory} (need step >= "
        f"first_stage.num_steps={fs.num_steps}, found {step}). Add 'first_stage' to "
        "config.stages to train it, or point first_stage.checkpoint at a workdir that has one.")
  return restored


def _diffusion_stage(config, workdir: str, dataset, model: EncDiff, ae_params: Any, writer: MetricWriter,
                     rng: jax.Array, mesh: Mesh, hooks: Hooks) -> tuple[states.DiffusionState, bool]:
  """The trained (or resumed, or finished) state, and whether any step ran in this call."""
  tc = config.train
  tx, train_step = diffusion_stage.step_for_config(config, model, mesh)
  shardings = states.diffusion_state_shardings(model, tx, mesh, config.mesh.fsdp_min_size)

  def init(pipeline) -> states.DiffusionState:
    state = diffusion_stage.create_sharded_state(model, tx, rng, mesh, config.mesh.fsdp_min_size)
    if model.first_stage is not None and tc.scale_by_std:
      scale = diffusion_stage.compute_scale_factor(model, ae_params, pipeline.batch_at(0))
      state = state.replace(scale_factor=jax.device_put(scale, shardings.scale_factor))
      parallel.say(f"diffusion: scale_factor = {float(jax.device_get(scale)):.5f} (1/std of the first batch's "
                   "latents)")
    return state

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

  stage = Stage(name="diffusion", num_steps=tc.num_steps, batch_size=tc.batch_size, log_every=tc.log_every,
                checkpoint_every=tc.checkpoint_every, abstract_state=states.abstract_state(model, tx),
                shardings=shardings, init=init, step=train_step.bind(ae_params),
                pipeline=lambda: make_pipeline(config, dataset, tc.batch_size, config.seed + 1, mesh,
                                               "train.batch_size"),
                hooks=[(config.eval.every, periodic(hooks.evaluate, log=True)),
                       (tc.figure_every, periodic(hooks.figures, log=False))],
                compute_dtype=compute_dtype_name(config))
  with StageCheckpoints(os.path.join(workdir, DIFFUSION_DIR), keep=tc.keep_checkpoints,
                        async_save=tc.async_checkpoints) as ckpts:
    return run_stage(stage, ckpts, writer, jax.random.fold_in(rng, 2), tc.on_nonfinite)


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
  with open_run(config, workdir) as run:
    return _train_stages(config, workdir, model, hooks, run)


def _train_stages(config: ml_collections.ConfigDict, workdir: str, model: EncDiff, hooks: Hooks,
                  run: OpenRun) -> states.DiffusionState | None:
  dataset, mesh, writer = run.dataset, run.mesh, run.writer
  rng = jax.random.PRNGKey(config.seed)
  ae_params = _first_stage_params(config, workdir, dataset, writer, jax.random.fold_in(rng, 10), mesh)
  state, trained = None, True
  if "diffusion" in config.stages:
    state, trained = _diffusion_stage(config, workdir, dataset, model, ae_params, writer,
                                      jax.random.fold_in(rng, 20), mesh, hooks)
  # Evaluation and figures run on process 0 from host copies (gathering is collective: every process joins).
  state, ae_params = parallel.fetch_to_host((state, ae_params), mesh)
  if run.is_main:
    snapshot = Snapshot(config, workdir, dataset, model, state, ae_params, 0 if state is None else int(state.step),
                        True, writer, jax.random.fold_in(rng, 30))
    if (state is not None and hooks.evaluate and config.eval.final
        and (trained or not exists(eval_path(workdir, "metrics", snapshot.step)))):
      scores = hooks.evaluate(snapshot)
      writer.scalars(snapshot.step, {**scores, **writer.progress("diffusion", snapshot.step)}, "eval")
      parallel.say(f"evaluation at step {snapshot.step}:\n{hooks.format_scores(scores)}")
      description = hooks.describe(snapshot) if hooks.describe else ""
      if description:
        parallel.say(description)
    figures_exist = exists(figure_path(workdir, "reconstructions.png"))
    if hooks.figures and config.sample.final_figures and (trained or not figures_exist):
      for path in hooks.figures(snapshot):
        parallel.say(f"wrote {path}")
  return state
