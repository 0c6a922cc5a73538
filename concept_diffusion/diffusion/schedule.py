"""Noise schedules in the LDM conventions (`make_beta_schedule`) and the forward process."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from concept_diffusion.errors import UserError

SCHEDULES = ("linear", "sqrt_linear", "sqrt", "cosine")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
LOSS_WEIGHTINGS = ("none", "v")


def make_beta_schedule(kind: str, timesteps: int, linear_start: float = 1e-4, linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> np.ndarray:
  """Betas (T,) in float64, exactly as LDM's `make_beta_schedule` builds them."""
  if timesteps < 1:
    raise UserError(f"diffusion.timesteps must be >= 1, got {timesteps}.")
  if kind == "linear":  # LDM's "linear" is linear in sqrt(beta)
    return np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
  if kind == "sqrt_linear":
    return np.linspace(linear_start, linear_end, timesteps, dtype=np.float64)
  if kind == "sqrt":
    return np.linspace(linear_start, linear_end, timesteps, dtype=np.float64) ** 0.5
  if kind == "cosine":  # Nichol & Dhariwal (2021)
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps + cosine_s
    alphas_cumprod = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.999)
  raise UserError(f"Unknown diffusion.beta_schedule {kind!r}; choose one of {SCHEDULES}.")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Precomputed per-timestep constants as float64 numpy arrays.

  Kept in numpy so they stay concrete inside `jit` (samplers derive their own constants in float64);
  index them with traced timesteps through `take`, which returns float32 device values.
  """
  betas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  def take(self, name: str, t: jax.Array) -> jax.Array:
    return jnp.asarray(getattr(self, name), jnp.float32)[t]


def schedule_from_betas(betas: np.ndarray) -> Schedule:
  betas = np.asarray(betas, dtype=np.float64)
  alphas_cumprod = np.cumprod(1.0 - betas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)  # v_posterior = 0
  return Schedule(
      betas=betas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=np.log(np.maximum(posterior_variance, 1e-20)),
      posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod))


def make_schedule(diffusion_config) -> Schedule:
  return schedule_from_betas(make_beta_schedule(
      diffusion_config.beta_schedule, diffusion_config.timesteps, diffusion_config.linear_start,
      diffusion_config.linear_end, diffusion_config.cosine_s))


def _bcast(values: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
  return jnp.asarray(values, jnp.float32)[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def sample_timesteps(key: jax.Array, batch: int, num_timesteps: int, kind: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0) -> jax.Array:
  """Training timesteps (batch,) int32 in [0, T): uniform (official) or t/T = sigmoid(N(mean, std))."""
  if kind == "uniform":
    return jax.random.randint(key, (batch,), 0, num_timesteps)
  if kind == "logit_normal":
    u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,)))
    return jnp.clip(jnp.floor(u * num_timesteps), 0, num_timesteps - 1).astype(jnp.int32)
  raise UserError(f"Unknown diffusion.timestep_sampling {kind!r}; choose one of {TIMESTEP_SAMPLINGS}.")


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
  return (_bcast(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + _bcast(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def predict_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  return ((x_t - _bcast(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * eps)
          / _bcast(schedule.sqrt_alphas_cumprod, t, x_t.ndim))


def loss_weights(schedule: Schedule, t: jax.Array, kind: str, max_weight: float) -> jax.Array | None:
  """Per-example weights (B,) of the noise-prediction loss at timesteps t, or None for "none" (official).

  "v": 1 / alpha_bar_t, capped at `max_weight`. The eps error is sqrt(SNR) times the x0 error, so plain eps-MSE
  weighs an error in the image estimate by SNR(t) and pays almost nothing for it at high noise, where only the
  tokens know the image; times 1/alpha_bar = (1 + SNR)/SNR it becomes the v-prediction loss (1 + SNR) |x0 err|^2
  (Salimans & Ho 2022), which keeps a floor of |x0 err|^2 there. The cap keeps the last steps (alpha_bar -> 0)
  from turning the network's small eps errors there into large gradients.
  """
  if kind == "none":
    return None
  if kind == "v":
    return jnp.minimum(1.0 / jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t], max_weight)
  raise UserError(f"Unknown diffusion.loss_weighting {kind!r}; choose one of {LOSS_WEIGHTINGS}.")


def noise_loss(pred: jax.Array, target: jax.Array, kind: str, weights: jax.Array | None = None) -> jax.Array:
  """Mean over C,H,W then batch, as LDM's `p_losses` with l_simple_weight 1 and logvar 0; each example's mean
  times `weights` (B,) when given."""
  if kind == "l1":
    per_example = jnp.abs(pred - target)
  elif kind == "l2":
    per_example = jnp.square(pred - target)
  else:
    raise UserError(f"Unknown diffusion.loss {kind!r}; choose 'l1' (official code) or 'l2' (paper).")
  per_example = per_example.reshape(per_example.shape[0], -1).mean(axis=1)
  return (per_example if weights is None else per_example * weights).mean()
