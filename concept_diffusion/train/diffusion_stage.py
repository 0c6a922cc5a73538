"""The concept-diffusion stage: its state, optimiser, EMA and the train step.

Encoder and UNet are trained jointly by `EncDiff.loss` (the plain noise-prediction loss, no other term); the UNet
is EMA-averaged, the encoder is not (official `LitEma(self.model)`). The step is made once by closing over the
built model, optimiser and learning-rate schedule (`make_train_step`), then jitted over the mesh.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from concept_diffusion import parallel, states
from concept_diffusion.models.encdiff import EncDiff
from concept_diffusion.states import DiffusionState, create_state, diffusion_state_shardings
from concept_diffusion.train import jit_step


def create_sharded_state(model: EncDiff, tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh,
                         fsdp_min_size: int) -> DiffusionState:
  """A fresh state initialised directly into its shardings (every process computes the same values)."""
  return jit_step.create_sharded(functools.partial(create_state, model, tx), rng,
                                 diffusion_state_shardings(model, tx, mesh, fsdp_min_size))


def ema_decay(max_decay: float, num_updates: jax.Array) -> jax.Array:
  """LitEma: min(decay, (1 + n) / (10 + n)) with n counted after the increment."""
  n = num_updates.astype(jnp.float32)
  return jnp.minimum(max_decay, (1 + n) / (10 + n))


def train_step(state: DiffusionState, images: jax.Array, ae_params: Any, rng: jax.Array, *, model: EncDiff,
               tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
               max_ema_decay: float) -> tuple[DiffusionState, dict[str, jax.Array]]:
  """One optimiser step on a batch of images in [-1, 1]; a pure function of its arguments."""
  latents = jax.lax.stop_gradient(model.latents(ae_params, images)) * state.scale_factor
  loss_fn = lambda params: model.loss(params, state.batch_stats, images, latents, rng)
  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay(max_ema_decay, state.step + 1)
  ema_unet = jax.tree_util.tree_map(lambda e, p: e - (1 - decay) * (e - p), state.ema_unet, params["unet"])
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(state.step), "ema_decay": decay}
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                       ema_unet=ema_unet), metrics


def make_train_step(model: EncDiff, tx: optax.GradientTransformation, lr_schedule: optax.Schedule, mesh: Mesh, *,
                    max_ema_decay: float, fsdp_min_size: int, abstract_ae_params: Any = None) -> Callable:
  """The jitted, sharded step fn(state, images, ae_params, rng) -> (state, metrics); `rng` is the stage's constant
  key (the step is folded in inside). Compiled once per call of this function and input shapes; the state is
  donated. `abstract_ae_params`: the first stage's parameters (shapes) to shard like the state (None: pixels)."""
  step = functools.partial(train_step, model=model, tx=tx, lr_schedule=lr_schedule, max_ema_decay=max_ema_decay)
  return jit_step.jit_train_step(step, mesh, diffusion_state_shardings(model, tx, mesh, fsdp_min_size),
                                 (parallel.fsdp_shardings(abstract_ae_params, mesh, fsdp_min_size),))


def step_for_config(config, model: EncDiff, mesh: Mesh) -> tuple[optax.GradientTransformation, Callable]:
  """(optimiser, jitted step) for `model` as the config's train section and mesh ask; what the trainer runs."""
  parallel.check_batch_size(config.train.batch_size, mesh)
  tx, lr_schedule = states.diffusion_optimizer(config.train)
  return tx, make_train_step(model, tx, lr_schedule, mesh, max_ema_decay=config.train.ema_decay,
                             fsdp_min_size=config.mesh.fsdp_min_size, abstract_ae_params=model.abstract_ae_params())


def compute_scale_factor(model: EncDiff, ae_params: Any, images: jax.Array) -> jax.Array:
  """scale_by_std: 1 / std (unbiased, as torch) of the first batch's latents."""
  latents = jax.jit(model.latents)(ae_params, images)
  return (1.0 / jnp.std(latents, ddof=1)).astype(jnp.float32)
