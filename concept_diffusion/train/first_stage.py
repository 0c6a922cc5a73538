"""First-stage (autoencoder) training: taming's VQLPIPSWithDiscriminator / LDM's LPIPSWithDiscriminator as pure
functions. The diffusion stage then uses the frozen autoencoder through EncDiff.latents / EncDiff.decode.

One `first_stage_train_step` does what Lightning does per batch with taming's two optimizers: an autoencoder
(generator) update, then a discriminator update, each with its own Adam(lr, b1=0.5, b2=0.9).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from concept_diffusion import parallel
from concept_diffusion.states import (FirstStageState, check_first_stage_kind, check_perceptual,
                                     first_stage_state_shardings,
                                     make_first_stage_optimizers)
from concept_diffusion.models import autoencoder
from concept_diffusion.train import jit_step

Array = jax.Array
PyTree = Any


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def first_stage_train_step(state: FirstStageState, images: Array, rng: Array, *, model: Any, disc: Any,
                           ae_tx: optax.GradientTransformation, disc_tx: optax.GradientTransformation,
                           fs: ml_collections.ConfigDict) -> tuple[FirstStageState, dict[str, Array]]:
  """One autoencoder update and one discriminator update on the same batch.

  Args:
    state: current state; donated by the caller's jit.
    images: (B, H, W, C) in [-1, 1].
    rng: this step's key (dropout and, for kind 'kl', the posterior sample).
    model, disc, ae_tx, disc_tx: the autoencoder, the discriminator and their optimisers (`step_fn` builds them
      once from the config and binds them).
    fs: config.first_stage (its loss weights; read when the step is traced).

  Returns:
    The new state and scalar metrics.

  Generator loss (taming): nll + d_weight * disc_factor * g_loss + reg_weight * reg, where
  d_weight = disc_weight * clip(|grad nll| / (|grad g_loss| + 1e-4), 0, 1e4), both gradients taken w.r.t. the
  decoder's conv_out kernel and the result treated as a constant. Both of those gradients, and the full gradient,
  are vector-Jacobian products of one forward pass cut at the reconstruction: the losses are cheap functions of
  xrec, and under jit XLA prunes the parts of the two kernel-only backward passes that the kernel does not need.

  Loss scaling follows the official loss classes: for 'vq' the nll is the mean over pixels (taming); for 'kl' it
  is summed per image and averaged over the batch, as LDM's LPIPSWithDiscriminator (with its logvar fixed at 0,
  since LDM's optimiser never updates it), so that kl_weight=1e-6 means what it means there.

  The discriminator update reuses this step's reconstruction (computed before the autoencoder update); Lightning
  recomputes it after the update. BatchNorm runs in train mode in all three discriminator passes (fake for the
  generator, then real and fake separately for the discriminator), chaining the running statistics in that
  order as PyTorch does.
  """
  kind = fs.kind
  dropout_rng, sample_rng = jax.random.split(rng)
  images = images.astype(jnp.float32)
  batch = images.shape[0]

  def ae_forward(params):
    if kind == "vq":
      xrec, reg, info = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
    else:
      xrec, kl, info = model.apply({"params": params}, images, rng=sample_rng, train=True,
                                   rngs={"dropout": dropout_rng})
      reg = jnp.sum(kl) / batch
    return (xrec, reg), info

  (xrec, reg_loss), ae_vjp, ae_info = jax.vjp(ae_forward, state.ae_params, has_aux=True)

  def nll_fn(xrec):
    rec = fs.pixel_weight * jnp.abs(images - xrec)
    return jnp.mean(rec) if kind == "vq" else jnp.sum(rec) / batch

  def g_fn(xrec):
    logits, new_vars = disc.apply({"params": state.disc_params, "batch_stats": state.disc_batch_stats}, xrec,
                                  train=True, mutable=["batch_stats"])
    return -jnp.mean(logits), new_vars["batch_stats"]

  nll, dnll_dx = jax.value_and_grad(nll_fn)(xrec)
  (g_loss, batch_stats), dg_dx = jax.value_and_grad(g_fn, has_aux=True)(xrec)

  no_reg = jnp.zeros_like(reg_loss)
  last_layer = lambda grads: grads["decoder"]["conv_out"]["kernel"]
  nll_grad = last_layer(ae_vjp((dnll_dx, no_reg))[0])
  g_grad = last_layer(ae_vjp((dg_dx, no_reg))[0])
  d_weight = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
  d_weight = jax.lax.stop_gradient(jnp.clip(d_weight, 0.0, 1e4) * fs.disc_weight)
  # taming's adopt_weight: the GAN terms (generator and discriminator) are off before disc_start.
  disc_factor = jnp.where(state.step >= fs.disc_start, fs.disc_factor, 0.0).astype(jnp.float32)
  g_scale = d_weight * disc_factor
  reg_weight = fs.codebook_weight if kind == "vq" else fs.kl_weight

  ae_grads = ae_vjp((dnll_dx + g_scale * dg_dx, jnp.full_like(reg_loss, reg_weight)))[0]
  ae_updates, ae_opt_state = ae_tx.update(ae_grads, state.ae_opt_state, state.ae_params)
  ae_params = optax.apply_updates(state.ae_params, ae_updates)
  total_loss = nll + g_scale * g_loss + reg_weight * reg_loss

  fake = jax.lax.stop_gradient(xrec)

  def d_loss_fn(disc_params):
    logits_real, v = disc.apply({"params": disc_params, "batch_stats": batch_stats}, images, train=True,
                                mutable=["batch_stats"])
    logits_fake, v = disc.apply({"params": disc_params, "batch_stats": v["batch_stats"]}, fake, train=True,
                                mutable=["batch_stats"])
    d_loss = disc_factor * hinge_d_loss(logits_real, logits_fake)
    return d_loss, (v["batch_stats"], jnp.mean(logits_real), jnp.mean(logits_fake))

  (d_loss, (disc_batch_stats, logits_real, logits_fake)), d_grads = jax.value_and_grad(
      d_loss_fn, has_aux=True)(state.disc_params)
  d_updates, disc_opt_state = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
  disc_params = optax.apply_updates(state.disc_params, d_updates)

  metrics = {
      "total_loss": total_loss,
      "nll_loss": nll,
      "l1": jnp.mean(jnp.abs(images - xrec)),
      "g_loss": g_loss,
      "d_weight": d_weight,
      "disc_factor": disc_factor,
      "disc_loss": d_loss,
      "logits_real": logits_real,
      "logits_fake": logits_fake,
  }
  if kind == "vq":
    metrics.update(codebook_loss=reg_loss, perplexity=ae_info["perplexity"], codebook_usage=ae_info["usage"])
  else:
    metrics.update(kl_loss=reg_loss, posterior_logvar=jnp.mean(ae_info["logvar"]))
  new_state = state.replace(step=state.step + 1, ae_params=ae_params, disc_params=disc_params,
                            disc_batch_stats=disc_batch_stats, ae_opt_state=ae_opt_state,
                            disc_opt_state=disc_opt_state)
  return new_state, metrics


def step_fn(config: ml_collections.ConfigDict) -> Callable:
  """step(state, images, rng) -> (state, metrics): `first_stage_train_step` closing over the autoencoder, the
  discriminator and both optimisers, built once here from the config (checked first: a kind the trainer cannot
  train, or LPIPS weights, stop here)."""
  fs = config.first_stage
  check_first_stage_kind(config)
  check_perceptual(fs)
  ae_tx, disc_tx = make_first_stage_optimizers(config)
  return functools.partial(first_stage_train_step, model=autoencoder.build_first_stage(fs, config.data.channels),
                           disc=autoencoder.build_discriminator(fs), ae_tx=ae_tx, disc_tx=disc_tx, fs=fs)


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The jitted, sharded `step_fn(config)`; compiled once per call of this function, state donated."""
  parallel.check_batch_size(config.first_stage.batch_size, mesh, "first_stage.batch_size")
  return jit_step.jit_train_step(step_fn(config), mesh, first_stage_state_shardings(config, mesh))
