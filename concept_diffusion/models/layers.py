"""Blocks shared by the UNet (LDM `openaimodel` + `attention.py` semantics), NHWC.

Parameter names mirror the official PyTorch module names ('.' -> '_') so that an importer maps one
to one: `in_layers_0` is `in_layers.0`, `to_out_0` is `to_out.0`, and so on.

`parallel.shard_batch` marks the activations that feed an (FSDP-sharded) weight as split over the batch: under a
mesh with fsdp > 1 sharding propagation would otherwise split them along the features like the weight and then
fail to go back ("involuntary full rematerialization"); outside a mesh it does nothing (docs/performance.md,
"Collectives").
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from concept_diffusion import parallel
from concept_diffusion.models import kernels

Dtype = Any

# PyTorch's default Conv/Linear weight init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros = nn.initializers.zeros


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding ordered [cos, sin] as LDM's `timestep_embedding` (not [sin, cos])."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def conv(features: int, kernel: int, name: str, *, zero_init: bool = False, dtype: Dtype = jnp.float32,
         strides: int = 1, padding: Any = "SAME", impl: str = "auto") -> kernels.Conv:
  # kernels.Conv has nn.Conv's parameters; `impl` only picks how it is computed (see kernels.py).
  return kernels.Conv(features, kernel, strides=strides, padding=padding, impl=impl, dtype=dtype,
                      kernel_init=zeros if zero_init else torch_kernel_init, name=name)


def dense(features: int, name: str, *, use_bias: bool = True, zero_init: bool = False,
          dtype: Dtype = jnp.float32) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=zeros if zero_init else torch_kernel_init,
                  name=name)


def group_norm(groups: int, name: str, eps: float = 1e-5) -> nn.GroupNorm:
  # Computed in fp32 like LDM's GroupNorm32 (`super().forward(x.float())`), whatever the compute dtype.
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=jnp.float32, name=name)


def _resample(x: jax.Array, mode: str) -> jax.Array:
  if mode == "down":  # LDM Downsample(use_conv=False) = AvgPool2d(2)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
  if mode == "up":  # nearest-neighbour x2
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x


class ResBlock(nn.Module):
  """LDM ResBlock with FiLM time conditioning (`use_scale_shift_norm`) and optional up/down resampling.

  With `cond` (B, D) the normalised, time-modulated features are also scaled by (1 + Linear(SiLU(cond))):
  Diff-AE's AdaGN, used by the UNet's `conditioning="adagn"` ablation. Without it no parameter is added.
  """
  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = True
  resample: str = "none"  # none | up | down
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"  # kernels.CONV_IMPLS

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False, cond: jax.Array | None = None) -> jax.Array:
    x = parallel.shard_batch(x)
    h = parallel.shard_batch(nn.silu(group_norm(self.norm_groups, "in_layers_0")(x)).astype(self.dtype))
    h = _resample(h, self.resample)
    x = _resample(x, self.resample)
    h = parallel.shard_batch(conv(self.out_channels, 3, "in_layers_2", dtype=self.dtype, impl=self.conv_impl)(h))

    emb_out = parallel.shard_batch(dense(2 * self.out_channels if self.use_scale_shift_norm else self.out_channels,
                                         "emb_layers_1", dtype=self.dtype)(nn.silu(emb)))[:, None, None, :]
    out_norm = group_norm(self.norm_groups, "out_layers_0")
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = out_norm(h) * (1 + scale) + shift
    else:
      h = out_norm(h + emb_out)
    if cond is not None:  # Diff-AE's cond_emb_layers = Sequential(SiLU, Linear); scale only, no shift
      h = h * (1 + parallel.shard_batch(dense(self.out_channels, "cond_emb_layers_1", dtype=self.dtype)(
          nn.silu(cond)))[:, None, None, :])
    h = nn.Dropout(self.dropout, deterministic=not train)(parallel.shard_batch(nn.silu(h).astype(self.dtype)))
    h = parallel.shard_batch(conv(self.out_channels, 3, "out_layers_3", zero_init=True, dtype=self.dtype,
                                  impl=self.conv_impl)(h))

    if x.shape[-1] != self.out_channels:
      x = parallel.shard_batch(conv(self.out_channels, 1, "skip_connection", dtype=self.dtype, impl=self.conv_impl)(x))
    return parallel.shard_batch(x + h)


class Attention(nn.Module):
  """LDM CrossAttention: q/k/v without bias, out projection with bias, scale dim_head^-0.5.

  With `record_probs`, when the caller makes the `intermediates` collection mutable, the softmax probabilities
  (B, heads, queries, keys) are computed explicitly and sown there; otherwise `kernels.attention(impl=...)`
  computes the same values (up to float rounding) without materialising normalised probabilities.
  """
  heads: int
  dim_head: int
  dropout: float = 0.0
  record_probs: bool = False
  dtype: Dtype = jnp.float32
  impl: str = "auto"  # kernels.ATTENTION_IMPLS

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, train: bool = False) -> jax.Array:
    x = parallel.shard_batch(x)
    context = x if context is None else parallel.shard_batch(context)
    inner = self.heads * self.dim_head
    q = dense(inner, "to_q", use_bias=False, dtype=self.dtype)(x)
    k = dense(inner, "to_k", use_bias=False, dtype=self.dtype)(context)
    v = dense(inner, "to_v", use_bias=False, dtype=self.dtype)(context)
    # (B, T, heads * dim) -> (B, T, heads, dim), batch-split on both sides of the reshape.
    split = lambda t: parallel.shard_batch(parallel.shard_batch(t).reshape(t.shape[:-1] + (self.heads,
                                                                                         self.dim_head)))
    q, k, v = split(q), split(k), split(v)
    if self.record_probs and self.is_mutable_collection("intermediates"):
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (self.dim_head ** -0.5)
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      self.sow("intermediates", "attn_probs", probs)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    else:
      out = kernels.attention(q, k, v, self.dim_head ** -0.5, self.impl)
    out = parallel.shard_batch(parallel.shard_batch(out).reshape(out.shape[:-2] + (inner,)))
    out = parallel.shard_batch(dense(x.shape[-1], "to_out_0", dtype=self.dtype)(out))
    return nn.Dropout(self.dropout, deterministic=not train)(out)


class FeedForward(nn.Module):
  """GEGLU feed-forward: Linear(C -> 2*4C), value * GELU(gate) with the *exact* GELU, Linear(4C -> C)."""
  mult: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    projected = dense(2 * self.mult * dim, "net_0_proj", dtype=self.dtype)(parallel.shard_batch(x))
    value, gate = jnp.split(parallel.shard_batch(projected), 2, axis=-1)
    h = parallel.shard_batch(value * nn.gelu(gate, approximate=False))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return parallel.shard_batch(dense(dim, "net_2", dtype=self.dtype)(h))


class BasicTransformerBlock(nn.Module):
  """Pre-LN block: self-attention, cross-attention over the concept tokens, GEGLU MLP."""
  heads: int
  dim_head: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None, train: bool = False) -> jax.Array:
    """context None: no cross-attention layer at all (the AdaGN ablation), self-attention and MLP only."""
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)
    attn = lambda name, **kw: Attention(self.heads, self.dim_head, self.dropout, dtype=self.dtype,
                                        impl=self.attention_impl, name=name, **kw)
    norm = lambda name, x: parallel.shard_batch(ln(name)(parallel.shard_batch(x)).astype(self.dtype))
    x = x + attn("attn1")(norm("norm1", x), train=train)
    if context is not None:
      x = x + attn("attn2", record_probs=True)(norm("norm2", x), context, train=train)
    x = x + FeedForward(dropout=self.dropout, dtype=self.dtype, name="ff")(norm("norm3", x), train=train)
    return parallel.shard_batch(x)


class SpatialTransformer(nn.Module):
  """GN(eps 1e-6) -> 1x1 conv -> transformer blocks on (B, HW, C) -> zero-init 1x1 conv -> + residual."""
  heads: int
  dim_head: int
  depth: int = 1
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None, train: bool = False) -> jax.Array:
    b, h, w, c = x.shape
    inner = self.heads * self.dim_head
    y = group_norm(self.norm_groups, "norm", eps=1e-6)(parallel.shard_batch(x)).astype(self.dtype)
    y = parallel.shard_batch(conv(inner, 1, "proj_in", dtype=self.dtype, impl=self.conv_impl)(parallel.shard_batch(y)))
    y = parallel.shard_batch(y.reshape(b, h * w, inner))  # (B, H, W, C) -> (B, HW, C)
    for i in range(self.depth):
      y = BasicTransformerBlock(self.heads, self.dim_head, self.dropout, dtype=self.dtype,
                                attention_impl=self.attention_impl, name=f"transformer_blocks_{i}")(
                                    y, context, train=train)
    y = parallel.shard_batch(parallel.shard_batch(y).reshape(b, h, w, inner))
    y = conv(c, 1, "proj_out", zero_init=True, dtype=self.dtype, impl=self.conv_impl)(y)
    return parallel.shard_batch(x + y)
