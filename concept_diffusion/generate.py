"""Model-level generation: tokens from images, DDIM from tokens, decoding — all jitted, batched."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from concept_diffusion.diffusion import ddim_sample, ddim_timesteps, make_schedule
from concept_diffusion.train import first_stage
from concept_diffusion.train.diffusion_stage import DiffusionState, build_models, is_one_shot, latent_shape


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
  if not use_ema:
    state = state.replace(ema_unet=state.params["unet"])
  return _sample(config, state, ae_params, tokens, rng, steps, eta)


def _sample(config, state, ae_params, tokens, rng, steps, eta, attention_side=None):
  """DDIM + decode; with `attention_side`, also the cross-attention maps at that query grid (B, side, side, N),
  averaged over heads, over the layers of that resolution and over the sampling steps."""
  _, unet = build_models(config)
  noise_key, sample_key = jax.random.split(rng)
  x_T = jax.random.normal(noise_key, (tokens.shape[0],) + latent_shape(config))
  schedule = make_schedule(config.diffusion)
  params = {"params": state.ema_unet}
  decode = lambda latents: first_stage.first_stage_decode(config, ae_params, latents / state.scale_factor)
  if is_one_shot(config):  # the "w/o diffusion" ablation decodes the tokens in one pass
    t0 = jnp.zeros((tokens.shape[0],), jnp.int32)
    if attention_side is None:
      return decode(unet.apply(params, x_T, t0, tokens))
    latents, inter = unet.apply(params, x_T, t0, tokens, mutable=["intermediates"])
    maps = _mean_attention(inter, attention_side)
    return decode(latents), maps.reshape(tokens.shape[0], attention_side, attention_side, tokens.shape[1])
  if attention_side is None:
    return decode(ddim_sample(lambda x, t: unet.apply(params, x, t, tokens), schedule, x_T, sample_key, steps, eta))

  def eps_and_maps(x, t):
    eps, inter = unet.apply(params, x, t, tokens, mutable=["intermediates"])
    return eps, _mean_attention(inter, attention_side)

  aux = jnp.zeros((tokens.shape[0], attention_side ** 2, tokens.shape[1]), jnp.float32)
  latents, maps = ddim_sample(eps_and_maps, schedule, x_T, sample_key, steps, eta, aux_init=aux)
  images = decode(latents)
  maps = maps / len(ddim_timesteps(schedule.num_timesteps, steps))
  return images, maps.reshape(tokens.shape[0], attention_side, attention_side, tokens.shape[1])


def _mean_attention(intermediates, side: int) -> jax.Array:
  """(B, side*side, N): the recorded cross-attention probabilities of the layers with that query grid, averaged
  over heads and layers."""
  maps = [p for p in jax.tree_util.tree_leaves(intermediates) if p.shape[2] == side ** 2]
  return jnp.mean(jnp.stack([m.mean(axis=1) for m in maps]), axis=0)


def attention_sides(config) -> tuple[int, ...]:
  """Query-grid sides that have cross-attention layers, finest first."""
  side = latent_shape(config)[0]
  return tuple(side // ds for ds in sorted(config.unet.attention_resolutions)
               if ds < 2 ** len(config.unet.channel_mult))


@functools.partial(jax.jit, static_argnames=("config", "steps", "eta", "side"))
def sample_with_attention(config, state: DiffusionState, ae_params: Any, tokens: jax.Array, rng: jax.Array, *,
                          steps: int, eta: float, side: int) -> tuple[jax.Array, jax.Array]:
  """(images, maps (B, side, side, N)); the images equal `sample_from_tokens`' for the same rng."""
  return _sample(config, state, ae_params, tokens, rng, steps, eta, attention_side=side)


@functools.partial(jax.jit, static_argnames=("config", "steps", "eta"))
def swap_grid(config, state: DiffusionState, ae_params: Any, sources: jax.Array, targets: jax.Array,
              rng: jax.Array, *, steps: int, eta: float) -> jax.Array:
  """(N + 1, B, H, W, C): row 0 samples each source from its own tokens; row k + 1 takes token k from the target.

  Every row uses the same noise (same rng, vmapped over rows), so a row differs from row 0 only through
  its swapped token; swapping in the source's own token reproduces row 0 exactly.
  """
  src, _ = encode(config, state, sources)
  tgt, _ = encode(config, state, targets)
  n = src.shape[1]
  swapped = jnp.where(jnp.eye(n, dtype=bool)[:, None, :], tgt[None], src[None])  # (N, B, N)
  scalars = jnp.concatenate([src[None], swapped], axis=0)
  tokens = jax.vmap(lambda s: tokens_from_scalars(config, state, s))(scalars)
  return jax.vmap(lambda tok: _sample(config, state, ae_params, tok, rng, steps, eta))(tokens)


@functools.partial(jax.jit, static_argnames=("config", "steps", "eta"))
def traversal_grid(config, state: DiffusionState, ae_params: Any, source: jax.Array, values: jax.Array,
                   rng: jax.Array, *, steps: int, eta: float) -> jax.Array:
  """(N, V, H, W, C): token k of one source image set to values[k, v], the other scalars fixed.

  Every cell uses the same noise, so cells differ only through the traversed scalar.
  """
  src, _ = encode(config, state, source[None])
  n, v = values.shape
  scalars = jnp.broadcast_to(src, (n, v, n))
  scalars = jnp.where(jnp.eye(n, dtype=bool)[:, None, :], values[:, :, None], scalars)  # (N, V, N)
  tokens = tokens_from_scalars(config, state, scalars.reshape(n * v, n))
  images = jax.vmap(lambda tok: _sample(config, state, ae_params, tok[None], rng, steps, eta)[0])(tokens)
  return images.reshape((n, v) + images.shape[1:])


@functools.partial(jax.jit, static_argnames=("config", "steps", "eta"))
def reconstruct(config, state: DiffusionState, ae_params: Any, images: jax.Array, rng: jax.Array, *, steps: int,
                eta: float) -> jax.Array:
  """DDIM reconstructions of images from their own tokens (EMA UNet), as the official log_images."""
  _, tokens = encode(config, state, images)
  return _sample(config, state, ae_params, tokens, rng, steps, eta)


@functools.partial(jax.jit, static_argnames=("config",))
def first_stage_reconstruct(config, ae_params: Any, images: jax.Array) -> jax.Array:
  return first_stage.first_stage_decode(config, ae_params, first_stage.first_stage_encode(config, ae_params, images))


def as_uint8(images: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round((images + 1) * 127.5), 0, 255).astype(jnp.uint8)
