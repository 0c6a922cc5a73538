"""The UNet's AdaGN conditioning (paper Table 3 ablation) beside the default cross-attention one."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from concept_diffusion import generate
from concept_diffusion.models.unet import build_unet
from concept_diffusion.train import diffusion_stage
from concept_diffusion.train.workdir import computation_config
from configs import smoke


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
  state = jax.jit(functools.partial(diffusion_stage.create_diffusion_state, config))(jax.random.PRNGKey(0))
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, 16, 16, 3), minval=-1, maxval=1)
  state, metrics = diffusion_stage.make_train_step(config)(state, images, None, jax.random.PRNGKey(2))
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
  assert "cond_emb_layers_1" in state.params["unet"]["middle_block_0"]
  frozen = computation_config(config)
  _, tokens = generate.encode(frozen, state, images)
  samples = generate.sample_from_tokens(frozen, state, None, tokens, jax.random.PRNGKey(3), steps=2, eta=1.0)
  assert samples.shape == images.shape and bool(jnp.all(jnp.isfinite(samples)))
