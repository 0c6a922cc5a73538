"""First-stage autoencoders (taming/LDM semantics), NHWC, and the PatchGAN discriminator.

EncDiff diffuses in the latent space of a frozen VQ-reg autoencoder (`VQModel`, f=4: 64x64x3 -> 16x16x3).
The module tree mirrors the official PyTorch modules so that an importer maps parameters one to one:
PyTorch `encoder.down.1.block.0.nin_shortcut.weight` is `encoder/down_1_block_0/nin_shortcut/kernel` here
(list indices joined with '_', Conv2d weight OIHW -> `kernel` HWIO, GroupNorm/BatchNorm weight -> `scale`,
`quantize.embedding.weight` -> `quantize/embedding`, discriminator `main.N` -> `main_N`).

Initialisation follows PyTorch defaults (conv weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))) and taming's
explicit inits (codebook U(-1/n_e, 1/n_e); discriminator conv N(0, 0.02), BatchNorm scale N(1, 0.02)), so that a
from-scratch run here trains like the official one.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array
Initializer = Callable[..., Array]
Padding = Union[int, Sequence[tuple[int, int]]]

FIRST_STAGE_KINDS = ("vq", "kl", "none")


def _uniform(bound: float) -> Initializer:
  def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Conv2d(nn.Module):
  """NHWC conv with a `kernel` (HWIO) and `bias` initialised like torch.nn.Conv2d.

  torch's default init is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight (kaiming_uniform, a=sqrt(5)) and for
  the bias; flax.linen.Conv would start the bias at zero. Having our own module also keeps the parameter tree
  flat (`conv_in/kernel`), which is what the importer maps.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: Padding = 1  # int: symmetric, as torch's `padding=`; or ((top, bottom), (left, right))
  use_bias: bool = True
  kernel_init: Optional[Initializer] = None  # None: torch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in))

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_features = x.shape[-1]
    k = self.kernel_size
    kernel_shape = (k, k, in_features, self.features)
    bound = 1.0 / math.sqrt(in_features * k * k)
    bias_init = _uniform(bound)
    kernel_init = self.kernel_init
    if kernel_init is None and self.use_bias:
      # Torch draws kernel and bias from the same U(-bound, bound): take both from one random draw. XLA:CPU
      # compiles every jax.random call into its own large fusion (~0.3 s of CPU each), which made initialising
      # even the tiny test models take tens of seconds; one draw per conv halves that.
      joint = {}

      def kernel_init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, (math.prod(shape) + self.features,), dtype, -bound, bound)
        joint["bias"] = u[math.prod(shape):]
        return u[:math.prod(shape)].reshape(shape)

      bias_init = lambda key, shape, dtype=jnp.float32: joint["bias"]
    elif kernel_init is None:
      kernel_init = _uniform(bound)
    kernel = self.param("kernel", kernel_init, kernel_shape, jnp.float32)
    if isinstance(self.padding, int):
      padding = ((self.padding, self.padding), (self.padding, self.padding))
    else:
      padding = tuple(tuple(p) for p in self.padding)
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=(self.strides, self.strides), padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(y.dtype)
    return y


def _group_norm(groups: int, name: str) -> nn.GroupNorm:
  # taming's Normalize: GroupNorm(32, eps=1e-6, affine=True); groups come from the config so tiny test models
  # (fewer than 32 channels) can still be built.
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, name=name)


class ResnetBlock(nn.Module):
  """taming ResnetBlock without time embedding: norm-swish-conv, norm-swish-dropout-conv, plus a 1x1 shortcut."""
  out_channels: int
  norm_groups: int = 32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    h = nn.swish(_group_norm(self.norm_groups, "norm1")(x))
    h = Conv2d(self.out_channels, 3, name="conv1")(h)
    h = nn.swish(_group_norm(self.norm_groups, "norm2")(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = Conv2d(self.out_channels, 3, name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = Conv2d(self.out_channels, 1, padding=0, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """taming AttnBlock: one-head self-attention over all pixels with 1x1-conv q, k, v and proj_out."""
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hh, ww, c = x.shape
    h = _group_norm(self.norm_groups, "norm")(x)
    q = Conv2d(c, 1, padding=0, name="q")(h).reshape(b, hh * ww, c)
    k = Conv2d(c, 1, padding=0, name="k")(h).reshape(b, hh * ww, c)
    v = Conv2d(c, 1, padding=0, name="v")(h).reshape(b, hh * ww, c)
    logits = jnp.einsum("bic,bjc->bij", q, k) * (c ** -0.5)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum("bij,bjc->bic", attn, v).reshape(b, hh, ww, c)
    return x + Conv2d(c, 1, padding=0, name="proj_out")(h)


class Downsample(nn.Module):
  """taming Downsample(with_conv=True): zero-pad right and bottom by one, then a 3x3 stride-2 conv.

  The asymmetric pad (F.pad(x, (0, 1, 0, 1))) matters for weight import: a symmetric padding=1 would shift the
  sampling grid by one pixel and an imported model would reconstruct shifted images.
  """

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return Conv2d(x.shape[-1], 3, strides=2, padding=((0, 1), (0, 1)), name="conv")(x)


class Upsample(nn.Module):
  """taming Upsample(with_conv=True): nearest-neighbour x2, then a 3x3 conv."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv2d(x.shape[-1], 3, name="conv")(x)


class Encoder(nn.Module):
  """taming/LDM Encoder. Attention levels are chosen by the current spatial size, as `attn_resolutions` is."""
  ch: int = 32
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  z_channels: int = 3
  double_z: bool = False
  dropout: float = 0.0
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    g = self.norm_groups
    h = Conv2d(self.ch, 3, name="conv_in")(x)
    curr_res = x.shape[1]
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = ResnetBlock(self.ch * mult, g, self.dropout, name=f"down_{i}_block_{j}")(h, train)
        if curr_res in self.attn_resolutions:
          h = AttnBlock(g, name=f"down_{i}_attn_{j}")(h)
      if i != len(self.ch_mult) - 1:
        h = Downsample(name=f"down_{i}_downsample")(h)
        curr_res //= 2
    c = h.shape[-1]
    h = ResnetBlock(c, g, self.dropout, name="mid_block_1")(h, train)
    h = AttnBlock(g, name="mid_attn_1")(h)
    h = ResnetBlock(c, g, self.dropout, name="mid_block_2")(h, train)
    h = nn.swish(_group_norm(g, "norm_out")(h))
    return Conv2d(2 * self.z_channels if self.double_z else self.z_channels, 3, name="conv_out")(h)


class Decoder(nn.Module):
  """taming/LDM Decoder (no tanh_out, no give_pre_end). `up_i` is the level of resolution i, run from deep to 0."""
  out_ch: int = 3
  ch: int = 32
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  dropout: float = 0.0
  norm_groups: int = 32

  @nn.compact
  def __call__(self, z: Array, train: bool = False) -> Array:
    g = self.norm_groups
    c = self.ch * self.ch_mult[-1]
    h = Conv2d(c, 3, name="conv_in")(z)
    h = ResnetBlock(c, g, self.dropout, name="mid_block_1")(h, train)
    h = AttnBlock(g, name="mid_attn_1")(h)
    h = ResnetBlock(c, g, self.dropout, name="mid_block_2")(h, train)
    curr_res = z.shape[1]
    for i in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = ResnetBlock(self.ch * self.ch_mult[i], g, self.dropout, name=f"up_{i}_block_{j}")(h, train)
        if curr_res in self.attn_resolutions:
          h = AttnBlock(g, name=f"up_{i}_attn_{j}")(h)
      if i != 0:
        h = Upsample(name=f"up_{i}_upsample")(h)
        curr_res *= 2
    h = nn.swish(_group_norm(g, "norm_out")(h))
    return Conv2d(self.out_ch, 3, name="conv_out")(h)


class VectorQuantizer(nn.Module):
  """taming VectorQuantizer2: nearest codebook row, straight-through gradient.

  legacy=True (taming's default, hence the official checkpoints') puts beta on the codebook term:
    loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)
  so the encoder is pulled with weight 1 and the codebook with weight beta. legacy=False is the VQ-VAE paper's
  form, loss = beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2).
  """
  n_e: int
  e_dim: int
  beta: float = 0.25
  legacy: bool = True

  @nn.compact
  def __call__(self, z: Array) -> tuple[Array, Array, dict[str, Array]]:
    """Returns (z_q with straight-through gradient, codebook loss, info with indices/perplexity/usage)."""
    codebook = self.param("embedding", _uniform(1.0 / self.n_e), (self.n_e, self.e_dim), jnp.float32)
    flat = z.reshape(-1, self.e_dim)
    d = (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(codebook ** 2, axis=1)[None]
         - 2.0 * flat @ codebook.T)
    indices = jnp.argmin(d, axis=1)
    z_q = jnp.take(codebook, indices, axis=0).reshape(z.shape)
    commit = jnp.mean((jax.lax.stop_gradient(z_q) - z) ** 2)
    embed = jnp.mean((z_q - jax.lax.stop_gradient(z)) ** 2)
    loss = commit + self.beta * embed if self.legacy else self.beta * commit + embed
    z_q = z + jax.lax.stop_gradient(z_q - z)
    # bincount rather than a one-hot: (B*h*w, n_e) floats would be 268 MB at the official batch size.
    counts = jnp.bincount(indices, length=self.n_e).astype(jnp.float32)
    probs = counts / flat.shape[0]
    info = {
        "indices": indices.reshape(z.shape[:-1]),
        "perplexity": jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10))),
        "usage": jnp.mean((counts > 0).astype(jnp.float32)),
    }
    return z_q, loss, info


class VQModel(nn.Module):
  """LDM VQModel(Interface) as EncDiff uses it ("VQ-reg").

  The diffusion model works on the *pre-quantisation* latent: `encode` is encoder + quant_conv and `decode`
  quantises first, so the decoder only ever sees codebook vectors.
  """
  ch: int = 32
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  z_channels: int = 3
  embed_dim: int = 3
  n_embed: int = 2048
  beta: float = 0.25
  legacy: bool = True
  out_ch: int = 3
  dropout: float = 0.0
  norm_groups: int = 32

  def setup(self):
    arch = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                attn_resolutions=tuple(self.attn_resolutions), dropout=self.dropout, norm_groups=self.norm_groups)
    self.encoder = Encoder(z_channels=self.z_channels, double_z=False, **arch)
    self.decoder = Decoder(out_ch=self.out_ch, **arch)
    self.quantize = VectorQuantizer(self.n_embed, self.embed_dim, self.beta, self.legacy)
    self.quant_conv = Conv2d(self.embed_dim, 1, padding=0)
    self.post_quant_conv = Conv2d(self.z_channels, 1, padding=0)

  def encode(self, x: Array, train: bool = False) -> Array:
    """Image (B, H, W, C) in [-1, 1] -> continuous latent (B, H/f, W/f, embed_dim), not quantised."""
    return self.quant_conv(self.encoder(x, train))

  def decode(self, h: Array, train: bool = False) -> Array:
    """Continuous latent -> image: quantise, post_quant_conv, decoder."""
    quant, _, _ = self.quantize(h)
    return self.decoder(self.post_quant_conv(quant), train)

  def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array, dict[str, Array]]:
    """Returns (reconstruction, codebook loss (scalar), info: indices, perplexity, usage)."""
    quant, loss, info = self.quantize(self.encode(x, train))
    return self.decoder(self.post_quant_conv(quant), train), loss, info


class DiagonalGaussian:
  """LDM DiagonalGaussianDistribution over NHWC moments (mean first, then logvar, along channels)."""

  def __init__(self, moments: Array):
    self.mean, logvar = jnp.split(moments, 2, axis=-1)
    self.logvar = jnp.clip(logvar, -30.0, 20.0)
    self.std = jnp.exp(0.5 * self.logvar)
    self.var = jnp.exp(self.logvar)

  def sample(self, rng: Array) -> Array:
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> Array:
    return self.mean

  def kl(self) -> Array:
    """KL to N(0, I), summed over latent dims: one value per example, as LDM."""
    return 0.5 * jnp.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class AutoencoderKL(nn.Module):
  """LDM AutoencoderKL (DisDiff's `*_kl_4_16` variant; not in EncDiff's released configs).

  `encode` returns the posterior *mean* unless an rng is given. LDM samples (`get_first_stage_encoding` calls
  `posterior.sample()`), but with kl_weight 1e-6 the posterior std is tiny, and the mean keeps encoding a pure
  function of the image (what evaluation and the swap grids need). Pass `rng` to get LDM's behaviour.
  """
  ch: int = 32
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  z_channels: int = 4
  embed_dim: int = 4
  out_ch: int = 3
  dropout: float = 0.0
  norm_groups: int = 32

  def setup(self):
    arch = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                attn_resolutions=tuple(self.attn_resolutions), dropout=self.dropout, norm_groups=self.norm_groups)
    self.encoder = Encoder(z_channels=self.z_channels, double_z=True, **arch)
    self.decoder = Decoder(out_ch=self.out_ch, **arch)
    self.quant_conv = Conv2d(2 * self.embed_dim, 1, padding=0)
    self.post_quant_conv = Conv2d(self.z_channels, 1, padding=0)

  def posterior(self, x: Array, train: bool = False) -> DiagonalGaussian:
    return DiagonalGaussian(self.quant_conv(self.encoder(x, train)))

  def encode(self, x: Array, rng: Optional[Array] = None, train: bool = False) -> Array:
    """Image -> latent (B, H/f, W/f, embed_dim): the posterior mean, or a sample when `rng` is given."""
    post = self.posterior(x, train)
    return post.mode() if rng is None else post.sample(rng)

  def decode(self, z: Array, train: bool = False) -> Array:
    return self.decoder(self.post_quant_conv(z), train)

  def __call__(self, x: Array, rng: Optional[Array] = None,
               train: bool = False) -> tuple[Array, Array, dict[str, Array]]:
    """Returns (reconstruction, per-example KL (B,), info: mean, logvar). Samples the posterior iff `rng`."""
    post = self.posterior(x, train)
    z = post.mode() if rng is None else post.sample(rng)
    return self.decode(z, train), post.kl(), {"mean": post.mean, "logvar": post.logvar}


class NLayerDiscriminator(nn.Module):
  """taming's PatchGAN (pix2pix NLayerDiscriminator with BatchNorm), layers named after `main.<index>`.

  conv4x4/s2 + LReLU(0.2); (n_layers - 1) x [conv4x4/s2 no bias, BN, LReLU]; conv4x4/s1 no bias, BN, LReLU;
  conv4x4/s1 -> 1 logit per patch. All padding 1.
  """
  ndf: int = 64
  n_layers: int = 3
  bn_momentum: float = 0.9  # torch BatchNorm2d momentum 0.1
  bn_eps: float = 1e-5

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    conv_init = nn.initializers.normal(0.02)

    def bn(idx: int) -> nn.BatchNorm:
      return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps,
                          scale_init=lambda k, s, d=jnp.float32: 1.0 + 0.02 * jax.random.normal(k, s, d),
                          name=f"main_{idx}")

    idx = 0
    h = Conv2d(self.ndf, 4, strides=2, padding=1, kernel_init=conv_init, name=f"main_{idx}")(x)
    h = nn.leaky_relu(h, 0.2)
    idx += 2
    nf_mult = 1
    for n in range(1, self.n_layers):
      nf_mult = min(2 ** n, 8)
      h = Conv2d(self.ndf * nf_mult, 4, strides=2, padding=1, use_bias=False, kernel_init=conv_init,
                 name=f"main_{idx}")(h)
      h = nn.leaky_relu(bn(idx + 1)(h), 0.2)
      idx += 3
    nf_mult = min(2 ** self.n_layers, 8)
    h = Conv2d(self.ndf * nf_mult, 4, strides=1, padding=1, use_bias=False, kernel_init=conv_init,
               name=f"main_{idx}")(h)
    h = nn.leaky_relu(bn(idx + 1)(h), 0.2)
    idx += 3
    return Conv2d(1, 4, strides=1, padding=1, kernel_init=conv_init, name=f"main_{idx}")(h)


def build_first_stage(fs_config: ml_collections.ConfigDict,
                      image_channels: int) -> Optional[Union[VQModel, AutoencoderKL]]:
  """`config.first_stage` -> VQModel (kind 'vq'), AutoencoderKL ('kl') or None ('none': pixel-space diffusion)."""
  kind = fs_config.kind
  if kind not in FIRST_STAGE_KINDS:
    raise ValueError(f"config.first_stage.kind must be one of {FIRST_STAGE_KINDS}, got {kind!r}.")
  if kind == "none":
    return None
  arch = dict(ch=fs_config.ch, ch_mult=tuple(fs_config.ch_mult), num_res_blocks=fs_config.num_res_blocks,
              attn_resolutions=tuple(fs_config.attn_resolutions), z_channels=fs_config.z_channels,
              embed_dim=fs_config.embed_dim, out_ch=image_channels, dropout=fs_config.dropout,
              norm_groups=fs_config.norm_groups)
  if kind == "vq":
    return VQModel(n_embed=fs_config.n_embed, beta=fs_config.beta, legacy=fs_config.vq_legacy, **arch)
  return AutoencoderKL(**arch)


def build_discriminator(fs_config: ml_collections.ConfigDict) -> NLayerDiscriminator:
  return NLayerDiscriminator(ndf=fs_config.disc_ndf, n_layers=fs_config.disc_layers)


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def abstract_params(module: nn.Module, image_size: int, image_channels: int) -> Any:
  """The module's 'params' as ShapeDtypeStructs, via eval_shape: seconds even for the full-size model."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, image_channels), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
  return variables["params"]


def first_stage_param_count(fs_config: ml_collections.ConfigDict, image_size: int, image_channels: int) -> int:
  """Autoencoder parameters (encoder, decoder, codebook, quant convs; no discriminator or loss). 0 for 'none'."""
  module = build_first_stage(fs_config, image_channels)
  return 0 if module is None else count_params(abstract_params(module, image_size, image_channels))
