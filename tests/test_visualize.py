"""Swaps, attention maps and figure helpers (pixel-space smoke model with perturbed weights)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion import visualize
from concept_diffusion.models.encdiff import EncDiffVariables, build_model
from configs import smoke


@pytest.fixture(scope="module")
def model():
  config = smoke.get_config()
  config.first_stage.kind = "none"  # pixel space: no autoencoder to build
  encdiff = build_model(config)
  variables = jax.jit(encdiff.init)(jax.random.PRNGKey(0))
  # A fresh UNet's zero-initialised output layers ignore the tokens; perturb so the tokens matter.
  leaves, treedef = jax.tree_util.tree_flatten(variables["params"]["unet"])
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  unet = treedef.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  state = EncDiffVariables(variables["params"], variables["batch_stats"], unet, jnp.ones(()))
  images = jax.random.uniform(jax.random.PRNGKey(2), (6, 16, 16, 3), minval=-1, maxval=1)
  return encdiff, state, images


def test_swapping_in_the_own_token_reproduces_the_unswapped_sample_exactly(model):
  encdiff, state, images = model
  grid = encdiff.swap_grid(state, None, images[:3], images[:3], jax.random.PRNGKey(3), steps=4, eta=1.0)
  assert grid.shape == (encdiff.num_tokens + 1, 3, 16, 16, 3)
  for row in grid[1:]:
    np.testing.assert_array_equal(np.asarray(row), np.asarray(grid[0]))
  other = encdiff.swap_grid(state, None, images[:3], images[3:], jax.random.PRNGKey(3), steps=4, eta=1.0)
  np.testing.assert_array_equal(np.asarray(other[0]), np.asarray(grid[0]))  # row 0 never swaps
  changed = [float(jnp.abs(r - other[0]).max()) for r in other[1:]]
  assert max(changed) > 1e-5  # a swapped token changes the sample


def test_attention_maps_are_distributions_and_capturing_them_changes_nothing(model):
  encdiff, state, images = model
  _, tokens = encdiff.encode_with_tokens(state, images[:2])
  side = encdiff.attention_sides()[0]
  assert encdiff.attention_sides() == (16, 8)
  samples, maps = encdiff.sample_jit(state, None, tokens, jax.random.PRNGKey(4), steps=4, eta=1.0,
                                     attention_side=side)
  assert maps.shape == (2, 16, 16, encdiff.num_tokens)
  np.testing.assert_allclose(np.asarray(maps.sum(-1)), 1.0, atol=1e-5)
  plain = encdiff.sample_jit(state, None, tokens, jax.random.PRNGKey(4), steps=4, eta=1.0)
  # Without capture the UNet uses fused attention (jax.nn.dot_product_attention), with capture the explicit
  # softmax it must read the probabilities from: the same samples up to fp32 round-off.
  np.testing.assert_allclose(np.asarray(samples), np.asarray(plain), atol=1e-5)
  _, coarse = encdiff.sample_jit(state, None, tokens, jax.random.PRNGKey(4), steps=4, eta=1.0, attention_side=8)
  assert coarse.shape == (2, 8, 8, encdiff.num_tokens)


def test_traversal_changes_only_through_the_traversed_token(model):
  encdiff, state, images = model
  n = encdiff.num_tokens
  src = encdiff.encode(state, images[:1])
  values = jnp.tile(src.T, (1, 3))  # every value = the image's own scalar: all cells equal
  grid = encdiff.traversal_grid(state, None, images[0], values, jax.random.PRNGKey(5), steps=3, eta=0.0)
  assert grid.shape == (n, 3, 16, 16, 3)
  np.testing.assert_allclose(np.asarray(grid), np.asarray(jnp.broadcast_to(grid[0, 0], grid.shape)), atol=1e-5)


def test_ssim_and_overlay():
  rng = np.random.default_rng(0)
  a = rng.uniform(size=(2, 16, 16, 3))
  np.testing.assert_allclose(visualize.ssim(a, a), 1.0)
  assert np.all(visualize.ssim(a, rng.uniform(size=a.shape)) < 0.5)
  image = np.zeros((16, 16, 3), np.uint8)
  heat = np.zeros((4, 4))
  heat[0, 0] = 1.0
  over = visualize.heat_overlay(image, heat)
  assert over.shape == (16, 16, 3) and over[0, 0, 0] > over[15, 15, 0]  # 'jet': hot is red, cold is blue


def test_token_labels_name_the_most_important_factor():
  evaluation = {"dci.importance_matrix": [[0.0, 0.9], [0.8, 0.1], [0.001, 0.0]], "factor_names": ["x", "y"]}
  assert visualize.token_labels(3, evaluation) == ["token 0 y", "token 1 x", "token 2 (uninformative)"]
  assert visualize.token_labels(2, None) == ["token 0", "token 1"]
