"""First stage: official parameter parity, VQ/KL semantics, taming's Downsample, and the GAN training step."""
import functools
import re
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import procedural_shapes, smoke
from concept_diffusion import states
from concept_diffusion.models import autoencoder as ae
from concept_diffusion.models.encdiff import build_model
from concept_diffusion.train import first_stage

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
OFFICIAL_TSV = REPO_ROOT.parent / "shared" / "reference" / "official_state_dict.tsv"
OFFICIAL_VQ_PARAMS = 3_478_078  # official VQModel (shapes3d_vq_4_16.yaml): encoder+decoder+codebook+quant convs


def _official_config():
  return procedural_shapes.get_config()


def _smoke_images(n: int = 4, size: int = 16) -> jax.Array:
  """Smooth, structured images in [-1, 1] (random noise would be hard to fit in a few steps)."""
  yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
  imgs = []
  for i in range(n):
    c = [np.tanh(3 * (xx * math.cos(i + k) + yy * math.sin(i + k))) for k in range(3)]
    imgs.append(np.stack(c, -1))
  return jnp.asarray(np.stack(imgs), jnp.float32)


def _official_tsv_rows():
  if not OFFICIAL_TSV.exists():
    pytest.skip(f"official state-dict table not found at {OFFICIAL_TSV} (shared/ is expected beside the repo)")
  rows = []
  for line in OFFICIAL_TSV.read_text().splitlines():
    if line.startswith("first_stage_model."):
      key, shape, _ = line.split("\t")
      rows.append((key[len("first_stage_model."):], tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
  return rows


def _to_flax_shape(key: str, shape: tuple) -> tuple:
  if len(shape) == 4:  # conv OIHW -> HWIO
    o, i, h, w = shape
    return (h, w, i, o)
  if len(shape) == 2 and not key.endswith("embedding.weight"):  # Linear (out, in) -> (in, out); none in the VQ
    return shape[::-1]
  return shape


def test_official_vq_parameter_count():
  params = ae.abstract_params(ae.build_first_stage(_official_config().first_stage, 3), 64, 3)
  assert ae.count_params(params) == OFFICIAL_VQ_PARAMS
  assert ae.first_stage_param_count(_official_config().first_stage, 64, 3) == OFFICIAL_VQ_PARAMS


def test_official_vq_parameter_shapes_and_names_match_tsv():
  rows = _official_tsv_rows()
  params = ae.abstract_params(ae.build_first_stage(_official_config().first_stage, 3), 64, 3)
  flat = {path: leaf.shape for path, leaf in
          ((tuple(k.key for k in p), l) for p, l in jax.tree_util.tree_flatten_with_path(params)[0])}
  official = sorted(_to_flax_shape(k, s) for k, s in rows)
  assert sorted(flat.values()) == official
  # Stronger than the multiset: every official key has exactly one parameter of the right shape.
  mapped = {torch_key_to_flax_path(k, len(s)): _to_flax_shape(k, s) for k, s in rows}
  assert mapped == flat


def test_discriminator_official_size_and_patch_shape():
  fs = _official_config().first_stage
  disc = ae.build_discriminator(fs)
  variables = jax.eval_shape(disc.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert ae.count_params(variables["params"]) == 2_765_633  # taming NLayerDiscriminator(3, ndf=64, n_layers=3)
  out = jax.eval_shape(functools.partial(disc.apply, mutable=["batch_stats"]), variables,
                       jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))[0]
  assert out.shape == (2, 6, 6, 1)


def test_official_encode_decode_shapes():
  model = ae.build_first_stage(_official_config().first_stage, 3)
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  h = jax.eval_shape(functools.partial(model.apply, method=model.encode), variables, x)
  assert h.shape == (2, 16, 16, 3)
  y = jax.eval_shape(functools.partial(model.apply, method=model.decode), variables, h)
  assert y.shape == (2, 64, 64, 3)


# Initialising a model costs far more than running it here (XLA CPU compiles every random initializer), so each
# variant is initialised once per module and shared; everything else runs under jit too.
@pytest.fixture(scope="module")
def vq_state():
  config = smoke.get_config()
  config.first_stage.disc_start = 5
  return config, states.create_first_stage_state(config, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def kl_state():
  config = smoke.get_config()
  config.first_stage.kind = "kl"
  config.first_stage.num_res_blocks = 0  # fewer layers: the KL tests are about the posterior and the loss
  return config, states.create_first_stage_state(config, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def smoke_vq(vq_state):
  config, state = vq_state
  model = ae.build_first_stage(config.first_stage, config.data.channels)
  return config, model, state.ae_params, _smoke_images()


def test_smoke_encode_decode_shapes_helpers_and_straight_through(smoke_vq):
  config, model, params, x = smoke_vq

  def roundtrip(params):
    h = model.apply({"params": params}, x, method=model.encode)
    y = model.apply({"params": params}, h, method=model.decode)
    return jnp.sum(y ** 2), (h, y)

  encdiff = build_model(config)

  @jax.jit  # one compile for everything: compiling dominates the cost of these tests on CPU
  def run(params):
    grads, (h, y) = jax.grad(roundtrip, has_aux=True)(params)
    helpers = (encdiff.latents(params, x), encdiff.decode(params, h))
    return h, y, helpers, model.apply({"params": params}, x), grads

  h, y, (fs_h, fs_y), (xrec, loss, info), grads = run(params)
  # Straight-through: decode(encode(x)) quantises in between, yet the encoder gets a gradient.
  enc_norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(grads["encoder"]))
  assert enc_norm > 0
  assert float(jnp.sum(grads["quant_conv"]["kernel"] ** 2)) > 0
  assert h.shape == (4, 8, 8, 3)
  assert y.shape == x.shape
  np.testing.assert_allclose(fs_h, h, atol=1e-6)
  np.testing.assert_allclose(fs_y, y, atol=1e-6)
  np.testing.assert_allclose(xrec, y, atol=1e-5)
  assert loss.shape == () and info["indices"].shape == (4, 8, 8)


def test_quantized_vectors_are_nearest_codebook_rows():
  vq = ae.VectorQuantizer(n_e=16, e_dim=3)
  z = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 3)) * 0.1
  params = jax.jit(vq.init)(jax.random.PRNGKey(2), z)["params"]
  codebook = np.asarray(params["embedding"])
  assert codebook.shape == (16, 3) and np.abs(codebook).max() <= 1 / 16
  z_q, _, info = jax.jit(vq.apply)({"params": params}, z)
  flat_q = np.asarray(z_q).reshape(-1, 3)
  flat_z = np.asarray(z).reshape(-1, 3)
  nearest = np.argmin(((flat_z[:, None] - codebook[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(np.asarray(info["indices"]).reshape(-1), nearest)
  np.testing.assert_allclose(flat_q, codebook[nearest], atol=1e-6)


@pytest.mark.parametrize("legacy", [True, False])
def test_vq_loss_formula_hand_made(legacy):
  beta = 0.25
  vq = ae.VectorQuantizer(n_e=3, e_dim=2, beta=beta, legacy=legacy)
  codebook = jnp.array([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]])
  z = jnp.array([[[[0.1, 0.2], [0.9, 1.3]]]])  # (1, 1, 2, 2): nearest rows 0 and 1
  zq_expected = jnp.array([[[[0.0, 0.0], [1.0, 1.0]]]])
  mse = float(jnp.mean((z - zq_expected) ** 2))  # (0.01 + 0.04 + 0.01 + 0.09) / 4

  def loss_fn(cb, z):
    return vq.apply({"params": {"embedding": cb}}, z)[1]

  loss, (g_cb, g_z) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(codebook, z)
  np.testing.assert_allclose(loss, (1 + beta) * mse, rtol=1e-6)
  # legacy (taming default): the encoder-side term has weight 1 and the codebook term beta.
  w_z, w_cb = (1.0, beta) if legacy else (beta, 1.0)
  np.testing.assert_allclose(g_z, w_z * 2 * (z - zq_expected) / 4, rtol=1e-5)
  expected_cb = np.zeros((3, 2))
  expected_cb[:2] = w_cb * 2 * np.asarray(zq_expected - z)[0, 0] / 4
  np.testing.assert_allclose(g_cb, expected_cb, rtol=1e-5, atol=1e-7)
  # Straight-through: d z_q / d z is the identity.
  g_st = jax.jit(jax.grad(lambda z: jnp.sum(vq.apply({"params": {"embedding": codebook}}, z)[0] * 3.0)))(z)
  np.testing.assert_allclose(g_st, jnp.full_like(z, 3.0))


def test_downsample_asymmetric_padding_matches_manual_conv():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 2))
  down = ae.Downsample()
  params = down.init(jax.random.PRNGKey(1), x)["params"]
  y = np.asarray(down.apply({"params": params}, x))
  assert y.shape == (1, 4, 4, 2)
  kernel = np.asarray(params["conv"]["kernel"])  # HWIO
  bias = np.asarray(params["conv"]["bias"])
  xp = np.pad(np.asarray(x)[0], ((0, 1), (0, 1), (0, 0)))  # taming: F.pad(x, (0, 1, 0, 1)), right/bottom only
  ref = np.zeros((4, 4, 2))
  for i in range(4):
    for j in range(4):
      patch = xp[2 * i:2 * i + 3, 2 * j:2 * j + 3]  # no top/left pad: output (0, 0) sees input rows 0..2
      ref[i, j] = np.einsum("hwi,hwio->o", patch, kernel) + bias
  np.testing.assert_allclose(y[0], ref, rtol=1e-5, atol=1e-5)


def test_kl_variant_shapes_kl_and_sampling(kl_state):
  config, state = kl_state
  model = ae.build_first_stage(config.first_stage, 3)
  x = _smoke_images(2)
  params = state.ae_params
  assert params["quant_conv"]["kernel"].shape == (1, 1, 6, 6)  # double_z: 2*z -> 2*embed
  assert params["encoder"]["conv_out"]["kernel"].shape[-1] == 6

  encdiff = build_model(config)

  @jax.jit
  def run(params, x, rng):
    mean = model.apply({"params": params}, x, method=model.encode)
    sample = model.apply({"params": params}, x, rng, method=model.encode)
    helpers = (encdiff.latents(params, x), encdiff.decode(params, mean))
    return model.apply({"params": params}, x), mean, sample, helpers

  (xrec, kl, info), mean, sample, (fs_mean, fs_dec) = run(params, x, jax.random.PRNGKey(3))
  assert xrec.shape == x.shape and kl.shape == (2,)
  assert bool(jnp.all(kl > 0))
  np.testing.assert_allclose(mean, info["mean"], atol=1e-6)
  np.testing.assert_allclose(fs_mean, mean, atol=1e-6)
  assert sample.shape == mean.shape == (2, 8, 8, 3)
  assert float(jnp.max(jnp.abs(sample - mean))) > 1e-3
  assert fs_dec.shape == x.shape


def test_kind_none_is_identity():
  config = smoke.get_config()
  config.first_stage.kind = "none"
  assert ae.build_first_stage(config.first_stage, 3) is None
  x = _smoke_images(2)
  encdiff = build_model(config)
  assert encdiff.latents(None, x) is x
  assert encdiff.decode(None, x) is x
  with pytest.raises(ValueError, match="none"):
    states.create_first_stage_state(config, jax.random.PRNGKey(0))


def test_lpips_weights_path_raises_clear_error():
  config = smoke.get_config()
  config.first_stage.lpips_weights = "/some/where/vgg_lpips.pth"
  with pytest.raises(NotImplementedError, match="LPIPS"):
    states.create_first_stage_state(config, jax.random.PRNGKey(0))
  with pytest.raises(NotImplementedError, match="lpips_weights"):  # checked before the state is touched
    first_stage.step_fn(config)


def test_vq_train_step_learns_and_gan_switches_on_at_disc_start(vq_state):
  config, state = vq_state
  fs = config.first_stage
  assert fs.disc_start == 5
  state = jax.tree_util.tree_map(jnp.copy, state)  # the step donates its input; keep the shared fixture alive
  step = jax.jit(first_stage.step_fn(config), donate_argnums=0)
  images = _smoke_images()
  history = []
  for i in range(30):
    state, metrics = step(state, images, jax.random.fold_in(jax.random.PRNGKey(1), i))
    history.append(jax.device_get(metrics))
  assert int(state.step) == 30
  for i, m in enumerate(history):
    assert all(np.isfinite(v) for v in m.values()), m
    assert 0.0 <= m["d_weight"] <= 1e4 * fs.disc_weight
    if i < 5:  # adopt_weight: neither the generator nor the discriminator GAN term before disc_start
      assert m["disc_factor"] == 0.0 and m["disc_loss"] == 0.0
      np.testing.assert_allclose(m["total_loss"], m["nll_loss"] + fs.codebook_weight * m["codebook_loss"],
                                 rtol=1e-5)
    else:
      assert m["disc_factor"] == fs.disc_factor
      assert m["disc_loss"] > 0
  assert 1.0 <= history[-1]["perplexity"] <= fs.n_embed and 0 < history[-1]["codebook_usage"] <= 1
  first, last = np.mean([m["l1"] for m in history[:3]]), np.mean([m["l1"] for m in history[-3:]])
  assert last < 0.7 * first, (first, last)
  # The discriminator's BatchNorm statistics moved (train mode in every pass).
  assert float(jnp.abs(state.disc_batch_stats["main_3"]["mean"]).sum()) > 0


def test_kl_train_step_runs(kl_state):
  config, state = kl_state
  step = jax.jit(first_stage.step_fn(config))
  state, metrics = step(state, _smoke_images(), jax.random.PRNGKey(1))
  metrics = jax.device_get(metrics)
  assert int(state.step) == 1 and metrics["kl_loss"] > 0
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  np.testing.assert_allclose(
      metrics["total_loss"],
      metrics["nll_loss"] + metrics["d_weight"] * metrics["disc_factor"] * metrics["g_loss"]
      + config.first_stage.kl_weight * metrics["kl_loss"], rtol=1e-5)


def torch_key_to_flax_path(key: str, ndim: int) -> tuple[str, ...]:
  """Official state-dict key (without the `first_stage_model.` / `loss.discriminator.` prefix) -> params path.

  `ndim` is the PyTorch tensor's rank: a rank-1 `weight` is a norm scale, a rank-4 one a conv kernel (which the
  importer must also transpose OIHW -> HWIO). BatchNorm `running_mean/var` map into 'batch_stats' as mean/var.
  Example: 'encoder.down.1.block.0.nin_shortcut.weight' -> ('encoder', 'down_1_block_0', 'nin_shortcut', 'kernel').
  """
  name = re.sub(r"\b(down|up)\.(\d+)\.(block|attn)\.(\d+)\.", r"\1_\2_\3_\4.", key)
  name = re.sub(r"\b(down|up)\.(\d+)\.(downsample|upsample)\.", r"\1_\2_\3.", name)
  name = re.sub(r"\bmid\.", "mid_", name)
  name = re.sub(r"\bmain\.(\d+)\.", r"main_\1.", name)
  parts = name.split(".")
  if parts[-2:] == ["embedding", "weight"]:
    return tuple(parts[:-1])
  leaf = {"running_mean": "mean", "running_var": "var"}.get(parts[-1], parts[-1])
  if leaf == "weight":
    leaf = "kernel" if ndim == 4 else "scale"
  return tuple(parts[:-1]) + (leaf,)
