"""DDPM ancestral and DDIM samplers, each one compiled `lax` loop.

`eps_fn(x_t, t) -> eps` is any closure over the denoiser (tokens, EMA parameters, ...), so the samplers
know nothing about the model.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from concept_diffusion.diffusion.schedule import Schedule, predict_x0

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


def ddim_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
  """LDM's 'uniform' discretisation: range(0, T, T // steps) + 1.

  The +1 shift would index past the schedule when steps == T (LDM crashes there); then the
  unshifted range 0..T-1 is used.
  """
  if not 1 <= steps <= num_timesteps:
    raise ValueError(f"DDIM steps must be in [1, {num_timesteps}], got {steps}.")
  ts = np.arange(0, num_timesteps, num_timesteps // steps)
  return ts if ts[-1] + 1 >= num_timesteps else ts + 1


def ddim_sample(eps_fn: EpsFn, schedule: Schedule, x_T: jax.Array, rng: jax.Array, steps: int,
                eta: float = 1.0, return_x0: bool = False, aux_init: Any = None) -> Any:
  """DDIM from x_T. sigma_t = eta * sqrt((1 - a_prev)/(1 - a) * (1 - a/a_prev)), as LDM's DDIMSampler.

  With `aux_init` (a pytree of zeros), `eps_fn` returns (eps, aux) and the aux values are summed over the
  sampling steps and returned last — e.g. cross-attention maps — without changing the samples.
  """
  ts = ddim_timesteps(schedule.num_timesteps, steps)
  abar = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
  a = abar[ts]
  a_prev = np.concatenate([abar[:1], abar[ts[:-1]]])
  sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
  # Reverse order: the loop walks from the noisiest timestep down.
  consts = tuple(jnp.asarray(c[::-1], jnp.float32) for c in (a, a_prev, sigma))
  ts_rev = jnp.asarray(ts[::-1].copy(), jnp.int32)

  with_aux = aux_init is not None

  def body(i, carry):
    x, _, key, aux_sum = carry
    key, sub = jax.random.split(key)
    a_t, a_p, s_t = (c[i] for c in consts)
    t = jnp.full((x.shape[0],), ts_rev[i], jnp.int32)
    if with_aux:
      eps, aux = eps_fn(x, t)
      aux_sum = jax.tree_util.tree_map(jnp.add, aux_sum, aux)
    else:
      eps = eps_fn(x, t)
    x0 = (x - jnp.sqrt(1 - a_t) * eps) / jnp.sqrt(a_t)
    x = jnp.sqrt(a_p) * x0 + jnp.sqrt(1 - a_p - s_t ** 2) * eps + s_t * jax.random.normal(sub, x.shape, x.dtype)
    return x, x0, key, aux_sum

  x, x0, _, aux_sum = jax.lax.fori_loop(0, len(ts), body, (x_T, jnp.zeros_like(x_T), rng, aux_init))
  out = (x, x0) if return_x0 else (x,)
  if with_aux:
    out = out + (aux_sum,)
  return out if len(out) > 1 else out[0]


def ddpm_sample(eps_fn: EpsFn, schedule: Schedule, x_T: jax.Array, rng: jax.Array) -> jax.Array:
  """Ancestral sampling over all T steps with the posterior variance (LDM `p_sample`, no clipping)."""
  num = schedule.num_timesteps

  def body(i, carry):
    x, key = carry
    key, sub = jax.random.split(key)
    t_scalar = num - 1 - i
    t = jnp.full((x.shape[0],), t_scalar, jnp.int32)
    x0 = predict_x0(schedule, x, t, eps_fn(x, t))
    mean = schedule.take("posterior_mean_coef1", t_scalar) * x0 + schedule.take("posterior_mean_coef2", t_scalar) * x
    noise = jax.random.normal(sub, x.shape, x.dtype) * (t_scalar > 0)
    return mean + jnp.exp(0.5 * schedule.take("posterior_log_variance_clipped", t_scalar)) * noise, key

  x, _ = jax.lax.fori_loop(0, num, body, (x_T, rng))
  return x
