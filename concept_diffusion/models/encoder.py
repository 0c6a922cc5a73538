"""Concept encoder: the official `Encoder4` CNN -> N scalars, and N non-shared MLPs scalar -> token."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from concept_diffusion import parallel
from concept_diffusion.models.layers import torch_kernel_init


class _EncResBlock(nn.Module):
  """x + [ReLU -> conv3x3 -> BN -> ReLU -> conv1x1](x) (official `EncResBlock(bn=True)`)."""
  width: int
  bn: dict

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # Batch-split activations around the (FSDP-sharded) kernels: parallel.shard_batch, models/layers.py.
    x = parallel.shard_batch(x)
    h = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), kernel_init=torch_kernel_init, name="convs_1")(
        nn.relu(x))
    h = parallel.shard_batch(nn.relu(nn.BatchNorm(use_running_average=not train, name="convs_2", **self.bn)(
        parallel.shard_batch(h))))
    return parallel.shard_batch(x + nn.Conv(self.width, (1, 1), kernel_init=torch_kernel_init, name="convs_4")(h))


class ConceptEncoder(nn.Module):
  """Image (B, H, W, C) in [-1, 1] -> N scalars (the representation) -> N tokens (the UNet's context).

  The trunk is `Encoder4` layer for layer, including the missing ReLU after the third conv. The
  token MLPs are stored stacked (N, in, out) — one independent MLP per scalar, evaluated in one einsum.
  PyTorch BatchNorm updates running_var with the unbiased variance, Flax with the biased one; at
  B*4*4 >= 2048 values per channel the difference is < 0.05%.
  """
  num_tokens: int = 20
  token_dim: int = 16
  width: int = 128
  mlp_widths: Sequence[int] = (64, 128)
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  strides: Sequence[int] = (2, 2, 2, 2)  # of the four 4x4 convolutions; 1 keeps the size (config encoder.strides)

  def setup(self):
    bn = dict(momentum=self.bn_momentum, epsilon=self.bn_eps)
    # A 4x4 kernel at stride 2 with padding 1 halves the map; at stride 1 it needs 1 + 2 to keep it.
    pads = {2: ((1, 1), (1, 1)), 1: ((1, 2), (1, 2))}
    self.convs = [nn.Conv(self.width, (4, 4), strides=(s, s), padding=pads[s], kernel_init=torch_kernel_init,
                          name=f"encoder_{i}") for i, s in zip((0, 3, 6, 8), self.strides)]
    self.norms = [nn.BatchNorm(name=f"encoder_{i}", **bn) for i in (1, 4, 7, 9, 12)]
    self.res = [_EncResBlock(self.width, bn, name=f"encoder_{i}") for i in (11, 14)]
    self.head = nn.Dense(self.num_tokens, kernel_init=torch_kernel_init, name="encoder_16")
    self.mlp = token_mlp_params(self, self.num_tokens, self.mlp_widths, self.token_dim)

  def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"ConceptEncoder expects NHWC images, got shape {x.shape}.")
    h = parallel.shard_batch(x)
    for i, conv in enumerate(self.convs):
      h = self.norms[i](parallel.shard_batch(conv(h)), use_running_average=not train)
      if i != 2:  # Encoder4 has no ReLU after its third conv+BN
        h = nn.relu(h)
      h = parallel.shard_batch(h)
    h = self.res[0](h, train)
    h = parallel.shard_batch(nn.relu(self.norms[4](h, use_running_average=not train)))
    h = self.res[1](h, train)
    # PyTorch flattens NCHW; transpose so the Linear's input order matches an imported official weight.
    h = parallel.shard_batch(jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1))
    return parallel.shard_batch(self.head(h))

  def tokens(self, scalars: jax.Array) -> jax.Array:
    """(B, N) scalars -> (B, N, token_dim); token k depends only on scalar k."""
    return parallel.shard_batch(apply_token_mlp(parallel.shard_batch(scalars), self.mlp))

  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    scalars = self.encode(x, train)
    return scalars, self.tokens(scalars)


def token_mlp_params(module: nn.Module, num_tokens: int, mlp_widths: Sequence[int],
                     token_dim: int) -> list[tuple[jax.Array, jax.Array]]:
  """The N independent MLPs 1 -> mlp_widths -> token_dim of `module` (call from its setup), stored stacked
  (N, in, out) as `net_<2j>_kernel` / `net_<2j>_bias` (the official `net.<2j>` names). Any encoder can reuse them."""
  dims = (1, *mlp_widths, token_dim)
  return [(module.param(f"net_{2 * j}_kernel", _stacked_uniform(d_in), (num_tokens, d_in, d_out)),
           module.param(f"net_{2 * j}_bias", _stacked_uniform(d_in), (num_tokens, d_out)))
          for j, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:]))]


def apply_token_mlp(scalars: jax.Array, mlp: Sequence[tuple[jax.Array, jax.Array]]) -> jax.Array:
  """(B, N) scalars -> (B, N, token_dim) through `token_mlp_params`' MLPs, ELU between layers."""
  h = scalars[..., None]
  for j, (kernel, bias) in enumerate(mlp):
    h = jnp.einsum("bni,nio->bno", h, kernel) + bias
    if j < len(mlp) - 1:
      h = nn.elu(h)
  return h


def _stacked_uniform(fan_in: int):
  """PyTorch Linear init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases of each stacked MLP."""
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def build_encoder(enc_config) -> ConceptEncoder:
  return ConceptEncoder(num_tokens=enc_config.num_tokens, token_dim=enc_config.token_dim, width=enc_config.width,
                        mlp_widths=tuple(enc_config.mlp_widths), bn_momentum=enc_config.bn_momentum,
                        bn_eps=enc_config.bn_eps, strides=tuple(enc_config.strides))
