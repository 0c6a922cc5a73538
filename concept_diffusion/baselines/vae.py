"""disentanglement_lib's Gaussian-encoder VAE (`conv_encoder` + `deconv_decoder`), in Flax.

The architecture of the beta-VAE paper's Table 1 (row 3) as disentanglement_lib builds it
(methods/shared/architectures.py): four stride-2 convolutions (32, 32, 64, 64 filters; 4x4, 4x4, 2x2, 2x2
kernels; ReLU; TF "SAME" padding), Dense 256 + ReLU, then two linear heads for the mean and the log-variance.
The decoder mirrors it: Dense 256, Dense to a (H/16, W/16, 64) map, three 4x4 stride-2 transposed convolutions
(64, 32, 32) with ReLU and a last one to the image channels with no activation: Bernoulli logits per pixel.
At 64x64 the reshape is disentanglement_lib's 4x4x64 exactly; other sizes (multiples of 16) scale it.
Initialisers are TF1's layer defaults (Glorot-uniform kernels, zero biases).

Images come in as everywhere in this package, in [-1, 1]; the encoder sees them in [0, 1] as in
disentanglement_lib, and the decoder's logits are those of [0, 1] pixel intensities.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_kernel_init = nn.initializers.glorot_uniform()


def to_unit_interval(images: jax.Array) -> jax.Array:
  """[-1, 1] (this package's convention) -> [0, 1] (disentanglement_lib's inputs and Bernoulli targets)."""
  return (images + 1.0) / 2.0


class ConvEncoder(nn.Module):
  """Images (B, H, W, C) in [-1, 1] -> (mean, log_var), each (B, latent_dim)."""
  latent_dim: int = 10

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = to_unit_interval(images)
    for i, (features, kernel) in enumerate(((32, 4), (32, 4), (64, 2), (64, 2))):
      h = nn.relu(nn.Conv(features, (kernel, kernel), strides=(2, 2), padding="SAME", kernel_init=_kernel_init,
                          name=f"e{i + 1}")(h))
    h = nn.relu(nn.Dense(256, kernel_init=_kernel_init, name="e5")(h.reshape(h.shape[0], -1)))
    mean = nn.Dense(self.latent_dim, kernel_init=_kernel_init, name="means")(h)
    log_var = nn.Dense(self.latent_dim, kernel_init=_kernel_init, name="log_var")(h)
    return mean, log_var


class DeconvDecoder(nn.Module):
  """Latents (B, latent_dim) -> per-pixel Bernoulli logits (B, H, W, C)."""
  image_size: int = 64
  channels: int = 3

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    side = self.image_size // 16
    h = nn.relu(nn.Dense(256, kernel_init=_kernel_init, name="d1")(z))
    h = nn.relu(nn.Dense(side * side * 64, kernel_init=_kernel_init, name="d2")(h))
    h = h.reshape(h.shape[0], side, side, 64)
    for i, features in enumerate((64, 32, 32)):
      h = nn.relu(nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding="SAME", kernel_init=_kernel_init,
                                   name=f"d{i + 3}")(h))
    return nn.ConvTranspose(self.channels, (4, 4), strides=(2, 2), padding="SAME", kernel_init=_kernel_init,
                            name="d6")(h)


class GaussianVAE(nn.Module):
  """`encode` -> (mean, log_var); `decode` -> logits; `__call__` (for init) runs both on the mean."""
  latent_dim: int = 10
  image_size: int = 64
  channels: int = 3

  def setup(self):
    if self.image_size % 16:
      raise ValueError(f"The VAE baseline needs an image size divisible by 16, got {self.image_size}.")
    self.encoder = ConvEncoder(self.latent_dim)
    self.decoder = DeconvDecoder(self.image_size, self.channels)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.encoder(images)

  def decode(self, z: jax.Array) -> jax.Array:
    return self.decoder(z)

  def __call__(self, images: jax.Array) -> jax.Array:
    mean, _ = self.encode(images)
    return self.decode(mean)


def build_vae(config) -> GaussianVAE:
  return GaussianVAE(latent_dim=config.baseline.latent_dim, image_size=config.data.image_size,
                     channels=config.data.channels)


def reparameterize(rng: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """z = mean + exp(log_var / 2) * eps, eps ~ N(0, I) (disentanglement_lib's sample_from_latent_distribution)."""
  return mean + jnp.exp(log_var / 2) * jax.random.normal(rng, mean.shape, mean.dtype)
