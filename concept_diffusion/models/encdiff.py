"""EncDiff, the model a researcher calls and extends: concept encoder + UNet + first stage, and the registries.

  model = build_model(config)                       # from a config; or EncDiff(...) by hand
  variables = model.init(rng)                       # {"params": {"encoder", "unet"}, "batch_stats"}
  scalars = model.encode(v, images)                 # (B, N): the disentangled representation
  tokens = model.tokens(v, scalars)                 # (B, N, token_dim): the UNet's context
  eps = model.denoise(v.params["unet"], x_t, t, tokens)
  loss, batch_stats = model.loss(params, batch_stats, images, latents, rng)
  images = model.sample(v, ae_params, tokens, rng, steps=200, eta=1.0)

`v` is anything with `params`, `batch_stats`, `ema_unet` and `scale_factor` (`EncDiffVariables`, or the training
state). Methods that draw pictures are jitted with the model as a static argument: one compilation per model
object and shape. Like google-research/vdm's model file, this one owns the loss and the sampler; the train step
(train/diffusion_stage.py) only adds the optimiser and the EMA.

Extending: an encoder, a conditioning (models/conditioning.py) or a first stage is one class plus one
`register_*` call plus a config value (encoder.kind, unet.conditioning, first_stage.kind); docs/extending.md.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from concept_diffusion.diffusion import (LOSS_WEIGHTINGS, PREDICTIONS, SCHEDULES, SPACINGS, TIMESTEP_SAMPLINGS,
                                         Schedule, chain, ddim_sample, loss_weights, make_schedule, noise_loss, q_sample,
                                         sample_timesteps)
from concept_diffusion import config as config_lib
from concept_diffusion import hardware
from concept_diffusion.errors import UserError
from concept_diffusion.models import autoencoder
from concept_diffusion.models.conditioning import CONDITIONINGS, TokenRoutes, register_conditioning  # noqa: F401
from concept_diffusion.models.encoder import build_encoder
from concept_diffusion.models.kernels import ATTENTION_IMPLS, CONV_IMPLS
from concept_diffusion.models.unet import UNet, build_unet

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype_name(config: ml_collections.ConfigDict, backend: str | None = None) -> str:
  """train.compute_dtype with "auto" resolved for `backend` (default: JAX's): bfloat16 where the hardware runs it
  natively (hardware.native_bf16), float32 elsewhere."""
  name = config.train.compute_dtype
  if name != "auto":
    return name
  return "bfloat16" if hardware.native_bf16(backend or jax.default_backend()) else "float32"

# name -> build(config) -> Linen module. An encoder maps images (B, H, W, C) in [-1, 1] to (scalars (B, N),
# tokens (B, N, token_dim)) when called as `apply(variables, images, train=...)` and has a `tokens(scalars)`
# method; it may keep BatchNorm statistics in "batch_stats". A first stage has `encode(images)` and
# `decode(latents)` methods; None means pixel space.
ENCODERS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {}
FIRST_STAGES: dict[str, Callable[[ml_collections.ConfigDict], Optional[nn.Module]]] = {}


def _register(registry: dict, what: str, name: str, build: Callable, override: bool) -> Callable:
  if name in registry and registry[name] is not build and not override:
    raise ValueError(f"{what} {name!r} is already registered; pick another name or pass override=True.")
  registry[name] = build
  return build


def register_encoder(name: str, build: Callable[[ml_collections.ConfigDict], nn.Module], *,
                     defaults: ml_collections.ConfigDict | dict | None = None, override: bool = False) -> Callable:
  """Makes `build(config)` available as `encoder.kind=name`. `defaults` become the fields `config.encoder.<name>.*`
  (e.g. --config.encoder.<name>.depth=4), which `build` reads; config.json keeps them."""
  if defaults is not None:
    config_lib.add_extension_fields("encoder", name, defaults)
  return _register(ENCODERS, "encoder", name, build, override)


def register_first_stage(name: str, build: Callable[[ml_collections.ConfigDict], Optional[nn.Module]], *,
                         defaults: ml_collections.ConfigDict | dict | None = None,
                         override: bool = False) -> Callable:
  """Makes `build(config)` available as `first_stage.kind=name` (the trainer trains only 'vq' and 'kl'; another
  first stage comes pretrained through first_stage.checkpoint). `defaults` become `config.first_stage.<name>.*`."""
  if defaults is not None:
    config_lib.add_extension_fields("first_stage", name, defaults)
  return _register(FIRST_STAGES, "first stage", name, build, override)


register_encoder("concept_cnn", lambda config: build_encoder(config.encoder))
for _kind in ("vq", "kl"):
  register_first_stage(_kind, lambda config: autoencoder.build_first_stage(config.first_stage, config.data.channels))
register_first_stage("none", lambda config: None)


@flax.struct.dataclass
class EncDiffVariables:
  """What a trained EncDiff needs to encode and sample (the training state has these fields and more)."""
  params: Any  # {"encoder": ..., "unet": ...}
  batch_stats: Any  # the encoder's running statistics ({} for an encoder without BatchNorm)
  ema_unet: Any  # the EMA of params["unet"]: what sampling uses
  scale_factor: jax.Array  # 1/std of the first batch's latents; 1 in pixel space


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static argument of the jitted methods
class EncDiff:
  encoder: nn.Module
  unet: UNet
  first_stage: Optional[nn.Module]  # None: the UNet works on pixels
  schedule: Schedule
  image_shape: tuple[int, int, int]
  latent_shape: tuple[int, int, int]
  num_tokens: int
  token_dim: int
  loss_kind: str = "l1"  # l1 (official) | l2 (paper)
  # The "without diffusion" ablation (paper Table 3): no noise, no timesteps, one decoding pass of the tokens.
  one_shot: bool = False
  timestep_sampling: str = "uniform"
  timestep_logit_mean: float = 0.0
  timestep_logit_std: float = 1.0
  loss_weighting: str = "none"  # none (official) | v: diffusion.loss_weighting
  loss_weight_max: float = 5.0
  prediction: str = "eps"  # what the UNet predicts: eps (official) | v (diffusion.prediction)
  # Sampler settings (config.sample; diffusion/sampling.py says what each does near alpha_bar_T = 0).
  clip_x0: bool = False
  timestep_spacing: str = "leading"
  min_alpha_bar: float = 0.0

  # -- parameters ------------------------------------------------------------------------------------------
  def init(self, rng: jax.Array) -> dict[str, Any]:
    """{"params": {"encoder", "unet"}, "batch_stats"}, for one image and one latent of the model's shapes."""
    enc_key, unet_key = jax.random.split(rng)
    enc_vars = self.encoder.init(enc_key, jnp.zeros((1,) + self.image_shape))
    tokens = jnp.zeros((1, self.num_tokens, self.token_dim))
    unet_vars = self.unet.init(unet_key, jnp.zeros((1,) + self.latent_shape), jnp.zeros((1,), jnp.int32), tokens)
    return {"params": {"encoder": enc_vars["params"], "unet": unet_vars["params"]},
            "batch_stats": enc_vars.get("batch_stats", {})}

  def abstract_ae_params(self) -> Any:
    """The first stage's parameters as ShapeDtypeStructs (None in pixel space)."""
    if self.first_stage is None:
      return None
    return autoencoder.abstract_params(self.first_stage, self.image_shape[0], self.image_shape[-1])

  # -- the representation ------------------------------------------------------------------------------------
  def _encoder_vars(self, v) -> dict[str, Any]:
    return {"params": v.params["encoder"], "batch_stats": v.batch_stats}

  def encode_with_tokens(self, v, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(scalars (B, N), tokens (B, N, D)) with running BatchNorm statistics and the raw (non-EMA) encoder."""
    return self.encoder.apply(self._encoder_vars(v), images, train=False)

  def encode(self, v, images: jax.Array) -> jax.Array:
    """Images (B, H, W, C) in [-1, 1] -> the scalars (B, N): EncDiff's representation."""
    return self.encode_with_tokens(v, images)[0]

  def tokens(self, v, scalars: jax.Array) -> jax.Array:
    """(B, N) scalars -> (B, N, token_dim); token k depends only on scalar k."""
    return self.encoder.apply(self._encoder_vars(v), scalars, method="tokens")

  # -- the denoiser and the first stage ----------------------------------------------------------------------
  def denoise(self, unet_params: Any, x_t: jax.Array, t: jax.Array, tokens: jax.Array, *, train: bool = False,
              rng: Optional[jax.Array] = None, capture_attention: bool = False) -> Any:
    """The UNet's noise prediction; with `capture_attention` also its intermediates (every cross-attention
    layer's probabilities, (B, heads, H*W, N) under `.../attn2/attn_probs`)."""
    rngs = {"dropout": rng} if rng is not None else {}
    if capture_attention:
      return self.unet.apply({"params": unet_params}, x_t, t, tokens, train=train, rngs=rngs,
                             mutable=["intermediates"])
    return self.unet.apply({"params": unet_params}, x_t, t, tokens, train=train, rngs=rngs)

  def latents(self, ae_params: Any, images: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
    """Images -> unscaled diffusion latents: pre-quantisation latent ('vq'), posterior mean or, with `rng`, a
    sample ('kl'), the images themselves in pixel space."""
    if self.first_stage is None:
      return images
    if isinstance(self.first_stage, autoencoder.AutoencoderKL):
      return self.first_stage.apply({"params": ae_params}, images, rng, method="encode")
    return self.first_stage.apply({"params": ae_params}, images, method="encode")

  def decode(self, ae_params: Any, latents: jax.Array) -> jax.Array:
    """Unscaled diffusion latents -> images (for 'vq' the latents are quantised first); identity in pixel space."""
    if self.first_stage is None:
      return latents
    return self.first_stage.apply({"params": ae_params}, latents, method="decode")

  # -- training ----------------------------------------------------------------------------------------------
  def denoiser_inputs(self, latents: jax.Array, t: jax.Array, noise: jax.Array) -> tuple[jax.Array, ...]:
    """(t, x_t, target): x_t = q_sample and the noise (or, with prediction "v", v = sqrt(a) noise - sqrt(1 - a)
    latents) as target; in the one-shot ablation the UNet decodes the tokens at once (t = 0, x_t unused: it has
    its learned input) and its target is the latent itself."""
    if self.one_shot:
      return jnp.zeros_like(t), jnp.zeros_like(latents), latents
    x_t = q_sample(self.schedule, latents, t, noise)
    if self.prediction == "v":
      shape = t.shape + (1,) * (latents.ndim - 1)
      sqrt_a = self.schedule.take("sqrt_alphas_cumprod", t).reshape(shape)
      sqrt_1ma = self.schedule.take("sqrt_one_minus_alphas_cumprod", t).reshape(shape)
      return t, x_t, sqrt_a * noise - sqrt_1ma * latents
    return t, x_t, noise

  def loss(self, params: Any, batch_stats: Any, images: jax.Array, latents: jax.Array,
           rng: jax.Array) -> tuple[jax.Array, Any]:
    """(noise-prediction loss, updated encoder batch_stats) for a batch of images and their scaled latents.

    The whole objective: encoder and UNet are trained jointly by it, nothing else regularises."""
    t_key, noise_key, drop_key = jax.random.split(rng, 3)
    t = sample_timesteps(t_key, images.shape[0], self.schedule.num_timesteps, self.timestep_sampling,
                         self.timestep_logit_mean, self.timestep_logit_std)
    t, x_t, target = self.denoiser_inputs(latents, t, jax.random.normal(noise_key, latents.shape, latents.dtype))
    (_, tokens), updates = self.encoder.apply({"params": params["encoder"], "batch_stats": batch_stats}, images,
                                              train=True, mutable=["batch_stats"])
    eps = self.denoise(params["unet"], x_t, t, tokens, train=True, rng=drop_key)
    weights = None if self.one_shot else loss_weights(self.schedule, t, self.loss_weighting, self.loss_weight_max)
    return noise_loss(eps, target, self.loss_kind, weights), updates.get("batch_stats", batch_stats)

  # -- sampling ----------------------------------------------------------------------------------------------
  def sample(self, v, ae_params: Any, tokens: jax.Array, rng: jax.Array, *, steps: int, eta: float,
             attention_side: Optional[int] = None, use_ema: bool = True) -> Any:
    """Images (B, H, W, C) in about [-1, 1]: DDIM from x_T ~ N(0, I) conditioned on tokens, then decoded. With
    `attention_side`, (images, maps (B, side, side, N)): the cross-attention probabilities at that query grid,
    averaged over heads, over the layers of that resolution and over the sampling steps (same images)."""
    unet_params = v.ema_unet if use_ema else v.params["unet"]
    noise_key, sample_key = jax.random.split(rng)
    x_T = jax.random.normal(noise_key, (tokens.shape[0],) + self.latent_shape)
    decode = lambda latents: self.decode(ae_params, latents / v.scale_factor)
    batch, n = tokens.shape[:2]
    if self.one_shot:  # the "w/o diffusion" ablation decodes the tokens in one pass
      t0 = jnp.zeros((batch,), jnp.int32)
      if attention_side is None:
        return decode(self.denoise(unet_params, x_T, t0, tokens))
      latents, inter = self.denoise(unet_params, x_T, t0, tokens, capture_attention=True)
      return decode(latents), _mean_attention(inter, attention_side).reshape(batch, attention_side,
                                                                             attention_side, n)
    sampler = dict(clip_x0=self.x0_range(), spacing=self.timestep_spacing, min_alpha_bar=self.min_alpha_bar,
                   prediction=self.prediction)
    if attention_side is None:
      return decode(ddim_sample(lambda x, t: self.denoise(unet_params, x, t, tokens), self.schedule, x_T,
                                sample_key, steps, eta, **sampler))

    def eps_and_maps(x, t):
      eps, inter = self.denoise(unet_params, x, t, tokens, capture_attention=True)
      return eps, _mean_attention(inter, attention_side)

    aux = jnp.zeros((batch, attention_side ** 2, n), jnp.float32)
    latents, maps = ddim_sample(eps_and_maps, self.schedule, x_T, sample_key, steps, eta, aux_init=aux, **sampler)
    maps = maps / len(chain(self.schedule, steps, self.timestep_spacing, self.min_alpha_bar))
    return decode(latents), maps.reshape(batch, attention_side, attention_side, n)

  def x0_range(self) -> Optional[tuple[float, float]]:
    """The range x0 estimates are clipped to while sampling: the pixels' [-1, 1] with clip_x0, else none (a
    latent space has no fixed range; LDM does not clip there)."""
    return (-1.0, 1.0) if self.clip_x0 else None

  def attention_sides(self) -> tuple[int, ...]:
    """Query-grid sides that have cross-attention layers, finest first (none when the conditioning keeps the
    tokens out of the attention layers, e.g. AdaGN)."""
    if not self.has_cross_attention():
      return ()
    side, levels = self.latent_shape[0] // self.unet.patch_size, len(self.unet.channel_mult)  # the UNet's grid
    return tuple(side // ds for ds in sorted(self.unet.attention_resolutions) if ds < 2 ** levels)

  @functools.lru_cache(maxsize=None)
  def has_cross_attention(self) -> bool:
    """Whether the UNet records any cross-attention probabilities (abstract evaluation: no compute)."""
    x, t = jax.ShapeDtypeStruct((1,) + self.latent_shape, jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)
    tokens = jax.ShapeDtypeStruct((1, self.num_tokens, self.token_dim), jnp.float32)
    _, inter = jax.eval_shape(lambda x, t, c: self.unet.init_with_output(jax.random.PRNGKey(0), x, t, c,
                                                                          mutable=["params", "intermediates"]),
                              x, t, tokens)
    return bool(jax.tree_util.tree_leaves(inter.get("intermediates", {})))

  @functools.partial(jax.jit, static_argnums=0, static_argnames=("steps", "eta", "use_ema", "attention_side"))
  def sample_jit(self, v, ae_params, tokens, rng, *, steps: int, eta: float, attention_side: Optional[int] = None,
                 use_ema: bool = True):
    """`sample`, jitted (one compilation per model, shapes and static arguments)."""
    return self.sample(v, ae_params, tokens, rng, steps=steps, eta=eta, attention_side=attention_side,
                       use_ema=use_ema)

  @functools.partial(jax.jit, static_argnums=0, static_argnames=("token_sets", "steps", "eta"))
  def swap_grid(self, v, ae_params, sources: jax.Array, targets: jax.Array, rng: jax.Array, *,
                token_sets: tuple[tuple[int, ...], ...], steps: int, eta: float) -> jax.Array:
    """(R, B, H, W, C): row r regenerates each source with the scalars in token_sets[r] taken from the matching
    target (an empty set: from its own tokens). Every row uses the same noise, so rows differ only through their
    swapped scalars."""
    src, tgt = self.encode(v, sources), self.encode(v, targets)
    masks = jnp.asarray([[k in ks for k in range(src.shape[1])] for ks in token_sets], bool)  # (R, N)
    swapped = jnp.where(masks[:, None, :], tgt[None], src[None])  # (R, B, N)
    tokens = jax.vmap(lambda s: self.tokens(v, s))(swapped)
    return jax.vmap(lambda tok: self.sample(v, ae_params, tok, rng, steps=steps, eta=eta))(tokens)

  @functools.partial(jax.jit, static_argnums=0, static_argnames=("tokens", "steps", "eta"))
  def traversal_grid(self, v, ae_params, source: jax.Array, values: jax.Array, rng: jax.Array, *,
                     tokens: tuple[int, ...], steps: int, eta: float) -> jax.Array:
    """(len(tokens), V, H, W, C): scalar tokens[r] of one source image set to values[r, v], the other scalars
    fixed; every cell uses the same noise, so cells differ only through the traversed scalar."""
    src = self.encode(v, source[None])[0]
    num_values = values.shape[1]
    scalars = jnp.stack([jnp.broadcast_to(src, (num_values,) + src.shape).at[:, k].set(values[r])
                         for r, k in enumerate(tokens)])  # (R, V, N)
    toks = self.tokens(v, scalars.reshape(len(tokens) * num_values, -1))
    images = jax.vmap(lambda tok: self.sample(v, ae_params, tok[None], rng, steps=steps, eta=eta)[0])(toks)
    return images.reshape((len(tokens), num_values) + images.shape[1:])

  @functools.partial(jax.jit, static_argnums=0, static_argnames=("steps", "eta"))
  def reconstruct(self, v, ae_params, images: jax.Array, rng: jax.Array, *, steps: int, eta: float) -> jax.Array:
    """DDIM reconstructions of images from their own tokens (EMA UNet), as the official log_images."""
    return self.sample(v, ae_params, self.encode_with_tokens(v, images)[1], rng, steps=steps, eta=eta)

  @functools.partial(jax.jit, static_argnums=0)
  def first_stage_reconstruct(self, ae_params, images: jax.Array) -> jax.Array:
    return self.decode(ae_params, self.latents(ae_params, images))


def _mean_attention(intermediates, side: int) -> jax.Array:
  """(B, side*side, N): the recorded cross-attention probabilities of the layers with that query grid, averaged
  over heads and layers."""
  maps = [p for p in jax.tree_util.tree_leaves(intermediates) if p.shape[2] == side ** 2]
  if not maps:
    sides = sorted({round(p.shape[2] ** 0.5) for p in jax.tree_util.tree_leaves(intermediates)})
    raise ValueError(f"no cross-attention layer has a {side}x{side} query grid; the UNet's have sides {sides}.")
  return jnp.mean(jnp.stack([m.mean(axis=1) for m in maps]), axis=0)


def check_names(config: ml_collections.ConfigDict) -> None:
  """One clear UserError for a config value that names nothing the code defines: an encoder, conditioning or
  first stage that is not registered, an unknown schedule, timestep sampling, loss weighting or kernel.
  build_model checks first, before any work; the config schema (config.py) cannot, as it imports no model code."""
  config_lib.import_extensions(config)
  named = [("encoder.kind", ENCODERS), ("first_stage.kind", FIRST_STAGES), ("unet.conditioning", CONDITIONINGS)]
  for field, registry in named:
    section, key = field.split(".")
    if config[section][key] not in registry:
      raise UserError(f"Invalid config: {field}={config[section][key]!r} is not registered; known: "
                      f"{sorted(registry)}. A module that registers it goes in config.extensions.")
  chosen = [("diffusion.beta_schedule", SCHEDULES), ("diffusion.timestep_sampling", TIMESTEP_SAMPLINGS),
            ("diffusion.loss_weighting", LOSS_WEIGHTINGS), ("diffusion.prediction", PREDICTIONS),
            ("sample.timestep_spacing", SPACINGS), ("unet.conv_impl", CONV_IMPLS),
            ("unet.attention_impl", ATTENTION_IMPLS)]
  for field, choices in chosen:
    section, key = field.split(".")
    if config[section][key] not in choices:
      raise UserError(f"Invalid config: {field}={config[section][key]!r}; it must be one of {choices}.")


def build_model(config: ml_collections.ConfigDict) -> EncDiff:
  """The EncDiff a config describes (its registered encoder, conditioning and first stage)."""
  check_names(config)
  first_stage = FIRST_STAGES[config.first_stage.kind](config)
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  if first_stage is None:
    latent_shape = image_shape
  else:
    out = jax.eval_shape(lambda x: first_stage.init_with_output(jax.random.PRNGKey(0), x, method="encode")[0],
                         jax.ShapeDtypeStruct((1,) + image_shape, jnp.float32))
    latent_shape = tuple(out.shape[1:])
  diff = config.diffusion
  one_shot = diff.objective == "one_shot"
  unet = build_unet(config.unet, latent_shape[-1], COMPUTE_DTYPES[compute_dtype_name(config)],
                    learned_input=one_shot)
  return EncDiff(encoder=ENCODERS[config.encoder.kind](config), unet=unet, first_stage=first_stage,
                 schedule=make_schedule(diff), image_shape=image_shape, latent_shape=latent_shape,
                 num_tokens=config.encoder.num_tokens, token_dim=config.encoder.token_dim, loss_kind=diff.loss,
                 one_shot=one_shot, timestep_sampling=diff.timestep_sampling,
                 timestep_logit_mean=diff.timestep_logit_mean, timestep_logit_std=diff.timestep_logit_std,
                 loss_weighting=diff.loss_weighting, loss_weight_max=diff.loss_weight_max, prediction=diff.prediction,
                 clip_x0=clips_x0(config), timestep_spacing=config.sample.timestep_spacing,
                 min_alpha_bar=config.sample.min_alpha_bar)


def clips_x0(config: ml_collections.ConfigDict) -> bool:
  """sample.clip_x0 resolved: "auto" clips where the UNet works on pixels (first_stage.kind == "none")."""
  if config.sample.clip_x0 == "auto":
    return config.first_stage.kind == "none"
  return config.sample.clip_x0 == "on"


def as_uint8(images: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round((images + 1) * 127.5), 0, 255).astype(jnp.uint8)
