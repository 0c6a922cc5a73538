"""The concept-diffusion stage: state, optimiser, EMA and the jitted train step.

Encoder and UNet are trained jointly with the plain noise-prediction loss (no other term), the UNet
is EMA-averaged, the encoder is not (official `LitEma(self.model)`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from concept_diffusion import parallel
from concept_diffusion.diffusion import make_schedule, noise_loss, q_sample, sample_timesteps
from concept_diffusion.models.encoder import ConceptEncoder, build_encoder
from concept_diffusion.models.unet import UNet, build_unet
from concept_diffusion.train import first_stage, sharded

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class DiffusionState:
  step: jax.Array
  params: Any  # {"encoder": ..., "unet": ...}
  batch_stats: Any  # encoder BatchNorm running statistics
  opt_state: Any
  ema_unet: Any
  scale_factor: jax.Array  # 1/std of the first batch's latents; 1 in pixel space
  nonfinite_steps: jax.Array  # steps whose update was dropped for a NaN/Inf (see guard_nonfinite)


def latent_shape(config) -> tuple[int, int, int]:
  """Shape of one diffusion input: the first stage's latent, or the image in pixel space."""
  size, channels = config.data.image_size, config.data.channels
  if config.first_stage.kind == "none":
    return size, size, channels
  factor = 2 ** (len(config.first_stage.ch_mult) - 1)
  if size % factor:
    raise ValueError(f"data.image_size={size} is not divisible by the first stage's downsampling factor {factor} "
                     f"(first_stage.ch_mult={tuple(config.first_stage.ch_mult)}).")
  return size // factor, size // factor, config.first_stage.embed_dim


def is_one_shot(config) -> bool:
  """The "without diffusion" ablation (diffusion.objective=one_shot): no noise, no timesteps, one decoding pass."""
  return config.diffusion.get("objective", "eps") == "one_shot"


def build_models(config) -> tuple[ConceptEncoder, UNet]:
  dtype = COMPUTE_DTYPES[config.train.get("compute_dtype", "float32")]
  return build_encoder(config.encoder), build_unet(config.unet, latent_shape(config)[-1], dtype,
                                                   learned_input=is_one_shot(config))


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW (torch defaults, wd 0.01) with LDM's LambdaLinearScheduler: warm-up from 1e-6*lr, then constant."""
  lr = optax.linear_schedule(1e-6 * train_config.lr, train_config.lr, max(train_config.warmup_steps, 1))
  return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=train_config.weight_decay)


def learning_rate(train_config, step: jax.Array) -> jax.Array:
  warm = max(train_config.warmup_steps, 1)
  return train_config.lr * (1e-6 + (1 - 1e-6) * jnp.minimum(step, warm) / warm)


def create_diffusion_state(config, rng: jax.Array) -> DiffusionState:
  encoder, unet = build_models(config)
  h, w, c = latent_shape(config)
  size, channels = config.data.image_size, config.data.channels
  enc_key, unet_key = jax.random.split(rng)
  enc_vars = encoder.init(enc_key, jnp.zeros((1, size, size, channels)))
  tokens = jnp.zeros((1, config.encoder.num_tokens, config.encoder.token_dim))
  unet_vars = unet.init(unet_key, jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32), tokens)
  params = {"encoder": enc_vars["params"], "unet": unet_vars["params"]}
  return DiffusionState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=enc_vars["batch_stats"],
                        opt_state=make_optimizer(config.train).init(params),
                        ema_unet=jax.tree_util.tree_map(jnp.copy, params["unet"]),
                        scale_factor=jnp.ones((), jnp.float32), nonfinite_steps=jnp.zeros((), jnp.int32))


def ema_decay(train_config, num_updates: jax.Array) -> jax.Array:
  """LitEma: min(decay, (1 + n) / (10 + n)) with n counted after the increment."""
  n = num_updates.astype(jnp.float32)
  return jnp.minimum(train_config.ema_decay, (1 + n) / (10 + n))


def denoiser_inputs(config, schedule, latents: jax.Array, t: jax.Array,
                    noise: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(t, x_t, target) of the loss for drawn timesteps and noise: x_t = q_sample and the noise as target; in the
  one-shot ablation the UNet decodes the tokens at once (t = 0, x_t unused: it has its learned input) and its
  target is the latent itself."""
  if is_one_shot(config):
    return jnp.zeros_like(t), jnp.zeros_like(latents), latents
  return t, q_sample(schedule, latents, t, noise), noise


def diffusion_train_step(state: DiffusionState, images: jax.Array, ae_params: Any, rng: jax.Array, *,
                         config) -> tuple[DiffusionState, dict[str, jax.Array]]:
  """One optimiser step on a batch of images in [-1, 1]; a pure function of its arguments."""
  encoder, unet = build_models(config)
  schedule = make_schedule(config.diffusion)
  t_key, noise_key, drop_key = jax.random.split(rng, 3)

  latents = jax.lax.stop_gradient(first_stage.first_stage_encode(config, ae_params, images)) * state.scale_factor
  diff = config.diffusion
  t = sample_timesteps(t_key, images.shape[0], schedule.num_timesteps, diff.get("timestep_sampling", "uniform"),
                       diff.get("timestep_logit_mean", 0.0), diff.get("timestep_logit_std", 1.0))
  t, x_t, target = denoiser_inputs(config, schedule, latents, t,
                                   jax.random.normal(noise_key, latents.shape, latents.dtype))

  def loss_fn(params):
    (_, tokens), updates = encoder.apply({"params": params["encoder"], "batch_stats": state.batch_stats}, images,
                                         train=True, mutable=["batch_stats"])
    eps = unet.apply({"params": params["unet"]}, x_t, t, tokens, train=True, rngs={"dropout": drop_key})
    return noise_loss(eps, target, config.diffusion.loss), updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  tx = make_optimizer(config.train)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay(config.train, state.step + 1)
  ema_unet = jax.tree_util.tree_map(lambda e, p: e - (1 - decay) * (e - p), state.ema_unet, params["unet"])
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": learning_rate(config.train, state.step),
             "ema_decay": decay}
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                       ema_unet=ema_unet), metrics


@functools.partial(jax.jit, static_argnames=("config",))
def compute_scale_factor(config, ae_params: Any, images: jax.Array) -> jax.Array:
  """scale_by_std: 1 / std (unbiased, as torch) of the first batch's latents; 1 in pixel space."""
  if config.first_stage.kind == "none" or not config.train.scale_by_std:
    return jnp.ones((), jnp.float32)
  latents = first_stage.first_stage_encode(config, ae_params, images)
  return (1.0 / jnp.std(latents, ddof=1)).astype(jnp.float32)


def abstract_state(config) -> DiffusionState:
  return jax.eval_shape(functools.partial(create_diffusion_state, config), jax.random.PRNGKey(0))


def state_shardings(config, mesh: Mesh) -> DiffusionState:
  return parallel.state_shardings(abstract_state(config), mesh, config.mesh.fsdp_min_size)


@functools.lru_cache(maxsize=8)
def _jitted_create(frozen_config, mesh: Mesh, fsdp_min_size: int) -> Callable:
  shardings = parallel.state_shardings(abstract_state(frozen_config), mesh, fsdp_min_size)
  return jax.jit(functools.partial(create_diffusion_state, frozen_config), out_shardings=shardings)


def create_sharded_state(config, rng: jax.Array, mesh: Mesh) -> DiffusionState:
  """A fresh state initialised directly into its shardings (every process computes the same values)."""
  from concept_diffusion.train.workdir import computation_config  # pylint: disable=g-import-not-at-top
  return _jitted_create(computation_config(config), mesh, config.mesh.fsdp_min_size)(rng)


@functools.lru_cache(maxsize=8)
def _jitted_train_step(frozen_config, mesh: Mesh, fsdp_min_size: int) -> Callable:
  ae_params = first_stage.abstract_ae_params(frozen_config)
  return sharded.jit_train_step(
      functools.partial(diffusion_train_step, config=frozen_config), mesh,
      parallel.state_shardings(abstract_state(frozen_config), mesh, fsdp_min_size),
      (parallel.state_shardings(ae_params, mesh, fsdp_min_size),))


def make_train_step(config, mesh: Mesh | None = None) -> Callable:
  """The jitted, sharded step fn(state, images, ae_params, rng) -> (state, metrics); `rng` is the stage's constant
  key (the step is folded in inside). One compilation per computation-relevant config (`computation_config`) and
  mesh; the state is donated. Default mesh: the config's over all devices."""
  from concept_diffusion.train.workdir import computation_config  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  parallel.check_batch_size(config.train.batch_size, mesh)
  return _jitted_train_step(computation_config(config), mesh, config.mesh.fsdp_min_size)
