"""The UNet's AdaGN conditioning (paper Table 3 ablation) beside the default cross-attention one."""
import jax
import jax.numpy as jnp
import numpy as np

from concept_diffusion import parallel
from concept_diffusion.models.encdiff import build_model
from concept_diffusion.models.unet import build_unet
from concept_diffusion.train import diffusion_stage
from configs import smoke


def _model_state_step(config):
  """The model, a fresh state and the jitted train step, as the trainer builds them."""
  model, mesh = build_model(config), parallel.make_mesh(config.mesh)
  tx, step = diffusion_stage.step_for_config(config, model, mesh)
  state = diffusion_stage.create_sharded_state(model, tx, jax.random.PRNGKey(0), mesh, config.mesh.fsdp_min_size)
  return model, state, step


def _names(params):
  return {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}


def _one_level(config):
  """The smoke UNet cut to one level: the same blocks, compiled in a fraction of the time."""
  config.unet.channel_mult = (1,)
  config.unet.attention_resolutions = (1,)
  return config


def _inputs(config):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  ctx = jax.random.normal(jax.random.PRNGKey(1), (2, config.encoder.num_tokens, config.encoder.token_dim))
  return x, jnp.array([3, 70]), ctx


def test_default_parameter_names_are_the_official_ones():
  config = smoke.get_config()
  names = {}
  for conditioning in ("cross_attention", "adagn"):
    config.unet.conditioning = conditioning
    names[conditioning] = _names(jax.eval_shape(build_unet(config.unet, 3).init, jax.random.PRNGKey(0),
                                                *_inputs(config)))
  default, adagn = names["cross_attention"], names["adagn"]
  assert not any("cond_emb_layers" in n for n in default)
  assert any("/attn2/" in n for n in default)
  # AdaGN = the same tree without cross-attention (attn2, its LayerNorm norm2) plus one Linear per ResBlock.
  no_cross = {n for n in default if "/attn2/" not in n and "/norm2/" not in n}
  assert adagn - no_cross == {n for n in adagn if "/cond_emb_layers_1/" in n}
  assert no_cross <= adagn
  resblocks = {n.split("/")[1] for n in default if n.endswith("emb_layers_1/kernel")}
  assert {n.split("/")[1] for n in adagn if "cond_emb_layers_1" in n} == resblocks


def test_adagn_output_shape_and_tokens_change_it():
  config = _one_level(smoke.get_config())
  config.unet.conditioning = "adagn"
  unet = build_unet(config.unet, 3)
  x, t, ctx = _inputs(config)
  params = jax.jit(unet.init)(jax.random.PRNGKey(2), x, t, ctx)
  # Zero-initialised output convs make a fresh UNet predict exactly 0; perturb so outputs are informative.
  params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
  apply = jax.jit(unet.apply)
  out, swapped = apply(params, x, t, ctx), apply(params, x, t, ctx[::-1])  # the two images' tokens exchanged
  assert out.shape == x.shape
  assert float(jnp.abs(out - swapped).max()) > 1e-3
  _, inter = jax.eval_shape(lambda p: unet.apply(p, x, t, ctx, mutable=["intermediates"]), params)
  assert not jax.tree_util.tree_leaves(inter)  # no cross-attention maps to record


def test_adagn_goes_through_the_unchanged_train_step_and_sampler():
  config = _one_level(smoke.get_config())
  config.first_stage.kind = "none"  # pixel space: 16x16x3, no autoencoder
  config.unet.conditioning = "adagn"
  model, state, step = _model_state_step(config)
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, 16, 16, 3), minval=-1, maxval=1)
  state, metrics = step(state, images, None, jax.random.PRNGKey(2))
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
  assert "cond_emb_layers_1" in state.params["unet"]["middle_block_0"]
  _, tokens = model.encode_with_tokens(state, images)
  samples = model.sample_jit(state, None, tokens, jax.random.PRNGKey(3), steps=2, eta=1.0)
  assert samples.shape == images.shape and bool(jnp.all(jnp.isfinite(samples)))


def test_without_diffusion_ablation_decodes_the_tokens_in_one_pass():
  """diffusion.objective=one_shot (paper Table 3 "EncDec w/o Diff"): a learned input replaces x_t, t = 0, and the
  loss is the reconstruction error of the image; sampling is that one pass."""
  config = _one_level(smoke.get_config())
  config.first_stage.kind = "none"
  config.diffusion.objective = "one_shot"
  config.diffusion.loss = "l2"
  model, state, step = _model_state_step(config)
  learned = np.asarray(state.params["unet"]["learned_input"])
  assert learned.shape == (1, 16, 16, 3) and 0.5 < float(np.std(learned)) < 1.5
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, 16, 16, 3), minval=-1, maxval=1)
  # A fresh UNet outputs exactly 0 (zero-initialised output conv): the first loss is mean(images^2), whatever
  # the noise or timestep keys (there are none in this objective).
  # The step donates the state it is given: step a copy first.
  _, metrics_other_key = step(jax.tree_util.tree_map(jnp.copy, state), images, None, jax.random.PRNGKey(9))
  after, metrics = step(state, images, None, jax.random.PRNGKey(2))
  np.testing.assert_allclose(float(metrics["loss"]), float(jnp.mean(images ** 2)), rtol=1e-5)
  assert float(metrics["loss"]) == float(metrics_other_key["loss"])
  np.testing.assert_array_equal(after.params["unet"]["learned_input"], learned)  # zero output conv: no grad yet
  for _ in range(3):
    after, metrics = step(after, images, None, jax.random.PRNGKey(2))
  _, tokens = model.encode_with_tokens(after, images)
  sample = lambda key: model.sample_jit(after, None, tokens, key, steps=50, eta=1.0)
  one, other = sample(jax.random.PRNGKey(3)), sample(jax.random.PRNGKey(4))
  np.testing.assert_array_equal(one, other)  # no noise anywhere: the decode depends on the tokens only
  unet = build_unet(config.unet, 3, learned_input=True)
  t0 = jnp.zeros((4,), jnp.int32)
  direct = unet.apply({"params": after.ema_unet}, jnp.zeros_like(images), t0, tokens)
  np.testing.assert_allclose(one, direct, atol=1e-6)  # the x given is ignored: the learned input is used
  assert float(jnp.abs(one).max()) > 0  # the step moved the output conv off zero
