"""ProceduralShapes3D and the ground-truth dataset contract (index order, determinism, bad input).

Rendering compiles once per (image size, batch shape) and a compile costs seconds on CPU, so the tests share
two datasets (16 and 32 pixels) and render through `images()`, which always uses the same batch shape.
"""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from concept_diffusion import data
from concept_diffusion.data import base, shapes
from configs import procedural_shapes as procedural_shapes_config

SIZES = (10, 10, 10, 8, 4, 15)
CUBE, CYLINDER, SPHERE, CAPSULE = range(4)


@pytest.fixture(scope="module")
def ds16():
  return shapes.ProceduralShapes3D(image_size=16)


@pytest.fixture(scope="module")
def ds32():
  return shapes.ProceduralShapes3D(image_size=32)


def _data_config(**overrides) -> ml_collections.ConfigDict:
  config = procedural_shapes_config.get_config().data
  config.update(overrides)
  return config


def _object_mask(ds, factors: np.ndarray) -> np.ndarray:
  """Object pixels (n, H, W): the ones that change when only the object's hue changes (shadows do not)."""
  other = factors.copy()
  other[:, 2] = (factors[:, 2] + 5) % 10
  both = ds.images_from_factors(np.concatenate([factors, other]))
  return np.abs(both[:len(factors)] - both[len(factors):]).max(-1) > 1e-3


# --- metadata and index order -------------------------------------------------------------------------------


def test_metadata_matches_shapes3d(ds32):
  assert ds32.name == "procedural_shapes"
  assert ds32.factor_names == ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
  assert ds32.factor_sizes == SIZES
  assert ds32.num_factors == 6
  assert ds32.num_images == 480_000
  assert ds32.image_shape == (32, 32, 3)
  assert ds32.renders_on_device
  assert shapes.SHAPE_NAMES == ("cube", "cylinder", "sphere", "capsule")
  np.testing.assert_allclose(shapes.HUES, np.arange(10) / 10)
  np.testing.assert_allclose(shapes.SCALES[[0, -1]], [0.75, 1.25])
  np.testing.assert_allclose(shapes.ORIENTATIONS_DEG[[0, 7, -1]], [-30.0, 0.0, 30.0])


def test_index_order_is_row_major(ds16):
  # By hand: strides are (48000, 4800, 480, 60, 15, 1).
  assert ds16.factors_to_index(np.array([[1, 2, 3, 4, 1, 5]]))[0] == 48000 + 2 * 4800 + 3 * 480 + 4 * 60 + 15 + 5
  np.testing.assert_array_equal(ds16.index_to_factors(np.array([0, 1, 15, 60, 479_999])),
                                [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0],
                                 [9, 9, 9, 7, 3, 14]])
  rng = np.random.default_rng(0)
  factors = ds16.sample_factors(200, rng)
  np.testing.assert_array_equal(ds16.factors_to_index(factors), np.ravel_multi_index(factors.T, SIZES))


def test_index_factor_round_trip(ds16):
  indices = np.random.default_rng(1).integers(0, ds16.num_images, 500)
  factors = ds16.index_to_factors(indices)
  assert factors.shape == (500, 6) and factors.dtype == np.int64
  np.testing.assert_array_equal(ds16.factors_to_index(factors), indices)
  corners = np.array(list(itertools.product(*[(0, s - 1) for s in SIZES])))
  np.testing.assert_array_equal(ds16.index_to_factors(ds16.factors_to_index(corners)), corners)
  # A single tuple is accepted; an empty batch stays empty.
  assert ds16.factors_to_index([9, 9, 9, 7, 3, 14]).tolist() == [479_999]
  assert ds16.index_to_factors(np.zeros(0, np.int64)).shape == (0, 6)


def test_device_unravel_matches_numpy(ds16):
  indices = np.concatenate([np.random.default_rng(2).integers(0, ds16.num_images, 300), [0, 479_999]])
  # The mapping images_jax renders by (base.unravel_jax over the dataset's factor sizes).
  device = base.unravel_jax(jnp.asarray(indices), ds16.factor_sizes)
  np.testing.assert_array_equal(np.asarray(device), ds16.index_to_factors(indices))


def test_sample_factors(ds16):
  for random_state in (np.random.default_rng(3), np.random.RandomState(3), 3):
    factors = ds16.sample_factors(1000, random_state)
    assert factors.shape == (1000, 6) and factors.dtype == np.int64
    assert (factors >= 0).all() and (factors < np.array(SIZES)).all()
    assert len({tuple(column[:20]) for column in factors.T}) == 6  # columns drawn independently
  np.testing.assert_array_equal(ds16.sample_factors(10, 4), ds16.sample_factors(10, 4))
  factors, images = ds16.sample(3, np.random.default_rng(5))
  np.testing.assert_array_equal(images, ds16.images_from_factors(factors))


# --- pixels ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32])
def test_images_dtype_shape_range(size, ds16, ds32):
  ds = {16: ds16, 32: ds32}[size]
  images = ds.images(np.random.default_rng(6).integers(0, ds.num_images, 70))  # > one chunk of 64
  assert images.shape == (70, size, size, 3) and images.dtype == np.float32
  assert images.min() >= -1.0 and images.max() <= 1.0
  assert images.std() > 0.2  # a scene, not a flat image


def test_same_index_same_pixels_independent_of_batch(ds16):
  indices = np.array([123_456, 7, 479_999, 240_000])
  first = ds16.images(indices)
  np.testing.assert_allclose(ds16.images(indices), first, atol=1e-5)
  np.testing.assert_allclose(ds16.images(indices[::-1]), first[::-1], atol=1e-5)
  np.testing.assert_allclose(ds16.images(indices[2:3])[0], first[2], atol=1e-5)
  np.testing.assert_allclose(shapes.ProceduralShapes3D(16).images(indices), first, atol=1e-5)
  # A fresh trace and compile of the device path (as a training step would use it) gives the same pixels.
  fresh = jax.jit(lambda i: ds16.images_jax(i) * 1.0)
  np.testing.assert_allclose(np.asarray(fresh(jnp.asarray(indices, jnp.int32))), first, atol=1e-5)


def test_every_factor_changes_the_image(ds32):
  """For each factor, every value gives a visibly different image at several base points."""
  rng = np.random.default_rng(7)
  bases = ds32.sample_factors(3, rng)
  bases[:, 4] = [CUBE, CYLINDER, CAPSULE]  # orientation must show on non-spheres (it also moves the camera)
  for base_factors in bases:
    variants = []
    for k, size in enumerate(SIZES):
      block = np.repeat(base_factors[None], size, axis=0)
      block[:, k] = np.arange(size)
      variants.append(block)
    images = ds32.images_from_factors(np.concatenate(variants))
    start = 0
    for k, size in enumerate(SIZES):
      block = images[start:start + size]
      start += size
      changed = np.abs(block[:, None] - block[None]).max(-1) > 0.05  # (size, size, H, W)
      count = changed.sum((2, 3)) + np.eye(size, dtype=int) * 10**6
      assert count.min() >= 5, (f"factor {ds32.factor_names[k]} values {np.unravel_index(count.argmin(), count.shape)}"
                                f" look the same at base {base_factors}")


def test_sphere_orientation_still_moves_the_camera(ds32):
  factors = np.array([[1, 4, 8, 4, SPHERE, o] for o in (0, 7, 14)])
  images = ds32.images_from_factors(factors)
  assert np.abs(images[0] - images[2]).max(-1).mean() > 0.02


def test_object_covers_a_sane_fraction(ds32):
  orientations = [0, 5, 10, 14]
  factors = np.array([[2, 5, 8, scale, shape, o] for scale in (0, 3, 4, 7) for shape in range(4)
                      for o in orientations])
  fraction = _object_mask(ds32, factors).mean((1, 2)).reshape(4, 4, len(orientations))  # (scale, shape, o)
  assert (fraction[1:3] > 0.04).all() and (fraction[1:3] < 0.14).all(), fraction[1:3]
  assert (fraction[0] > 0.02).all() and (fraction[3] < 0.2).all()
  assert (fraction[3] > fraction[0] * 1.8).all()  # scale grows the area ~ (1.25 / 0.75)^2


def test_shapes_have_different_silhouettes(ds32):
  for scale, orientation in [(3, 7), (7, 0), (0, 14)]:
    masks = _object_mask(ds32, np.array([[0, 3, 6, scale, shape, orientation] for shape in range(4)]))
    for a, b in itertools.combinations(range(4), 2):
      differ = (masks[a] != masks[b]).sum()
      assert differ >= 6, f"{shapes.SHAPE_NAMES[a]} vs {shapes.SHAPE_NAMES[b]} differ in {differ} pixels"


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("indices, message", [
    ([480_000], "out of range"), ([-1], "out of range"), ([0.5], "integers"), ([[1, 2]], "1-D")])
def test_bad_indices(ds16, indices, message):
  with pytest.raises(ValueError, match=message):
    ds16.images(np.array(indices))
  with pytest.raises(ValueError, match=message):
    ds16.index_to_factors(np.array(indices))


@pytest.mark.parametrize("factors, message", [
    ([0, 0, 0, 0, 0], "length 6"), ([[0, 0, 0, 0, 0, 0, 0]], "length 6"), ([0, 0, 0, 8, 0, 0], "'scale' = 8"),
    ([0, 0, 0, 0, -1, 0], "'shape' = -1"), ([0.0, 0, 0, 0, 0, 0], "integers")])
def test_bad_factors(ds16, factors, message):
  with pytest.raises(ValueError, match=message):
    ds16.factors_to_index(np.array(factors))


@pytest.mark.parametrize("image_size", [0, -8, 30, 65, 128, "32", 32.0, True, None])
def test_bad_image_size(image_size):
  with pytest.raises(ValueError, match="image_size"):
    shapes.ProceduralShapes3D(image_size=image_size)
  config = ml_collections.ConfigDict({"name": "procedural_shapes", "image_size": image_size, "channels": 3})
  with pytest.raises(ValueError, match="image_size"):
    data.get_dataset(config)


# --- registry -------------------------------------------------------------------------------------------------


def test_get_dataset_from_config():
  ds = data.get_dataset(_data_config(image_size=32))
  assert isinstance(ds, shapes.ProceduralShapes3D) and isinstance(ds, data.GroundTruthDataset)
  assert ds.image_shape == (32, 32, 3)
  assert data.get_dataset(_data_config()).image_shape == (64, 64, 3)  # the config's default, not rendered here
  assert "procedural_shapes" in data.known_datasets()


def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError, match=r"unknown dataset.*'nope'.*known datasets: .*procedural_shapes"):
    data.get_dataset(_data_config(name="nope"))


def test_channel_mismatch_is_reported():
  with pytest.raises(ValueError, match="channels=1"):
    data.get_dataset(_data_config(channels=1))


def test_register_dataset_extends_the_registry():
  name = "test_only_tiny_shapes"
  data.register_dataset(name, lambda config: shapes.ProceduralShapes3D(config.image_size))
  try:
    assert data.get_dataset(_data_config(name=name, image_size=16)).image_shape == (16, 16, 3)
    with pytest.raises(ValueError, match="already registered"):
      data.register_dataset(name, lambda config: None)
  finally:
    data._BUILDERS.pop(name)


def test_stored_datasets_cannot_render_on_device():
  class Stored(data.GroundTruthDataset):
    name, factor_names, factor_sizes, image_shape = "stored", ("a",), (2,), (4, 4, 1)

    def images(self, indices):
      return np.zeros((len(self.check_indices(indices)),) + self.image_shape, np.float32)

  with pytest.raises(NotImplementedError, match="cannot render on device"):
    Stored().images_jax(jnp.zeros(1, jnp.int32))
  assert Stored().images_from_factors([[1]]).shape == (1, 4, 4, 1)


# --- anti-aliasing and the render cache ---------------------------------------------------------------------


def test_supersampling_is_the_box_filter_of_a_finer_render():
  """4x4 rays per pixel = the 64x64 one-ray render averaged over 4x4 blocks (then rounded to 8 bits): edges get
  the partial coverage the real 3dshapes renders have, and no pixel moves by more than the rounding."""
  factors = np.array([[0, 3, 6, 0, CUBE, 7], [2, 5, 8, 7, SPHERE, 0], [4, 1, 2, 3, CAPSULE, 14]], np.int32)
  fine = np.asarray(shapes.render(factors, image_size=64))
  box = fine.reshape(3, 16, 4, 16, 4, 3).mean(axis=(2, 4))
  smooth = np.asarray(shapes.render(factors, image_size=16, supersample=4))
  np.testing.assert_allclose(smooth, box, atol=1.0 / 255 + 1e-6)
  levels = (smooth + 1.0) * 127.5
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # 8-bit values
  # Edge pixels mix object and background: values that the hard-edged 16x16 render never has.
  hard = np.asarray(shapes.render(factors, image_size=16))
  blended = np.abs(smooth - hard).max(-1) > 0.05
  assert 5 <= blended.sum(axis=(1, 2)).min() and blended.mean() < 0.5


@pytest.mark.parametrize("supersample", [0, -1, 2.0, "4", True])
def test_bad_supersample(supersample):
  with pytest.raises(ValueError, match="data.supersample"):
    shapes.ProceduralShapes3D(image_size=16, supersample=supersample)


class _TinyShapes(shapes.ProceduralShapes3D):
  """32 factor combinations, so that a whole render cache is built in a second."""
  factor_sizes = (2, 2, 1, 2, 2, 2)


def test_render_cache_gives_the_rendered_pixels_and_is_built_once(tmp_path, monkeypatch):
  uncached = _TinyShapes(image_size=16, supersample=2)
  assert uncached.renders_on_device
  cached = _TinyShapes(image_size=16, supersample=2, cache_dir=str(tmp_path))
  assert not cached.renders_on_device  # training and evaluation read the cache on the host
  files = sorted(p.name for p in tmp_path.iterdir())
  assert files == ["procedural_shapes_16px_supersample2.npy", "procedural_shapes_16px_supersample2.npy.json"]
  indices = np.array([31, 0, 17, 5, 5])
  np.testing.assert_allclose(cached.images(indices), uncached.images(indices), atol=1e-6)
  np.testing.assert_allclose(cached.images(indices), np.asarray(uncached.images_jax(jnp.asarray(indices))), atol=1e-6)
  with pytest.raises(ValueError, match="out of range"):
    cached.images(np.array([32]))

  def no_render(*args):
    raise AssertionError("the cache was rendered again")
  monkeypatch.setattr(_TinyShapes, "_render_host", no_render)
  again = _TinyShapes(image_size=16, supersample=2, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(again.images(indices), cached.images(indices))
  # Without supersampling there is nothing to cache: rendering one ray per pixel is as fast as reading.
  assert _TinyShapes(image_size=16, supersample=1, cache_dir=str(tmp_path)).renders_on_device


def test_config_passes_supersample():
  ds = data.get_dataset(_data_config(image_size=16, supersample=2))
  assert (ds.supersample, ds.renders_on_device) == (2, True)
  assert _data_config().supersample == 4  # the procedural configs render anti-aliased
