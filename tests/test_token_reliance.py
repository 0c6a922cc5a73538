"""evaluation/token_reliance.py: the loss increase when an image gets another image's tokens, per noise band."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion.evaluation.token_reliance import band_edges, token_reliance
from concept_diffusion import states
from concept_diffusion.config import validate_config
from concept_diffusion.models.encdiff import build_model
from configs import smoke


def _pixel_config(**diffusion):
  config = smoke.get_config()
  config.first_stage.kind = "none"
  config.unet.channel_mult = (1,)  # one level: the same blocks, compiled in a fraction of the time
  config.unet.attention_resolutions = (1,)
  for key, value in diffusion.items():
    config.diffusion[key] = value
  return config


def _state(config, perturb: float = 0.0):
  model, tx, _ = states.build_diffusion(config)
  state = jax.jit(functools.partial(states.create_state, model, tx))(jax.random.PRNGKey(0))
  if perturb:  # move every weight off its initialisation, zero-initialised output projections included
    leaves, tree = jax.tree_util.tree_flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [x + perturb * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    state = state.replace(params=jax.tree_util.tree_unflatten(tree, leaves))
  return state


def _images(n=8, seed=2):
  return np.asarray(jax.random.uniform(jax.random.PRNGKey(seed), (n, 16, 16, 3), minval=-1, maxval=1))


def test_band_edges_cover_every_timestep_once():
  assert band_edges(1000, 5) == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]
  for timesteps, bands in ((10, 3), (7, 7), (5, 9)):
    edges = band_edges(timesteps, bands)
    covered = [t for lo, hi in edges for t in range(lo, hi)]
    assert covered == list(range(timesteps)), (timesteps, bands, edges)


def test_fresh_unet_ignores_the_tokens_and_a_trained_one_does_not():
  config = _pixel_config()
  # Fresh: every SpatialTransformer's output projection is zero-initialised (official), so the tokens cannot
  # reach the output yet: swapping them changes nothing, in every band.
  fresh = token_reliance(build_model(config), _state(config), _images(), jax.random.PRNGKey(0), num_bands=4)
  assert set(fresh) == {"token_reliance.t0-25", "token_reliance.t25-50", "token_reliance.t50-75",
                        "token_reliance.t75-100", "token_reliance.mean"}
  assert all(value == 0.0 for value in fresh.values()), fresh
  # With those projections off zero, another image's tokens give another (worse on average) prediction.
  moved = token_reliance(build_model(config), _state(config, perturb=0.3), _images(), jax.random.PRNGKey(0),
                         num_bands=4)
  assert all(np.isfinite(v) for v in moved.values()) and max(abs(v) for v in moved.values()) > 1e-4, moved


def test_identical_images_have_nothing_to_swap():
  config = _pixel_config()
  same = np.repeat(_images(1), 6, axis=0)  # every image's tokens are every other image's tokens
  scores = token_reliance(build_model(config), _state(config, perturb=0.3), same, jax.random.PRNGKey(0),
                          num_bands=3)
  np.testing.assert_allclose(list(scores.values()), 0.0, atol=1e-6)


def test_adagn_and_one_shot_variants_are_measured_too():
  adagn = _pixel_config()
  adagn.unet.conditioning = "adagn"
  scores = token_reliance(build_model(adagn), _state(adagn, perturb=0.3), _images(), jax.random.PRNGKey(0),
                          num_bands=2)
  assert abs(scores["token_reliance.mean"]) > 1e-4
  one_shot = _pixel_config(objective="one_shot", loss="l2")
  scores = token_reliance(build_model(one_shot), _state(one_shot, perturb=0.3), _images(), jax.random.PRNGKey(0))
  assert set(scores) == {"token_reliance.one_shot", "token_reliance.mean"}  # no timesteps to band
  assert scores["token_reliance.one_shot"] == scores["token_reliance.mean"] != 0.0


def test_bad_input_is_named():
  config = _pixel_config()
  state = _state(config)
  with pytest.raises(ValueError, match="at least 2 images"):
    token_reliance(build_model(config), state, _images(1), jax.random.PRNGKey(0))
  latent = smoke.get_config()  # VQ latent space: the first stage's parameters are needed to encode
  with pytest.raises(ValueError, match="pass its ae_params"):
    token_reliance(build_model(latent), state, _images(), jax.random.PRNGKey(0))
  config.eval.token_reliance_images = -1
  with pytest.raises(ValueError, match="eval.token_reliance_images"):
    validate_config(config)
