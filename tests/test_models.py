"""Model parity (parameter counts at the official configuration) and behaviour of the modules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion import config as config_lib
from concept_diffusion.models.encdiff import build_model
from concept_diffusion.models.encoder import build_encoder
from concept_diffusion.models.unet import build_unet
from configs import smoke


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_official_unet_and_encoder_parameter_counts():
  config = config_lib.get_base_config()
  unet = build_unet(config.unet, 3)
  params = jax.eval_shape(unet.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)),
                          jnp.zeros((1, 20, 16)))["params"]
  assert _count(params) == 37_469_635
  enc = jax.eval_shape(build_encoder(config.encoder).init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  trunk = {k: v for k, v in enc["params"].items() if not k.startswith("net_")}
  mlps = {k: v for k, v in enc["params"].items() if k.startswith("net_")}
  assert _count(trunk) == 1_164_052
  assert _count(mlps) == 210_240
  # Four BatchNorms in the stem, one between the residual blocks, one in each residual block.
  assert len(jax.tree_util.tree_leaves(enc["batch_stats"])) == 2 * 7


def test_official_unet_has_16_cross_attention_layers():
  config = config_lib.get_base_config()
  unet = build_unet(config.unet, 3)
  x, t, ctx = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 20, 16))
  params = jax.eval_shape(unet.init, jax.random.PRNGKey(0), x, t, ctx)
  _, inter = jax.eval_shape(lambda p: unet.apply(p, x, t, ctx, mutable=["intermediates"]), params)
  probs = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.shape
           for path, leaf in jax.tree_util.tree_leaves_with_path(inter)}
  assert len(probs) == 16
  by_block = {path.split("/")[1]: shape for path, shape in probs.items()}
  assert by_block["input_blocks_1_1"] == (1, 8, 256, 20)  # 16x16 queries over 20 tokens, 8 heads
  assert by_block["middle_block_1"] == (1, 8, 4, 20)
  assert sum(k.startswith("output_blocks") for k in by_block) == 9


@pytest.fixture(scope="module")
def smoke_unet():
  config = smoke.get_config()
  unet = build_unet(config.unet, 3)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(keys[0], (2, 8, 8, 3))
  t = jnp.array([3, 70])
  ctx = jax.random.normal(keys[1], (2, config.encoder.num_tokens, config.encoder.token_dim))
  params = jax.jit(unet.init)(keys[2], x, t, ctx)
  # Zero-initialised output convs make a fresh UNet predict exactly 0; perturb so outputs are informative.
  params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(keys[3], p.shape), params)
  return unet, params, x, t, ctx


def test_fresh_unet_predicts_zero():
  config = smoke.get_config()
  unet = build_unet(config.unet, 3)
  x = jnp.ones((1, 8, 8, 3))
  ctx = jnp.ones((1, config.encoder.num_tokens, config.encoder.token_dim))
  params = jax.jit(unet.init)(jax.random.PRNGKey(0), x, jnp.array([5]), ctx)
  assert float(jnp.abs(jax.jit(unet.apply)(params, x, jnp.array([5]), ctx)).max()) == 0.0


def test_attention_probs_sum_to_one_and_capture_does_not_change_output(smoke_unet):
  unet, params, x, t, ctx = smoke_unet
  plain = jax.jit(unet.apply)(params, x, t, ctx)
  captured, inter = jax.jit(lambda p: unet.apply(p, x, t, ctx, mutable=["intermediates"]))(params)
  # Same values; only the summation order differs (captured layers normalise the probabilities explicitly,
  # the others use unet.attention_impl).
  np.testing.assert_allclose(np.asarray(plain), np.asarray(captured), rtol=1e-5, atol=2e-6)
  leaves = jax.tree_util.tree_leaves(inter)
  assert leaves
  for probs in leaves:
    assert probs.shape[0] == 2 and probs.shape[-1] == ctx.shape[1]
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, atol=1e-5)


def test_unet_output_depends_on_tokens_and_timestep(smoke_unet):
  unet, params, x, t, ctx = smoke_unet
  apply = jax.jit(unet.apply)
  base = apply(params, x, t, ctx)
  assert float(jnp.abs(base - apply(params, x, t, ctx * 2.0)).max()) > 1e-4
  assert float(jnp.abs(base - apply(params, x, t + 5, ctx)).max()) > 1e-4


def test_unet_rejects_wrong_channels(smoke_unet):
  unet, params, x, t, ctx = smoke_unet
  with pytest.raises(ValueError, match="channels"):
    unet.apply(params, jnp.zeros((2, 8, 8, 4)), t, ctx)


def test_encoder_token_k_depends_only_on_scalar_k():
  config = smoke.get_config()
  enc = build_encoder(config.encoder)
  variables = jax.jit(enc.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  scalars = jax.random.normal(jax.random.PRNGKey(1), (3, config.encoder.num_tokens))
  tokens = enc.apply(variables, scalars, method="tokens")
  assert tokens.shape == (3, config.encoder.num_tokens, config.encoder.token_dim)
  changed = enc.apply(variables, scalars.at[:, 1].add(1.0), method="tokens")
  diff = np.asarray(jnp.abs(changed - tokens).max(axis=(0, 2)))
  assert diff[1] > 1e-4
  np.testing.assert_array_equal(np.delete(diff, 1), 0.0)


def test_encoder_eval_uses_running_stats_and_train_updates_them():
  config = smoke.get_config()
  enc = build_encoder(config.encoder)
  images = jax.random.uniform(jax.random.PRNGKey(2), (4, 16, 16, 3), minval=-1, maxval=1)
  variables = jax.jit(enc.init)(jax.random.PRNGKey(0), images)
  scalars, _ = jax.jit(enc.apply)(variables, images)
  assert scalars.shape == (4, config.encoder.num_tokens)
  # Eval mode: an image's code does not depend on the rest of the batch.
  alone, _ = jax.jit(enc.apply)(variables, images[:1])
  np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(scalars[0]), atol=1e-5)
  _, updates = jax.jit(lambda v: enc.apply(v, images, train=True, mutable=["batch_stats"]))(variables)
  before = jax.tree_util.tree_leaves(variables["batch_stats"])
  after = jax.tree_util.tree_leaves(updates["batch_stats"])
  assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(before, after))


def test_summary_cli_reports_the_official_counts():
  import json
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "concept_diffusion.tools.summary",
                         "--config=configs/procedural_shapes.py", "--json"], cwd=repo, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  counts = json.loads(proc.stdout.strip().splitlines()[-1])
  assert counts == {"unet": 37_469_635, "encoder": 1_164_052, "token_mlps": 210_240, "first_stage": 3_478_078,
                    "total": 42_322_005}


def test_space_to_depth_round_trip_and_layout():
  from concept_diffusion.models.unet import depth_to_space, space_to_depth
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  patches = space_to_depth(x, 2)
  assert patches.shape == (2, 4, 4, 12)
  np.testing.assert_array_equal(patches[1, 2, 3], x[1, 4:6, 6:8].reshape(-1))  # one 2x2 patch, row-major
  np.testing.assert_array_equal(depth_to_space(patches, 2), x)
  assert space_to_depth(x, 1) is x


def test_patch_stem_unet_works_on_the_patch_grid():
  config = smoke.get_config()
  config.unet.patch_size = 2
  unet = build_unet(config.unet, 3)
  x, t = jnp.ones((2, 8, 8, 3)), jnp.array([3, 70])
  ctx = jax.random.normal(jax.random.PRNGKey(1), (2, config.encoder.num_tokens, config.encoder.token_dim))
  params = jax.jit(unet.init)(jax.random.PRNGKey(0), x, t, ctx)
  assert params["params"]["input_blocks_0_0"]["kernel"].shape[-2] == 12  # 2x2x3 channels in
  assert params["params"]["out_2"]["kernel"].shape[-1] == 12
  params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  out, inter = unet.apply(params, x, t, ctx, mutable=["intermediates"])
  assert out.shape == x.shape
  shapes = {leaf.shape[2] for leaf in jax.tree_util.tree_leaves(inter)}
  assert max(shapes) == 16  # cross-attention queries: the 4x4 patch grid at the first level, not 8x8 pixels
  # Each output patch depends on its own input patch (and neighbours), so shuffling back is not a relabelling.
  moved = unet.apply(params, x.at[:, :2, :2].set(-1.0), t, ctx)
  assert float(jnp.abs(moved - out)[:, :2, :2].max()) > 0


def test_encoder_strides_of_one_keep_the_map():
  config = smoke.get_config()
  config.encoder.strides = (2, 2, 2, 1)
  enc = build_encoder(config.encoder)
  x = jnp.zeros((1, 32, 32, 3))
  params = jax.eval_shape(enc.init, jax.random.PRNGKey(0), x)["params"]
  assert params["encoder_16"]["kernel"].shape[0] == 4 * 4 * config.encoder.width  # 32 -> 16 -> 8 -> 4 -> 4
  config.encoder.strides = (2, 2, 2, 2)
  params = jax.eval_shape(build_encoder(config.encoder).init, jax.random.PRNGKey(0), x)["params"]
  assert params["encoder_16"]["kernel"].shape[0] == 2 * 2 * config.encoder.width


@pytest.mark.parametrize("field, value, message", [
    ("unet.patch_size", 3, "must divide data.image_size"), ("unet.patch_size", 0, ">= 1"),
    ("encoder.strides", (2, 2, 3, 1), "four strides of 1 or 2"), ("encoder.strides", (2, 2), "four strides"),
    ("train.grad_clip_norm", -1.0, ">= 0"), ("diffusion.loss_weighting", "snr", "loss_weighting='snr'; it must be one of"),
    ("eval.train_metrics", ("factor_vae,mig,dci",), r"""eval.train_metrics has 'factor_vae,mig,dci'.*\('factor_vae','mig'\)"""),
    ("eval.metrics", ("dci", "fvae"), "eval.metrics has 'fvae'")])
def test_stem_and_clipping_fields_are_validated(field, value, message):
  config = smoke.get_config()
  config.first_stage.kind = "none"
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(config)
    build_model(config)  # names the code defines (schedules, weightings, registries) are checked there


def test_gradient_clipping_rescales_the_gradient_before_adamw():
  import optax
  from concept_diffusion.states import make_optimizer
  config = smoke.get_config()
  params = {"w": jnp.zeros(4)}
  grads = [{"w": jnp.array([3e4, -4e4, 0.0, 1.0])}, {"w": jnp.array([0.1, 0.2, -0.3, 0.4])}]  # norms 5e4, 0.55
  config.train.grad_clip_norm = 1.0
  clipped_tx = make_optimizer(config.train, lambda step: 1e-3)
  config.train.grad_clip_norm = 0.0  # the official optimiser
  plain_tx = make_optimizer(config.train, lambda step: 1e-3)

  def run(tx, gs):
    state, updates = tx.init(params), []
    for g in gs:
      u, state = tx.update(g, state, params)
      updates.append(u["w"])
    return updates

  clip = optax.clip_by_global_norm(1.0)
  by_hand = [clip.update(g, clip.init(params))[0] for g in grads]
  np.testing.assert_allclose(run(clipped_tx, grads)[1], run(plain_tx, by_hand)[1], rtol=1e-5)
  # Unclipped, the huge first gradient dominates Adam's moments and the second update barely sees the second
  # gradient: the first two components move by equal amounts, where clipped they do not.
  unclipped, clipped = run(plain_tx, grads)[1], run(clipped_tx, grads)[1]
  np.testing.assert_allclose(abs(float(unclipped[0])), abs(float(unclipped[1])), rtol=1e-3)
  assert abs(float(clipped[0])) > 1.5 * abs(float(clipped[1]))
