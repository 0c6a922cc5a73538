"""Jitting a stage's train step over a mesh: explicit in/out shardings, donated state, the non-finite guard.

Every stage's step has the form step(state, images, *frozen_inputs, rng) -> (state, metrics). The wrapper
folds the state's step into the RNG inside the computation (so the host passes one constant key and the
per-step randomness is a pure function of (seed, step)), and drops an update whose metrics (loss, gradient
norm, ...) are not finite: the state then stays as it was except for its step and `nonfinite_steps`
counter, so a NaN never reaches a checkpoint.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from concept_diffusion import parallel
from concept_diffusion import perf


def all_finite(metrics: dict[str, jax.Array]) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(v)) for v in jax.tree_util.tree_leaves(metrics)
            if jnp.issubdtype(jnp.asarray(v).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guard_nonfinite(step_fn: Callable) -> Callable:
  """step_fn with the update dropped (state kept, step advanced, counter raised) when a metric is NaN/Inf."""

  def guarded(state, images, *args):
    *inputs, rng = args
    new_state, metrics = step_fn(state, images, *inputs, jax.random.fold_in(rng, state.step))
    finite = all_finite(metrics)
    kept = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    kept = kept.replace(step=state.step + 1, nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
    return kept, dict(metrics, nonfinite=(~finite).astype(jnp.int32))
  return guarded


def jit_train_step(step_fn: Callable, mesh: Mesh, state_shardings: Any, input_shardings: tuple = ()) -> Callable:
  """jit(guard_nonfinite(step_fn)) with the state sharded by rule, the batch over all devices, state donated.

  `input_shardings` are those of the arguments between the images and the RNG (e.g. frozen autoencoder
  parameters); the RNG and the metrics are replicated. The step is traced on the mesh, so the model's activation
  constraints (`parallel.shard_batch`) apply.
  """
  replicated = parallel.replicated(mesh)
  return TrainStep(jax.jit(parallel.traced_on(mesh, guard_nonfinite(step_fn)),
                           in_shardings=(state_shardings, parallel.batch_sharding(mesh), *input_shardings, replicated),
                           out_shardings=(state_shardings, replicated), donate_argnums=0), mesh.size)


class TrainStep:
  """A jitted train step that is compiled ahead of time on its first call, so that XLA's count of the compiled
  program's FLOPs (`flops_per_step`, all devices) is known to the loop's MFU without a second compile.

  `lower`/`trace` are the jitted function's (what the benchmark and experiments/lower.py use). A call whose
  arguments do not fit the first call's shapes or shardings goes through jit as usual.
  """

  def __init__(self, jitted: Callable, num_devices: int):
    self.jitted, self.num_devices = jitted, num_devices
    self.compiled = None
    self.flops_per_step: float | None = None

  def __getattr__(self, name: str) -> Any:
    return getattr(self.jitted, name)

  def __call__(self, *args):
    if self.compiled is None:
      self.compiled = self.jitted.lower(*args).compile()
      per_device = perf.compiled_flops(self.compiled)  # SPMD: the compiled program is one device's share
      self.flops_per_step = None if per_device is None else per_device * self.num_devices
    try:
      return self.compiled(*args)
    except (TypeError, ValueError):  # raised before execution (nothing donated yet): another signature
      return self.jitted(*args)

  def bind(self, *inputs) -> Callable:
    """step(state, images, rng) = self(state, images, *inputs, rng) (frozen inputs such as the autoencoder's
    parameters), keeping `flops_per_step` readable."""
    return _BoundStep(self, inputs)


class _BoundStep:

  def __init__(self, step: TrainStep, inputs: tuple):
    self.step, self.inputs = step, inputs

  @property
  def flops_per_step(self) -> float | None:
    return self.step.flops_per_step

  def __call__(self, state, images, rng):
    return self.step(state, images, *self.inputs, rng)


def create_sharded(create_fn: Callable[[jax.Array], Any], rng: jax.Array, shardings: Any) -> Any:
  """Initialises a state directly into its shardings (every process computes the same values)."""
  return jax.jit(create_fn, out_shardings=shardings)(rng)
