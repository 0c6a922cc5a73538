"""The generic training loop shared by both stages: progress bar, logging, checkpoints, NaN guard."""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from concept_diffusion.checkpoint import StageCheckpoints
from concept_diffusion.train.writer import MetricWriter

StepFn = Callable[[Any, jax.Array, jax.Array], tuple[Any, dict]]


def run_loop(*, stage: str, state: Any, start_step: int, num_steps: int, step_fn: StepFn,
             batch_fn: Callable[[int], jax.Array], rng: jax.Array, ckpts: StageCheckpoints, writer: MetricWriter,
             log_every: int, checkpoint_every: int, batch_size: int,
             hooks: Sequence[tuple[int, Callable[[int, Any], None]]] = ()) -> Any:
  """Runs steps [start_step, num_steps); returns the final state (checkpointed).

  Metrics stay on device between log points (no per-step host sync); at a log point they are fetched,
  checked for NaN/Inf (which stops the run before it is checkpointed, so the last good checkpoint
  survives), and written. Each hook `(every, fn)` runs as fn(step, state) after every `every` steps.
  """
  bar = tqdm(total=num_steps, initial=start_step, desc=stage, unit="step", dynamic_ncols=True, mininterval=1.0,
             smoothing=0.1)
  pending: list[dict] = []
  last_time, last_step = time.perf_counter(), start_step
  for step in range(start_step, num_steps):
    state, metrics = step_fn(state, batch_fn(step), jax.random.fold_in(rng, step))
    pending.append(metrics)
    bar.update(1)
    done = step + 1
    if done % log_every == 0 or done == num_steps:
      host = jax.device_get(pending)
      pending = []
      mean = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
      bad = [k for k, v in mean.items() if not np.isfinite(v)]
      if bad:
        bar.close()
        raise FloatingPointError(
            f"{stage}: {', '.join(bad)} became NaN/Inf by step {done}; stopping without saving. The last good "
            f"checkpoint (step {ckpts.latest_step()}) is untouched. Lower the learning rate or check the data.")
      now = time.perf_counter()
      rate = (done - last_step) / max(now - last_time, 1e-9)
      last_time, last_step = now, done
      mean.update(steps_per_s=rate, images_per_s=rate * batch_size)
      writer.scalars(done, mean, stage)
      loss = mean.get("loss", mean.get("total_loss", float("nan")))
      bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{rate:.2f}", img_s=f"{rate * batch_size:.0f}")
    if done % checkpoint_every == 0 or done == num_steps:
      ckpts.save(done, state, force=True)
    for every, hook in hooks:
      if every > 0 and done % every == 0:
        hook(done, state)
  bar.close()
  ckpts.wait()
  writer.flush()
  return state
