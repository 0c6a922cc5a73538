"""The training loop every stage runs (train/stage.py): progress bar, logging, checkpoints, preemption, NaN guard."""
from __future__ import annotations

import signal
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
from tqdm.auto import tqdm

from concept_diffusion import interrupts
from concept_diffusion.checkpoint import StageCheckpoints
from concept_diffusion import perf
from concept_diffusion.workdir import MetricWriter

StepFn = Callable[[Any, jax.Array, jax.Array], tuple[Any, dict]]


class PreemptionWatch:
  """Notices an interrupt: SIGINT/SIGTERM in a single process (interrupts.deferred); JAX's preemption sync point
  across processes, where every host must stop at the same step (JAX's coordination service agrees on it; it also
  receives the TPU maintenance notice and SIGTERM)."""

  def __init__(self):
    self._signals = interrupts.deferred(enabled=jax.process_count() == 1)
    self.signum: int | None = None

  def __enter__(self) -> "PreemptionWatch":
    self._signals.__enter__()
    return self

  def __exit__(self, *exc) -> None:
    self._signals.__exit__(*exc)

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signum = signal.SIGTERM
      except RuntimeError:  # the coordination service runs without a preemption sync manager
        pass
    else:
      self.signum = self._signals.requested
    return self.signum is not None


def _summarise(pending: list[tuple[int, dict]]) -> tuple[dict[str, float], list[tuple[int, list[str]]]]:
  """Means over the steps whose update was applied, and [(step, non-finite metric names)] of the others."""
  host = jax.device_get(pending)
  bad = [(step, sorted(k for k, v in m.items() if not np.all(np.isfinite(v)))) for step, m in host
         if int(m.get("nonfinite", 0))]
  good = [m for _, m in host if not int(m.get("nonfinite", 0))]
  keys = [k for k in host[-1][1] if k != "nonfinite"]
  mean = {k: float(np.mean([m[k] for m in good])) if good else float("nan") for k in keys}
  return mean, bad


def _duration(seconds: float) -> str:
  if seconds == float("inf"):
    return "?"
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


def run_loop(*, stage: str, state: Any, num_steps: int, step_fn: StepFn, batches: Iterator[jax.Array],
             rng: jax.Array, ckpts: StageCheckpoints, writer: MetricWriter, log_every: int, checkpoint_every: int,
             batch_size: int, on_nonfinite: str = "stop", compute_dtype: str = "float32",
             hooks: Sequence[tuple[int, Callable[[int, Any], None]]] = ()) -> Any:
  """Runs steps [state.step, num_steps); returns the final state (checkpointed, saves finished).

  `batches` yields the global batch of each step in order and has get_state() (saved with each checkpoint).
  `step_fn(state, images, rng)` folds the step into the constant `rng` itself (see train/jit_step.py).
  Metrics stay on device between log points (no per-step host sync). A step whose loss or gradient was not
  finite left the state unchanged (the step drops it); with on_nonfinite="stop" the loop then ends with an
  error naming that step before anything is saved, with "skip" it counts it and goes on. On an interrupt
  (SIGINT, SIGTERM, or the TPU notice across hosts) it saves at the next step boundary and raises
  `interrupts.Interrupted` with the saved step.
  Each hook `(every, fn)` runs as fn(step, state) after every `every` steps; those steps are logged too.
  Every log record carries `images_seen` and `wall_s`: the stage's training seconds (compilation and checkpoint
  writes included, hooks such as evaluation excluded), continued across resumed invocations; `images_per_s`, and
  `mfu` where the step reports its FLOPs (a jit_step.TrainStep) and the device's peak for `compute_dtype` is
  known (perf.LoopMfu). The first record's rate includes the compilation.
  """
  start_step = int(jax.device_get(state.step))
  wall_s = writer.progress(stage, start_step).get("wall_s", 0.0) if start_step else 0.0
  # A progress bar on a terminal; elsewhere (SLURM logs, `gcloud ... --worker=all`, files) one plain line per log
  # point instead of a flood of carriage returns.
  main = jax.process_index() == 0
  plain = main and not sys.stderr.isatty()
  bar = tqdm(total=num_steps, initial=start_step, desc=stage, unit="step", dynamic_ncols=True, mininterval=1.0,
             smoothing=0.1, disable=not main or plain)
  pending: list[tuple[int, dict]] = []
  loop_mfu = perf.LoopMfu(step_fn, compute_dtype)
  last_time, last_step = time.perf_counter(), start_step
  with PreemptionWatch() as preemption:
    for step in range(start_step, num_steps):
      state, metrics = step_fn(state, next(batches), rng)
      pending.append((step + 1, metrics))
      bar.update(1)
      done = step + 1
      log_due = done % log_every == 0 or done == num_steps
      save_due = done % checkpoint_every == 0 or done == num_steps
      preempted = preemption.reached(done)
      hook_due = any(every > 0 and done % every == 0 for every, _ in hooks)
      if pending and (log_due or save_due or preempted or hook_due):
        mean, bad = _summarise(pending)
        pending = []
        if bad and on_nonfinite == "stop":
          bar.close()
          bad_step, names = bad[0]
          raise FloatingPointError(
              f"{stage}: {', '.join(names) or 'a metric'} became NaN/Inf at step {bad_step}; the run stopped and "
              f"that update was never applied or saved. Last good checkpoint: step {ckpts.latest_step()} in "
              f"{ckpts.directory}. Lower the learning rate or check the data, or set train.on_nonfinite='skip' to "
              "drop such steps and go on.")
        now = time.perf_counter()
        rate = (done - last_step) / max(now - last_time, 1e-9)
        wall_s += now - last_time
        last_time, last_step = now, done
        mean.update(steps_per_s=rate, images_per_s=rate * batch_size,
                    nonfinite_steps=float(jax.device_get(state.nonfinite_steps)), images_seen=done * batch_size,
                    wall_s=wall_s)
        utilisation = loop_mfu(rate)
        if utilisation is not None:
          mean["mfu"] = utilisation
        writer.scalars(done, mean, stage)
        loss = mean.get("loss", mean.get("total_loss", float("nan")))
        bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{rate:.2f}", img_s=f"{rate * batch_size:.0f}")
        if plain:
          eta = (num_steps - done) / rate if rate > 0 else float("inf")
          print(f"{stage} step {done}/{num_steps}  loss {loss:.4f}  {rate:.2f} steps/s  {rate * batch_size:.0f} img/s"
                f"  ETA {_duration(eta)}", file=sys.stderr, flush=True)
      if save_due or preempted:
        ckpts.save(done, state, batches.get_state(), force=True)
      if preempted:
        bar.close()
        ckpts.wait()
        writer.flush()
        raise interrupts.Interrupted(preemption.signum, saved_step=done, where=ckpts.directory)
      for every, hook in hooks:
        if every > 0 and done % every == 0:
          hook(done, state)
      if hook_due:  # neither the clock nor the next steps/s count the hooks' time
        last_time = time.perf_counter()
  bar.close()
  ckpts.wait()
  writer.flush()
  return state
