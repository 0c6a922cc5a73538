"""ProceduralDSprites: dSprites' factors and order, binary pixels, determinism, device rendering, bad input.

Rendering compiles once per (image size, batch shape), so the tests share two datasets and render through
`images()`, which always uses the same batch shape.
"""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from concept_diffusion import data
from concept_diffusion.data import dsprites

SIZES = (3, 6, 40, 32, 32)
SQUARE, ELLIPSE, HEART = range(3)


@pytest.fixture(scope="module")
def ds64():
  return dsprites.ProceduralDSprites(image_size=64)


@pytest.fixture(scope="module")
def ds16():
  return dsprites.ProceduralDSprites(image_size=16)


def _centroid(mask: np.ndarray) -> np.ndarray:
  rows, cols = np.nonzero(mask)
  return np.array([cols.mean(), rows.mean()])


def test_metadata_matches_dsprites(ds64):
  assert ds64.name == "procedural_dsprites" and ds64.renders_on_device
  assert ds64.factor_names == ("shape", "scale", "orientation", "posX", "posY")
  assert ds64.factor_sizes == SIZES and ds64.num_images == 737_280
  assert ds64.image_shape == (64, 64, 1)
  assert dsprites.SHAPE_NAMES == ("square", "ellipse", "heart")
  np.testing.assert_allclose(dsprites.SCALES, np.linspace(0.5, 1.0, 6))
  assert ds64.factors_to_index([2, 5, 39, 31, 31]).tolist() == [737_279]
  assert ds64.factors_to_index([1, 2, 3, 4, 5]).tolist() == [245_760 + 2 * 40_960 + 3 * 1024 + 4 * 32 + 5]


def test_pixels_are_binary_and_deterministic(ds64, ds16):
  indices = np.random.default_rng(0).integers(0, ds64.num_images, 300)  # > one chunk of 256
  for ds in (ds64, ds16):
    images = ds.images(indices)
    assert images.shape == (300,) + ds.image_shape and images.dtype == np.float32
    assert set(np.unique(images)) == {-1.0, 1.0}
    assert ((images > 0).mean((1, 2, 3)) > 0).all()  # every image shows its shape
    np.testing.assert_array_equal(ds.images(indices[::-1]), images[::-1])
    np.testing.assert_array_equal(dsprites.ProceduralDSprites(ds.image_size).images(indices[:3]), images[:3])
  # The device path (as a train step traces it) gives the same pixels.
  fresh = jax.jit(lambda i: ds64.images_jax(i) * 1.0)
  np.testing.assert_array_equal(np.asarray(fresh(jnp.asarray(indices, jnp.int32))), ds64.images(indices))
  np.testing.assert_array_equal(np.asarray(jax.jit(ds16.images_jax)(jnp.asarray(indices[:7]))),
                                ds16.images(indices[:7]))


def test_every_factor_value_gives_a_different_image(ds64):
  for base in ([HEART, 3, 7, 10, 20], [SQUARE, 5, 3, 16, 16], [ELLIPSE, 0, 17, 0, 31]):
    for k, size in enumerate(SIZES):
      factors = np.repeat(np.array(base)[None], size, axis=0)
      factors[:, k] = np.arange(size)
      images = ds64.images_from_factors(factors)[..., 0] > 0
      if k == 2 and base[0] != HEART:  # square and ellipse are symmetric: 90 and 180 degrees look the same
        period = 10 if base[0] == SQUARE else 20
        assert (images[:period] != images[period:2 * period]).mean() < 0.002  # up to boundary rounding
        images = images[:period]
      differ = (images[:, None] != images[None]).sum((2, 3)) + np.eye(len(images), dtype=int) * 10**6
      assert differ.min() >= 1, f"factor {ds64.factor_names[k]} values look the same at {base}"


def test_factors_mean_what_they_say(ds64):
  # Position moves the centroid right / down by the same amount per step; the shape stays inside the image.
  masks = ds64.images_from_factors(np.array([[SQUARE, 5, 0, 0, 0], [SQUARE, 5, 0, 31, 0],
                                             [SQUARE, 5, 0, 0, 31]]))[..., 0] > 0
  left_top, right, bottom = (_centroid(m) for m in masks)
  np.testing.assert_allclose(right - left_top, [0.6 * 64, 0], atol=1.0)
  np.testing.assert_allclose(bottom - left_top, [0, 0.6 * 64], atol=1.0)
  border = np.zeros((64, 64), bool)
  border[[0, -1]] = border[:, [0, -1]] = True
  corners = [[shape, 5, o, x, y] for shape in range(3) for o in (0, 5, 13)
             for x, y in itertools.product((0, 31), (0, 31))]
  assert not (ds64.images_from_factors(np.array(corners))[..., 0] > 0)[:, border].any()
  # Scale grows the area; 1.0 vs 0.5 is about 4x.
  factors = np.array([[shape, scale, 0, 16, 16] for shape in range(3) for scale in (0, 5)])
  areas = (ds64.images_from_factors(factors)[..., 0] > 0).sum((1, 2))
  np.testing.assert_allclose(areas[1::2] / areas[::2], 4.0, rtol=0.25)
  # Orientation turns the heart: a quarter turn maps its mask onto the rotated mask (up to pixel rounding).
  quarter = ds64.images_from_factors(np.array([[HEART, 5, 0, 16, 16], [HEART, 5, 10, 16, 16]]))[..., 0] > 0
  assert (np.rot90(quarter[0], k=-1) != quarter[1]).mean() < 0.01 or (np.rot90(quarter[0]) != quarter[1]).mean() < 0.01


def test_get_dataset_and_channels():
  config = ml_collections.ConfigDict({"name": "procedural_dsprites", "image_size": 32, "channels": 1})
  ds = data.get_dataset(config)
  assert isinstance(ds, dsprites.ProceduralDSprites) and ds.image_shape == (32, 32, 1)
  config.channels = 3
  with pytest.raises(ValueError, match="channels=1"):
    data.get_dataset(config)


@pytest.mark.parametrize("image_size", [0, 30, 65, 128, "32", None])
def test_bad_image_size(image_size):
  with pytest.raises(ValueError, match="image_size"):
    dsprites.ProceduralDSprites(image_size=image_size)


def test_bad_indices(ds16):
  with pytest.raises(ValueError, match="out of range"):
    ds16.images(np.array([737_280]))
  with pytest.raises(ValueError, match="'posY' = 32"):
    ds16.factors_to_index(np.array([0, 0, 0, 0, 32]))
