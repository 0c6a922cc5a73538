"""Convolution and attention with a choice of implementation; the math and the parameters never change.

Why (measured on the 2-core EPYC dev VM, batch 32, forward + backward): XLA:CPU runs a 3x3 convolution over a
feature map that is not larger than the kernel (the UNet's 2x2 level) on a slow generic path, 2x2x512->256 in
617 ms by `lax.conv` vs 24 ms as a matmul, and 4x4 maps are 1.2-1.45x faster as matmuls too (8x8 and larger are
not); XLA's `dot_product_attention` scales and normalises the full (B, heads, queries, keys) tensor where the
(B, queries, heads, dim) output is 32x smaller at dim_head 8 (a 16x16 self-attention layer: 1.3x faster as
`einsum`). `auto` picks the measured-faster form per backend; every form gives the same values up to float
rounding, and the parameters (names, shapes, initialisation) are those of `nn.Conv`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ("auto", "xla", "matmul")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum")
# auto: feature maps with at most this many positions (4x4) use the matmul form on CPU.
_MATMUL_MAX_POSITIONS = 16


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


class Conv(nn.Module):
  """`nn.Conv` (NHWC, HWIO kernel, bias) as `lax.conv` or as one matmul over the k*k shifted copies (im2col)."""
  features: int
  kernel_size: int
  strides: int = 1
  padding: Any = "SAME"
  impl: str = "auto"
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.impl not in CONV_IMPLS:
      raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {self.impl!r}.")
    k, s = self.kernel_size, self.strides
    # Same creation order, names, shapes and dtypes as nn.Conv, so initialisation and checkpoints match it.
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    pads = (jax.lax.padtype_to_pads(x.shape[1:3], (k, k), (s, s), self.padding)
            if isinstance(self.padding, str) else tuple(tuple(p) for p in self.padding))
    impl = self.impl
    if impl == "auto":
      small = x.shape[1] * x.shape[2] <= _MATMUL_MAX_POSITIONS
      impl = "matmul" if (k == 1 or small) and _on_cpu() else "xla"
    if impl == "xla":
      y = jax.lax.conv_general_dilated(x, kernel, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      y = _im2col(x, k, s, pads) @ kernel.reshape(k * k * x.shape[-1], self.features)
    return y + bias


def _im2col(x: jax.Array, k: int, s: int, pads) -> jax.Array:
  """(B, H', W', k*k*C): the k*k shifted (strided) windows side by side, ordered as the HWIO kernel's rows."""
  if k == 1 and s == 1 and all(p == (0, 0) for p in pads):
    return x
  x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
  out_h = (x.shape[1] - k) // s + 1
  out_w = (x.shape[2] - k) // s + 1
  cols = [x[:, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s, :] for i in range(k) for j in range(k)]
  return jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]


def _cudnn_fits(q: jax.Array) -> bool:
  """cuDNN's fused (flash) attention: on a CUDA GPU, 16-bit inputs and a head size that is a multiple of 8 up to
  128 (jax.nn.dot_product_attention's checks); otherwise XLA's attention is the one that runs."""
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, impl: str = "auto") -> jax.Array:
  """softmax(q k^T * scale) v over (B, T, heads, dim) inputs, without materialising the normalised probabilities
  where the implementation allows. Use the explicit softmax when the probabilities themselves are wanted."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}.")
  if impl == "auto" and not _on_cpu():
    impl = "cudnn" if _cudnn_fits(q) else "xla"
    if impl == "cudnn":
      try:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
      except (RuntimeError, ValueError, NotImplementedError):
        impl = "xla"  # no cuDNN (or too old) on this host: the fused kernel is an optimisation, not a requirement
  if impl in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
  # Scale the (small) queries, not the logits; normalise the (small) output, not the probabilities. The max is a
  # constant shift: softmax does not depend on it, so no gradient flows through it (as in jax.nn.softmax).
  # Heads go before positions first: the batched matmuls then read contiguous (T, dim) panels, which XLA:CPU
  # runs 1.2-1.7x faster at 256 queries (forward + backward) than with the heads interleaved.
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q * jnp.asarray(scale, q.dtype), k, v))  # (B, heads, T, dim)
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return jnp.swapaxes(out / weights.sum(axis=-1, keepdims=True), 1, 2).astype(v.dtype)
