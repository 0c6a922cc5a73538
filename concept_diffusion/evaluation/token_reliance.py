"""How much the denoiser relies on an image's own concept tokens, per noise level.

For images x0 with tokens c(x0), noise eps and t drawn in a band of timesteps, compare the noise-prediction loss
with the image's own tokens against the loss with the tokens of another image of the batch:

  reliance(band) = (loss with other tokens - loss with own tokens) / loss with own tokens

0 means the UNet ignores the tokens at those noise levels (it denoises from x_t alone, so the encoder gets no
useful gradient there); large values mean the tokens carry what x_t lacks. EncDiff's encoder learns only through
this dependence, so the curve of reliance over training shows whether and when the tokens start to matter.
The same draws of t and noise are used for both losses, so the difference is the tokens' alone.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from concept_diffusion.diffusion import noise_loss
from concept_diffusion.models.encdiff import EncDiff, EncDiffVariables

PREFIX = "token_reliance"


def band_edges(num_timesteps: int, num_bands: int) -> list[tuple[int, int]]:
  """[lo, hi) timestep bands of (nearly) equal width covering [0, T)."""
  edges = np.linspace(0, num_timesteps, num_bands + 1).round().astype(int)
  return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


@functools.partial(jax.jit, static_argnames=("model", "bands"))
def _band_losses(model: EncDiff, state, ae_params: Any, images: jax.Array, rng: jax.Array, bands: tuple) -> jax.Array:
  """(num_bands, 2): mean loss with own tokens and with another image's tokens, the UNet being trained (not EMA).

  One UNet call per band on the batch twice (own tokens, then swapped), in a `lax.map` over the bands, so the
  UNet is compiled once whatever the number of bands."""
  _, tokens = model.encode_with_tokens(state, images)
  context = jnp.concatenate([tokens, jnp.roll(tokens, 1, axis=0)])  # image i then gets image i-1's tokens
  latents = model.latents(ae_params, images) * state.scale_factor
  batch = images.shape[0]

  def one_band(band):
    index, lo, hi = band
    t_key, noise_key = jax.random.split(jax.random.fold_in(rng, index))
    t, x_t, target = model.denoiser_inputs(latents, jax.random.randint(t_key, (batch,), lo, hi),
                                           jax.random.normal(noise_key, latents.shape, latents.dtype))
    eps = model.denoise(state.params["unet"], jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), context)
    return jnp.stack([noise_loss(eps[:batch], target, model.loss_kind),
                      noise_loss(eps[batch:], target, model.loss_kind)])

  lows, highs = (jnp.asarray([band[k] for band in bands], jnp.int32) for k in (0, 1))
  return jax.lax.map(one_band, (jnp.arange(len(bands)), lows, highs))


def token_reliance(model: EncDiff, state, images: np.ndarray, rng: jax.Array, *, ae_params: Any = None,
                   num_bands: int = 5) -> dict[str, float]:
  """{"token_reliance.t<lo>-<hi>": relative loss increase with another image's tokens, ..., "token_reliance.mean"}.

  `images` (B >= 2, H, W, C) in [-1, 1], distinct images; `state` has the fields of EncDiffVariables;
  `ae_params` the first stage's (None in pixel space). The one-shot ablation has no timesteps: one entry,
  "token_reliance.one_shot".
  """
  if images.shape[0] < 2:
    raise ValueError(f"token_reliance needs at least 2 images to swap tokens between, got {images.shape[0]}.")
  if model.first_stage is not None and ae_params is None:
    raise ValueError("token_reliance: this model diffuses in a first stage's latent space; pass its ae_params "
                     "(states.restore_first_stage_params).")
  bands = ((0, 1),) if model.one_shot else tuple(band_edges(model.schedule.num_timesteps, num_bands))
  state = EncDiffVariables(state.params, state.batch_stats, None, state.scale_factor)  # what crosses into jit
  losses = np.asarray(jax.device_get(_band_losses(model, state, ae_params, jnp.asarray(images), rng, bands)),
                      np.float64)
  gaps = (losses[:, 1] - losses[:, 0]) / np.maximum(losses[:, 0], 1e-12)
  names = ["one_shot"] if model.one_shot else [f"t{lo}-{hi}" for lo, hi in bands]
  scores = {f"{PREFIX}.{name}": float(gap) for name, gap in zip(names, gaps)}
  scores[f"{PREFIX}.mean"] = float(gaps.mean())
  return scores
