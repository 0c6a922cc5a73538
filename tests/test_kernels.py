"""models/kernels.py: every conv / attention implementation computes the same function with nn.Conv's parameters;
UNet rematerialisation changes neither outputs nor gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from concept_diffusion.models import kernels
from concept_diffusion.models.unet import build_unet
from concept_diffusion.config import validate_config
from concept_diffusion.models.encdiff import build_model


@pytest.mark.parametrize("size,kernel,strides,padding", [
    (2, 3, 1, "SAME"),  # map smaller than the kernel: XLA:CPU's slow case
    (5, 3, 1, "SAME"),
    (8, 3, 2, ((1, 1), (1, 1))),  # the UNet's strided downsampling conv
    (4, 1, 1, "SAME"),
])
def test_conv_impls_match_nn_conv(size, kernel, strides, padding):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 6))
  reference = nn.Conv(5, (kernel, kernel), strides=(strides, strides), padding=padding)
  params = reference.init(jax.random.PRNGKey(1), x)
  expected = reference.apply(params, x)
  for impl in kernels.CONV_IMPLS:
    conv = kernels.Conv(5, kernel, strides=strides, padding=padding, impl=impl,
                        kernel_init=nn.initializers.lecun_normal())
    ours = conv.init(jax.random.PRNGKey(1), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours, params)  # same names, shapes, initial values
    np.testing.assert_allclose(conv.apply(params, x), expected, rtol=1e-5, atol=1e-5)


def test_matmul_conv_gradients_match_xla():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
  loss = lambda impl: lambda p, x: jnp.sum(kernels.Conv(4, 3, impl=impl).apply(p, x) ** 2)
  params = kernels.Conv(4, 3).init(jax.random.PRNGKey(1), x)
  want = jax.grad(loss("xla"), argnums=(0, 1))(params, x)
  got = jax.grad(loss("matmul"), argnums=(0, 1))(params, x)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)


def _softmax_attention(q, k, v, scale):
  probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.mark.parametrize("impl", ["auto", "xla", "einsum"])
@pytest.mark.parametrize("keys", [12, 3])  # self-attention-sized and cross-attention-sized (few tokens)
def test_attention_impls_match_explicit_softmax(impl, keys):
  rng = jax.random.split(jax.random.PRNGKey(0), 3)
  q = 3 * jax.random.normal(rng[0], (2, 12, 4, 8))
  k, v = (3 * jax.random.normal(r, (2, keys, 4, 8)) for r in rng[1:])
  f = lambda q, k, v: jnp.sum(jnp.sin(kernels.attention(q, k, v, 8 ** -0.5, impl)))
  g = lambda q, k, v: jnp.sum(jnp.sin(_softmax_attention(q, k, v, 8 ** -0.5)))
  np.testing.assert_allclose(kernels.attention(q, k, v, 8 ** -0.5, impl), _softmax_attention(q, k, v, 8 ** -0.5),
                             rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.grad(f, (0, 1, 2))(q, k, v), jax.grad(g, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_unknown_impls_are_rejected():
  x = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match="conv impl"):
    kernels.Conv(2, 3, impl="winograd").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="attention impl"):
    kernels.attention(x, x, x, 1.0, "flash")
  config = smoke.get_config()
  config.unet.attention_impl = "flash"
  with pytest.raises(ValueError, match="unet.attention_impl"):
    build_model(config)


def test_remat_unet_has_the_same_parameters_outputs_and_gradients():
  config = smoke.get_config()
  config.unet.channel_mult, config.unet.attention_resolutions = (1,), (1,)  # small: compile time dominates
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x, t = jax.random.normal(keys[0], (2, 8, 8, 3)), jnp.array([3, 70])
  ctx = jax.random.normal(keys[1], (2, config.encoder.num_tokens, config.encoder.token_dim))
  plain = build_unet(config.unet, 3)
  config.unet.remat = True
  remat = build_unet(config.unet, 3)
  params = jax.jit(plain.init)(keys[2], x, t, ctx)
  params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(keys[3], p.shape), params)
  assert jax.tree_util.tree_structure(jax.eval_shape(remat.init, keys[2], x, t, ctx)) == \
      jax.tree_util.tree_structure(params)
  loss = lambda unet: jax.jit(jax.value_and_grad(lambda p: jnp.mean(unet.apply(p, x, t, ctx, train=True) ** 2)))
  (want, want_grads), (got, got_grads) = loss(plain)(params), loss(remat)(params)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_grads, want_grads)


def test_auto_attention_tries_cudnn_on_a_gpu_in_16_bit_and_falls_back_to_xla(monkeypatch):
  """On a GPU, auto asks for cuDNN's fused kernel when it fits (bf16/fp16, head size a multiple of 8) and takes
  XLA's attention where this host's cuDNN cannot run it (here: none at all), with the same values."""
  asked = []
  real = jax.nn.dot_product_attention

  def spy(*args, implementation=None, **kwargs):
    asked.append(implementation)
    return real(*args, implementation=implementation, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 16, 4, 8))
  expected = kernels.attention(q, k, v, 8 ** -0.5, "einsum")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  bf16 = [t.astype(jnp.bfloat16) for t in (q, k, v)]
  out = kernels.attention(*bf16, 8 ** -0.5, "auto")
  assert asked == ["cudnn", "xla"]
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=0.05)
  asked.clear()
  kernels.attention(q, k, v, 8 ** -0.5, "auto")  # float32: cuDNN's flash attention does not take it
  kernels.attention(*(t[..., :6] for t in bf16), 6 ** -0.5, "auto")  # head size 6: not a multiple of 8
  assert asked == ["xla", "xla"]


@pytest.mark.parametrize("backend,flags,expected", [
    # XLA:CPU runs the bf16 step slower than float32 even with AMX (hardware.py): auto stays float32 on CPUs.
    ("cpu", {"avx512f", "avx512_bf16"}, "float32"),
    ("cpu", {"avx512f", "amx_bf16", "amx_tile"}, "float32"),
    ("cpu", {"avx2", "avx512f"}, "float32"),
    ("tpu", set(), "bfloat16"),
    ("cuda", set(), "bfloat16"),  # no GPU on this host: lowering for one assumes a current data-centre GPU
    ("metal", set(), "float32"),
])
def test_auto_compute_dtype_follows_the_hardware(monkeypatch, backend, flags, expected):
  from concept_diffusion import hardware  # pylint: disable=g-import-not-at-top
  from concept_diffusion.models.encdiff import compute_dtype_name  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
  assert hardware.cpu_bf16_flags() == [f for f in hardware.CPU_BF16_FLAGS if f in flags]
  config = smoke.get_config()
  assert compute_dtype_name(config, backend) == "float32"  # an explicit dtype is never replaced
  config.train.compute_dtype = "auto"
  validate_config(config)
  assert compute_dtype_name(config, backend) == expected
