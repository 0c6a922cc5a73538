"""The VAE objectives of disentanglement_lib (methods/unsupervised/vae.py, methods/shared/losses.py).

loss = reconstruction + regularizer, with
  reconstruction = mean over the batch of the per-image Bernoulli cross-entropy summed over pixels,
  beta-VAE:   regularizer = beta * KL(q(z|x) || N(0, I))
  beta-TCVAE: regularizer = KL + (beta - 1) * TC, TC from the minibatch-weighted-sampling estimator
              (`total_correlation`, constants dropped as in disentanglement_lib).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def bernoulli_reconstruction(targets: jax.Array, logits: jax.Array) -> jax.Array:
  """Per-image sigmoid cross-entropy summed over pixels, (B,); targets in [0, 1] (not subtracting their entropy)."""
  per_pixel = optax.sigmoid_binary_cross_entropy(logits, targets)
  return per_pixel.reshape(per_pixel.shape[0], -1).sum(axis=1)


def gaussian_kl(mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """KL(N(mean, exp(log_var)) || N(0, I)) summed over latents, averaged over the batch (compute_gaussian_kl)."""
  return jnp.mean(0.5 * jnp.sum(jnp.square(mean) + jnp.exp(log_var) - log_var - 1.0, axis=1))


def gaussian_log_density(samples: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """Elementwise log N(samples; mean, exp(log_var))."""
  diff = samples - mean
  return -0.5 * (diff * diff * jnp.exp(-log_var) + log_var + math.log(2.0 * math.pi))


def total_correlation(z: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """Minibatch-weighted-sampling estimate of TC(q(z)) on a batch, without the constant (d - 1) log(B N).

  log q(z_j) ~ logsumexp_i log q(z_j | x_i) and log prod_l q(z_jl) ~ sum_l logsumexp_i log q(z_jl | x_i);
  the estimate is the batch mean of their difference (disentanglement_lib's `total_correlation`).
  """
  log_qz_prob = gaussian_log_density(z[:, None, :], mean[None, :, :], log_var[None, :, :])  # [j, i, l]
  log_qz_product = jnp.sum(jax.nn.logsumexp(log_qz_prob, axis=1), axis=1)
  log_qz = jax.nn.logsumexp(jnp.sum(log_qz_prob, axis=2), axis=1)
  return jnp.mean(log_qz - log_qz_product)


def regularizer(kind: str, beta: float, kl: jax.Array, tc: jax.Array) -> jax.Array:
  if kind == "beta_vae":
    return beta * kl
  if kind == "beta_tcvae":
    return kl + (beta - 1.0) * tc
  raise ValueError(f"baseline.kind must be 'beta_vae' or 'beta_tcvae', got {kind!r}.")
