"""DDPM ancestral and DDIM samplers, each one compiled `lax` loop.

`eps_fn(x_t, t) -> prediction` is any closure over the denoiser (tokens, EMA parameters, ...), so the samplers
know nothing about the model. The prediction is eps (official) or, with `prediction="v"`, v = sqrt(a) eps -
sqrt(1 - a) x0 (Salimans & Ho 2022), from which x0 = sqrt(a) x - sqrt(1 - a) v needs no division by sqrt(a).

Three things decide whether a sampler is stable where the schedule ends near alpha_bar = 0 (the cosine schedule
with betas clipped at 0.999 ends at alpha_bar_T = 2.4e-9): there x0 = (x - sqrt(1 - a) eps) / sqrt(a) multiplies
the network's eps error by 1 / sqrt(a) ~ 2e4.
  - `clip_x0`: the x0 estimate clipped to the data range ([-1, 1] for pixels) before the update, with eps
    recomputed from it (ADM and LDM's DDPM `clip_denoised`); only meaningful where the data range is known.
  - `spacing`: which timesteps a shortened chain visits. "leading" is LDM's DDIM grid (range(0, T, T // S) + 1:
    starts at t = 996 for 200 steps, 981 for 50); "trailing" (Lin et al. 2024, Table 2) always starts at T - 1.
  - `min_alpha_bar`: the chain starts at the largest t whose alpha_bar is at least this (0: at the end of the
    schedule), a floor on the terminal SNR that x_T ~ N(0, I) still matches to sqrt(min_alpha_bar).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from concept_diffusion.diffusion.schedule import Schedule

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
SPACINGS = ("leading", "trailing")
PREDICTIONS = ("eps", "v")
ClipRange = Optional[tuple[float, float]]


def last_timestep(schedule: Schedule, min_alpha_bar: float = 0.0) -> int:
  """The largest t with alpha_bar_t >= min_alpha_bar (T - 1 when 0)."""
  abar = np.asarray(schedule.alphas_cumprod)
  if not 0.0 <= min_alpha_bar < abar[0]:
    raise ValueError(f"min_alpha_bar must be in [0, alpha_bar_0 = {abar[0]:.6f}), got {min_alpha_bar}.")
  return int(np.flatnonzero(abar >= min_alpha_bar)[-1])


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "leading") -> np.ndarray:
  """The visited timesteps, ascending, for a chain over t in [0, num_timesteps).

  leading: LDM's 'uniform' discretisation, range(0, T, T // steps) + 1; the +1 shift would index past the
  schedule when steps == T (LDM crashes there), then the unshifted range 0..T-1 is used.
  trailing: round(T, T - T/steps, ..., T/steps) - 1, which always includes T - 1 and equals 0..T-1 at steps == T.
  """
  if not 1 <= steps <= num_timesteps:
    raise ValueError(f"DDIM steps must be in [1, {num_timesteps}], got {steps}.")
  if spacing == "leading":
    ts = np.arange(0, num_timesteps, num_timesteps // steps)
    return ts if ts[-1] + 1 >= num_timesteps else ts + 1
  if spacing == "trailing":
    return np.round(np.arange(num_timesteps, 0, -num_timesteps / steps))[::-1].astype(np.int64) - 1
  raise ValueError(f"Unknown timestep spacing {spacing!r}; choose one of {SPACINGS}.")


def chain(schedule: Schedule, steps: int, spacing: str = "leading", min_alpha_bar: float = 0.0) -> np.ndarray:
  """The timesteps a sampler of `steps` visits (LDM's leading grid can give one more than asked)."""
  return ddim_timesteps(last_timestep(schedule, min_alpha_bar) + 1, steps, spacing)


def _x0_and_eps(x, out, sqrt_a, sqrt_1ma, clip_x0: ClipRange, prediction: str):
  """(x0, eps) from the denoiser's output; with `clip_x0`, x0 clipped to the range and eps made consistent with it
  again."""
  if prediction == "v":
    x0, eps = sqrt_a * x - sqrt_1ma * out, sqrt_1ma * x + sqrt_a * out
  elif prediction == "eps":
    x0, eps = (x - sqrt_1ma * out) / sqrt_a, out
  else:
    raise ValueError(f"Unknown prediction {prediction!r}; choose one of {PREDICTIONS}.")
  if clip_x0 is None:
    return x0, eps
  x0 = jnp.clip(x0, *clip_x0)
  return x0, (x - sqrt_a * x0) / sqrt_1ma


def _device_consts(*columns: np.ndarray) -> tuple[jax.Array, ...]:
  """float64 per-step constants -> float32 device arrays in loop order (noisiest first). Square roots are taken in
  float64 first: alpha_bar itself can underflow float32 (the 'sqrt' schedule ends at 3e-44)."""
  return tuple(jnp.asarray(c[::-1], jnp.float32) for c in columns)


def ddim_sample(eps_fn: EpsFn, schedule: Schedule, x_T: jax.Array, rng: jax.Array, steps: int,
                eta: float = 1.0, return_x0: bool = False, aux_init: Any = None, *, clip_x0: ClipRange = None,
                spacing: str = "leading", min_alpha_bar: float = 0.0, prediction: str = "eps") -> Any:
  """DDIM from x_T. sigma_t = eta * sqrt((1 - a_prev)/(1 - a) * (1 - a/a_prev)), as LDM's DDIMSampler; eta = 1 is
  the DDPM posterior of the shortened chain, eta = 0 deterministic. The last step goes to alpha_bar_0, as LDM.

  With `aux_init` (a pytree of zeros), `eps_fn` returns (eps, aux) and the aux values are summed over the
  sampling steps and returned last (e.g. cross-attention maps) without changing the samples.
  """
  ts = chain(schedule, steps, spacing, min_alpha_bar)
  abar = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
  a = abar[ts]
  a_prev = np.concatenate([abar[:1], abar[ts[:-1]]])
  sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
  consts = _device_consts(np.sqrt(a), np.sqrt(1 - a), np.sqrt(a_prev), np.sqrt(np.maximum(1 - a_prev - sigma ** 2, 0)),
                          sigma)
  ts_rev = jnp.asarray(ts[::-1].copy(), jnp.int32)
  with_aux = aux_init is not None

  def body(i, carry):
    x, _, key, aux_sum = carry
    key, sub = jax.random.split(key)
    sqrt_a, sqrt_1ma, sqrt_ap, dir_coef, s_t = (c[i] for c in consts)
    t = jnp.full((x.shape[0],), ts_rev[i], jnp.int32)
    if with_aux:
      eps, aux = eps_fn(x, t)
      aux_sum = jax.tree_util.tree_map(jnp.add, aux_sum, aux)
    else:
      eps = eps_fn(x, t)
    x0, eps = _x0_and_eps(x, eps, sqrt_a, sqrt_1ma, clip_x0, prediction)
    x = sqrt_ap * x0 + dir_coef * eps + s_t * jax.random.normal(sub, x.shape, x.dtype)
    return x, x0, key, aux_sum

  x, x0, _, aux_sum = jax.lax.fori_loop(0, len(ts), body, (x_T, jnp.zeros_like(x_T), rng, aux_init))
  out = (x, x0) if return_x0 else (x,)
  if with_aux:
    out = out + (aux_sum,)
  return out if len(out) > 1 else out[0]


def ddpm_sample(eps_fn: EpsFn, schedule: Schedule, x_T: jax.Array, rng: jax.Array, steps: Optional[int] = None, *,
                clip_x0: ClipRange = None, spacing: str = "leading", min_alpha_bar: float = 0.0,
                prediction: str = "eps") -> jax.Array:
  """Ancestral sampling with the posterior variance (LDM `p_sample`; `clip_x0` is its `clip_denoised`).

  `steps` < T samples the respaced chain of those timesteps (improved DDPM's respacing: betas 1 - a_t / a_prev
  between visited steps); the last step goes to alpha_bar = 1, noise-free. None: all T steps.
  """
  ts = chain(schedule, steps or schedule.num_timesteps, spacing, min_alpha_bar)
  abar = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
  a = abar[ts]
  a_prev = np.concatenate([[1.0], a[:-1]])
  betas = 1 - a / a_prev
  variance = betas * (1 - a_prev) / (1 - a)
  log_variance = np.log(np.maximum(np.append(variance[1:2], variance[1:]) if len(ts) > 1 else variance, 1e-20))
  consts = _device_consts(np.sqrt(a), np.sqrt(1 - a), betas * np.sqrt(a_prev) / (1 - a),
                          (1 - a_prev) * np.sqrt(1 - betas) / (1 - a), np.exp(0.5 * log_variance))
  ts_rev = jnp.asarray(ts[::-1].copy(), jnp.int32)
  num = len(ts)

  def body(i, carry):
    x, key = carry
    key, sub = jax.random.split(key)
    sqrt_a, sqrt_1ma, coef_x0, coef_x, std = (c[i] for c in consts)
    t = jnp.full((x.shape[0],), ts_rev[i], jnp.int32)
    x0, _ = _x0_and_eps(x, eps_fn(x, t), sqrt_a, sqrt_1ma, clip_x0, prediction)
    noise = jax.random.normal(sub, x.shape, x.dtype) * (i < num - 1)
    return coef_x0 * x0 + coef_x * x + std * noise, key

  x, _ = jax.lax.fori_loop(0, num, body, (x_T, rng))
  return x
