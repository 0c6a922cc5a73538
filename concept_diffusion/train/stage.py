"""One way to run a stage: resume it or start it, train it to its last step, or skip it when it is finished.

First stage, diffusion and the VAE baselines all describe themselves as a `Stage` (what the state is, how it is
sharded, initialised and stepped, where its batches come from, what runs during training) and call `run_stage`
with the stage's checkpoint folder. The loop itself (logging, saves, preemption, the non-finite guard) is
train/loop.py's.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
from jax.sharding import Mesh

from concept_diffusion import data as data_lib
from concept_diffusion import parallel
from concept_diffusion.checkpoint import StageCheckpoints
from concept_diffusion.data.pipeline import InputPipeline
from concept_diffusion.train.loop import StepFn, run_loop
from concept_diffusion.workdir import MetricWriter, check_or_write_config, workdir_lock


@dataclasses.dataclass(frozen=True)
class OpenRun:
  """What every stage of one training invocation shares."""
  dataset: data_lib.GroundTruthDataset
  mesh: Mesh
  writer: MetricWriter
  is_main: bool  # process 0: the one that writes files and runs evaluation and figures


@contextlib.contextmanager
def open_run(config: ml_collections.ConfigDict, workdir: str) -> Iterator[OpenRun]:
  """The workdir locked (a second training on it is refused), its config.json checked against `config` (or
  written), the dataset, the mesh, and the metric writer, closed on every exit. The config must be validated."""
  is_main = jax.process_index() == 0
  with workdir_lock(workdir, enabled=is_main):
    check_or_write_config(config, workdir, write=is_main)
    dataset = data_lib.get_dataset(config.data)
    mesh = parallel.make_mesh(config.mesh)
    parallel.say(f"mesh: {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} device(s), "
                 f"{jax.process_count()} process(es)")
    writer = MetricWriter(workdir, enabled=is_main)
    try:
      yield OpenRun(dataset, mesh, writer, is_main)
    finally:
      writer.close()


@dataclasses.dataclass(frozen=True)
class Stage:
  """What `run_stage` needs to know about a stage."""
  name: str  # "first_stage" | "diffusion" | "baseline": metrics.jsonl's stage and the progress bar's label
  num_steps: int
  batch_size: int
  log_every: int
  checkpoint_every: int
  abstract_state: Any  # the state's shapes and dtypes (jax.eval_shape of `init`)
  shardings: Any  # the state's NamedShardings (a pytree like the state)
  init: Callable[[InputPipeline], Any]  # init(batches): a fresh state, already placed in `shardings`
  step: StepFn  # step(state, images, rng) -> (state, metrics), jitted; rng constant (the step is folded in)
  pipeline: Callable[[], InputPipeline]  # the stage's batches; made only when the stage has steps to run
  # (every, fn(step, state)) run during training, e.g. periodic evaluation and figures.
  hooks: Sequence[tuple[int, Callable[[int, Any], None]]] = ()
  compute_dtype: str = "float32"  # for the loop's MFU


def make_pipeline(config, dataset, batch_size: int, seed: int, mesh, what: str) -> InputPipeline:
  """The stage's batches in the run's data order; `what` names the batch-size field in errors."""
  return InputPipeline(dataset, batch_size, seed, mesh, loader_threads=config.data.loader_threads,
                       prefetch_batches=config.data.prefetch_batches, what=what)


def run_stage(stage: Stage, ckpts: StageCheckpoints, writer: MetricWriter, rng: jax.Array,
              on_nonfinite: str) -> tuple[Any, bool]:
  """(the stage's state, whether any step ran in this call).

  A stage already at num_steps is restored and returned as it is, with a line saying so. Otherwise it resumes from
  the newest readable checkpoint (an unreadable newest one falls back to an older one, checkpoint.py) with the data
  iterator where it was, or starts from `stage.init(batches)`, and trains to num_steps.
  """
  template = parallel.with_shardings(stage.abstract_state, stage.shardings)
  latest = ckpts.latest_step() or 0
  if latest and latest >= stage.num_steps:  # finished: no batches needed
    state = ckpts.restore(template, what=stage.name)
    latest = int(jax.device_get(state.step))  # an unreadable newest checkpoint falls back to an older one
  if not latest or latest < stage.num_steps:
    pipeline = stage.pipeline()
    if latest:
      state = ckpts.resume(template, pipeline, stage.name)
      latest = int(jax.device_get(state.step))
    else:
      state = stage.init(pipeline)
  if latest >= stage.num_steps:  # also num_steps=0 (the untrained model, e.g. to score it)
    parallel.say(f"{stage.name}: finished at step {latest}; skipping.")
    return state, False
  state = run_loop(stage=stage.name, state=state, num_steps=stage.num_steps, step_fn=stage.step,
                   batches=pipeline, rng=rng, ckpts=ckpts, writer=writer, log_every=stage.log_every,
                   checkpoint_every=stage.checkpoint_every, batch_size=stage.batch_size, on_nonfinite=on_nonfinite,
                   compute_dtype=stage.compute_dtype, hooks=stage.hooks)
  return state, True
