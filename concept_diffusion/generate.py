"""Model-level generation: tokens from images, DDIM from tokens, decoding — all jitted, batched."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from concept_diffusion.diffusion import ddim_sample, make_schedule
from concept_diffusion.train import first_stage
from concept_diffusion.train.diffusion_stage import DiffusionState, build_models, latent_shape


def encode(config, state: DiffusionState, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(scalars (B, N), tokens (B, N, D)) with BatchNorm running statistics and the raw (non-EMA) encoder."""
  encoder, _ = build_models(config)
  return encoder.apply({"params": state.params["encoder"], "batch_stats": state.batch_stats}, images, train=False)


def tokens_from_scalars(config, state: DiffusionState, scalars: jax.Array) -> jax.Array:
  encoder, _ = build_models(config)
  return encoder.apply({"params": state.params["encoder"], "batch_stats": state.batch_stats}, scalars,
                       method="tokens")


@functools.partial(jax.jit, static_argnames=("config", "steps", "eta", "use_ema"))
def sample_from_tokens(config, state: DiffusionState, ae_params: Any, tokens: jax.Array, rng: jax.Array, *,
                       steps: int, eta: float, use_ema: bool = True) -> jax.Array:
  """Images (B, H, W, C) in about [-1, 1]: DDIM from x_T ~ N(0, I) conditioned on tokens, then decoded."""
  _, unet = build_models(config)
  unet_params = state.ema_unet if use_ema else state.params["unet"]
  noise_key, sample_key = jax.random.split(rng)
  x_T = jax.random.normal(noise_key, (tokens.shape[0],) + latent_shape(config))
  eps_fn = lambda x, t: unet.apply({"params": unet_params}, x, t, tokens)
  latents = ddim_sample(eps_fn, make_schedule(config.diffusion), x_T, sample_key, steps, eta)
  return first_stage.first_stage_decode(config, ae_params, latents / state.scale_factor)


@functools.partial(jax.jit, static_argnames=("config", "steps", "eta"))
def reconstruct(config, state: DiffusionState, ae_params: Any, images: jax.Array, rng: jax.Array, *, steps: int,
                eta: float) -> jax.Array:
  """DDIM reconstructions of images from their own tokens (EMA UNet), as the official log_images."""
  _, tokens = encode(config, state, images)
  return sample_from_tokens(config, state, ae_params, tokens, rng, steps=steps, eta=eta)


@functools.partial(jax.jit, static_argnames=("config",))
def first_stage_reconstruct(config, ae_params: Any, images: jax.Array) -> jax.Array:
  return first_stage.first_stage_decode(config, ae_params, first_stage.first_stage_encode(config, ae_params, images))


def as_uint8(images: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round((images + 1) * 127.5), 0, 255).astype(jnp.uint8)
