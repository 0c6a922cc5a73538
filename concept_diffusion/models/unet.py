"""The denoiser: LDM `openaimodel` UNet whose SpatialTransformers cross-attend to the concept tokens.

Module names follow the official state dict (`input_blocks_4_0` = `input_blocks.4.0`), so every parameter
has one obvious official counterpart. Cross-attention is the only path from the tokens into the UNet, unless
`conditioning="adagn"` (the paper's Table 3 ablation) routes them through the ResBlocks' norms instead.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from concept_diffusion import parallel
from concept_diffusion.models.conditioning import CONDITIONINGS, conditioning_options
from concept_diffusion.models.layers import ResBlock, SpatialTransformer, conv, dense, group_norm, timestep_embedding


class UNet(nn.Module):
  """Predicts the noise of a latent (B, H, W, C) at timesteps (B,) given tokens (B, N, token_dim).

  Call with `mutable=["intermediates"]` to also get every cross-attention layer's probabilities
  (`.../attn2/attn_probs`, shape (B, heads, H*W, N)); the output is the same either way up to float rounding
  (captured layers compute the softmax explicitly, the others by `attention_impl`).

  `conv_impl` / `attention_impl` choose how convolutions and attention are computed (models/kernels.py), never
  what; `remat` recomputes each ResBlock's and SpatialTransformer's activations in the backward pass instead of
  storing them (less memory for large batches, about one more forward pass of compute).

  `conditioning` names a registered conditioning (models/conditioning.py) that routes the tokens to the
  cross-attention layers (default), the ResBlocks' norms (AdaGN, paper Table 3), the timestep embedding, or
  nowhere. The call signature is the same for all, so training, generation and evaluation do not change.
  """
  in_channels: int = 3
  out_channels: int = 3
  model_channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (1, 2, 4)
  num_heads: int = 8
  transformer_depth: int = 1
  dropout: float = 0.0
  use_scale_shift_norm: bool = True
  resblock_updown: bool = True
  norm_groups: int = 32
  conditioning: str = "cross_attention"  # a name in models/conditioning.CONDITIONINGS
  # Its own fields (config.unet.<conditioning>.*) as (key, value) pairs: keyword arguments of the conditioning.
  conditioning_options: tuple[tuple[str, Any], ...] = ()
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  attention_impl: str = "auto"
  remat: bool = False
  # Paper Table 3's "EncDec w/o Diff": x is replaced by one learned tensor (initialised N(0, 1), shared by the
  # batch), so the output can depend on the image only through the tokens.
  learned_input: bool = False
  # Space-to-depth stem (config unet.patch_size): the UNet runs on (H/p, W/p, p*p*C) and its output is shuffled back.
  patch_size: int = 1

  def _res(self, ch: int, name: str, resample: str = "none") -> ResBlock:
    # static_argnums counts `self`: 3 is `train` in block(x, emb, train, cond).
    cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
    return cls(ch, self.dropout, self.use_scale_shift_norm, resample, self.norm_groups, self.dtype,
               conv_impl=self.conv_impl, name=name)

  def _attn(self, ch: int, name: str) -> SpatialTransformer:
    # legacy=True with a spatial transformer: dim_head = channels // num_heads.
    cls = nn.remat(SpatialTransformer, static_argnums=(3,)) if self.remat else SpatialTransformer
    return cls(self.num_heads, ch // self.num_heads, self.transformer_depth, self.dropout, self.norm_groups,
               self.dtype, conv_impl=self.conv_impl, attention_impl=self.attention_impl, name=name)

  @nn.compact
  def __call__(self, x: jax.Array, timesteps: jax.Array, context: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"UNet expects NHWC latents with {self.in_channels} channels, got shape {x.shape}.")
    emb_dim = 4 * self.model_channels
    emb = timestep_embedding(timesteps, self.model_channels)
    # parallel.shard_batch: activations stay split over the batch under FSDP (models/layers.py).
    emb = parallel.shard_batch(dense(emb_dim, "time_embed_0", dtype=self.dtype)(emb.astype(self.dtype)))
    emb = parallel.shard_batch(dense(emb_dim, "time_embed_2", dtype=self.dtype)(nn.silu(emb)))
    if self.conditioning not in CONDITIONINGS:
      raise ValueError(f"unet.conditioning={self.conditioning!r} is not registered; known: {sorted(CONDITIONINGS)}.")
    routes = CONDITIONINGS[self.conditioning](emb_dim=emb_dim, dtype=self.dtype, name="conditioning",
                                              **dict(self.conditioning_options))(context.astype(self.dtype))
    context, cond = routes.context, routes.adagn
    context = None if context is None else parallel.shard_batch(context)
    cond = None if cond is None else parallel.shard_batch(cond)
    if routes.emb is not None:
      emb = parallel.shard_batch(emb + routes.emb.astype(emb.dtype))

    if self.learned_input:
      x = jnp.broadcast_to(self.param("learned_input", nn.initializers.normal(1.0), (1,) + x.shape[1:]), x.shape)
    x = space_to_depth(x, self.patch_size)
    h = parallel.shard_batch(conv(self.model_channels, 3, "input_blocks_0_0", dtype=self.dtype,
                                  impl=self.conv_impl)(parallel.shard_batch(x.astype(self.dtype))))
    skips = [h]
    ch, ds, block = self.model_channels, 1, 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        ch = mult * self.model_channels
        h = self._res(ch, f"input_blocks_{block}_0")(h, emb, train, cond)
        if ds in self.attention_resolutions:
          h = self._attn(ch, f"input_blocks_{block}_1")(h, context, train)
        skips.append(h)
        block += 1
      if level != len(self.channel_mult) - 1:
        if self.resblock_updown:
          h = self._res(ch, f"input_blocks_{block}_0", resample="down")(h, emb, train, cond)
        else:
          h = conv(ch, 3, f"input_blocks_{block}_0_op", strides=2, padding=((1, 1), (1, 1)), dtype=self.dtype,
                   impl=self.conv_impl)(h)
        skips.append(h)
        block += 1
        ds *= 2

    h = self._res(ch, "middle_block_0")(h, emb, train, cond)
    h = self._attn(ch, "middle_block_1")(h, context, train)
    h = self._res(ch, "middle_block_2")(h, emb, train, cond)

    block = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = parallel.shard_batch(jnp.concatenate([h, skips.pop()], axis=-1))
        ch = mult * self.model_channels
        h = self._res(ch, f"output_blocks_{block}_0")(h, emb, train, cond)
        sub = 1
        if ds in self.attention_resolutions:
          h = self._attn(ch, f"output_blocks_{block}_1")(h, context, train)
          sub = 2
        if level and i == self.num_res_blocks:
          if self.resblock_updown:
            h = self._res(ch, f"output_blocks_{block}_{sub}", resample="up")(h, emb, train, cond)
          else:
            h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
            h = conv(ch, 3, f"output_blocks_{block}_{sub}_conv", dtype=self.dtype, impl=self.conv_impl)(h)
          ds //= 2
        block += 1

    h = parallel.shard_batch(nn.silu(group_norm(self.norm_groups, "out_0")(h)).astype(self.dtype))
    out = parallel.shard_batch(conv(self.out_channels * self.patch_size ** 2, 3, "out_2", zero_init=True,
                                    dtype=self.dtype, impl=self.conv_impl)(h))
    return depth_to_space(out, self.patch_size).astype(jnp.float32)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/p, W/p, p*p*C): each p x p patch becomes one position (channels row, column, C)."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  if h % p or w % p:
    raise ValueError(f"unet.patch_size={p} must divide the UNet's input size {h}x{w}.")
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
  """The inverse of `space_to_depth`."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c // (p * p))


def build_unet(unet_config, latent_channels: int, dtype: Any = jnp.float32, learned_input: bool = False) -> UNet:
  return UNet(in_channels=latent_channels, out_channels=latent_channels, model_channels=unet_config.model_channels,
              channel_mult=tuple(unet_config.channel_mult), num_res_blocks=unet_config.num_res_blocks,
              attention_resolutions=tuple(unet_config.attention_resolutions), num_heads=unet_config.num_heads,
              transformer_depth=unet_config.transformer_depth, dropout=unet_config.dropout,
              use_scale_shift_norm=unet_config.use_scale_shift_norm, resblock_updown=unet_config.resblock_updown,
              norm_groups=unet_config.norm_groups, conditioning=unet_config.conditioning,
              conditioning_options=conditioning_options(unet_config), dtype=dtype,
              conv_impl=unet_config.conv_impl, attention_impl=unet_config.attention_impl, remat=unet_config.remat,
              learned_input=learned_input, patch_size=unet_config.patch_size)
