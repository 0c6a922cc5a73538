"""Real datasets (Shapes3D, dSprites, MPI3D, Cars3D) from tiny files in the official formats.

The official files hold up to a million images, so the tests keep the official layout (keys, dtypes, image
shapes, label conventions) with small factor sizes: files readers take them from `data.factor_sizes`, the
TFDS builders from the catalog entry, which the tests replace. Every image encodes its own canonical index in
its pixels, and rows are stored out of canonical order where the format has labels, so a wrong order shows.
"""
import dataclasses
import glob
import os
import zipfile

import h5py
import ml_collections
import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds

from concept_diffusion import data
from concept_diffusion.data import catalog, prepare, stored
from configs import cars3d as cars3d_config
from configs import dsprites as dsprites_config
from configs import mpi3d as mpi3d_config
from configs import shapes3d as shapes3d_config

SIZES = {"shapes3d": (2, 2, 2, 2, 2, 3), "dsprites": (3, 2, 2, 2, 2), "mpi3d_toy": (2, 2, 1, 1, 1, 2, 3),
         "mpi3d_real": (1, 2, 1, 1, 1, 2, 2), "cars3d": (2, 3, 4)}
SHAPES3D_VALUES = (np.arange(10) / 10, np.arange(10) / 10, np.arange(10) / 10, np.linspace(0.75, 1.25, 8),
                   np.arange(4.0), np.linspace(-30, 30, 15))


def _rgb_encoding(n: int) -> np.ndarray:
  """(n, 64, 64, 3) uint8: pixel [0, 0] is (index, 17, 200), the rest a per-index flat colour."""
  images = np.empty((n, 64, 64, 3), np.uint8)
  images[..., 0] = (np.arange(n) * 7 % 256)[:, None, None]
  images[..., 1] = 17
  images[..., 2] = 200
  images[:, 0, 0, 0] = np.arange(n)
  return images


def _decode_rgb(images: np.ndarray) -> np.ndarray:
  return np.round((images[:, 0, 0, 0] + 1) * 127.5).astype(int)


def _binary_encoding(n: int) -> np.ndarray:
  """(n, 64, 64) uint8 0/1: the first row holds the index in binary, plus a fixed square."""
  images = np.zeros((n, 64, 64), np.uint8)
  images[:, 0, :8] = (np.arange(n)[:, None] >> np.arange(8)) & 1
  images[:, 20:30, 20:30] = 1
  return images


def _decode_binary(images: np.ndarray) -> np.ndarray:
  return ((images[:, 0, :8, 0] > 0) * (1 << np.arange(8))).sum(-1)


def _write_shapes3d(folder, sizes, order, dtype=np.uint8, image_shape=(64, 64, 3)) -> str:
  """3dshapes.h5 with rows in `order` (row r holds canonical index order[r]) and float labels."""
  n = int(np.prod(sizes))
  factors = np.stack(np.unravel_index(order, sizes), axis=-1)
  labels = np.stack([SHAPES3D_VALUES[k][factors[:, k]] for k in range(6)], axis=-1)
  path = os.path.join(folder, "3dshapes.h5")
  images = _rgb_encoding(n)[order]
  if image_shape != (64, 64, 3):
    images = np.zeros((n,) + image_shape, np.uint8)
  with h5py.File(path, "w") as f:
    f.create_dataset("images", data=images.astype(dtype), chunks=(4,) + image_shape, compression="gzip")
    f.create_dataset("labels", data=labels)
  return path


def _write_dsprites(folder, sizes, order) -> tuple[str, str]:
  """The .npz (files source) and the .hdf5 (TFDS's builder) with rows in `order`."""
  n = int(np.prod(sizes))
  classes = np.concatenate([np.zeros((n, 1), np.int64), np.stack(np.unravel_index(order, sizes), axis=-1)], axis=1)
  imgs = _binary_encoding(n)[order]
  npz = os.path.join(folder, "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz")
  np.savez_compressed(npz, imgs=imgs, latents_classes=classes, latents_values=classes.astype(np.float64))
  hdf5 = os.path.join(folder, "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.hdf5")
  with h5py.File(hdf5, "w") as f:
    f.create_dataset("imgs", data=imgs)
    f.create_dataset("latents/classes", data=classes)
    f.create_dataset("latents/values", data=classes.astype(np.float64))
  return npz, hdf5


def _write_mpi3d(folder, name, sizes, compressed: bool, images=None) -> str:
  path = os.path.join(folder, f"{name}.npz")
  images = _rgb_encoding(int(np.prod(sizes))) if images is None else images
  (np.savez_compressed if compressed else np.savez)(path, images=images)
  return path


def _cars_colour(elevation, azimuth, obj):
  return np.array([elevation * 100 + azimuth * 20 + obj, 50 + obj, 9], np.uint8)


def _write_cars3d(folder, sizes) -> list[str]:
  """One .mat per object, named out of creation order; image (e, a, o) is a flat colour. Paths in sorted order."""
  num_elevations, num_azimuths, num_objects = sizes
  names = [f"car_{letter}.mat" for letter in "dbcaefgh"[:num_objects]]
  cars = os.path.join(folder, "data", "cars")
  os.makedirs(cars, exist_ok=True)
  for name in names:
    obj = sorted(names).index(name)
    im = np.zeros((128, 128, 3, num_azimuths, num_elevations), np.uint8)
    for e in range(num_elevations):
      for a in range(num_azimuths):
        im[:, :, :, a, e] = _cars_colour(e, a, obj)
    scipy.io.savemat(os.path.join(cars, name), {"im": im})
  return [os.path.join(cars, name) for name in sorted(names)]


def _truncate(path, fraction=0.5):
  with open(path, "r+b") as f:
    f.truncate(int(os.path.getsize(path) * fraction))


def _config(name, manual_dir="", tfds_data_dir="", **overrides) -> ml_collections.ConfigDict:
  config = {"mpi3d_toy": mpi3d_config, "mpi3d_real": mpi3d_config, "shapes3d": shapes3d_config,
            "dsprites": dsprites_config, "cars3d": cars3d_config}[name].get_config().data
  config.name = name
  config.manual_dir = str(manual_dir)
  config.tfds_data_dir = str(tfds_data_dir)
  config.factor_sizes = SIZES[name]
  config.update(overrides)
  return config


@pytest.fixture
def small_specs(monkeypatch):
  """The catalog with the tests' small factor sizes (what the TFDS builders and `prepare` use)."""
  for name, sizes in SIZES.items():
    monkeypatch.setitem(catalog.SPECS, name, dataclasses.replace(catalog.SPECS[name], factor_sizes=sizes))


def _shuffled(n, seed=0):
  return np.random.default_rng(seed).permutation(n)


# --- files source: images, factors, canonical order -----------------------------------------------------------


def test_shapes3d_from_h5_rebuilds_canonical_order_from_labels(tmp_path):
  n = int(np.prod(SIZES["shapes3d"]))
  _write_shapes3d(tmp_path, SIZES["shapes3d"], _shuffled(n))
  ds = data.get_dataset(_config("shapes3d", tmp_path))
  assert isinstance(ds, stored.StoredDataset) and not ds.renders_on_device
  assert ds.name == "shapes3d" and ds.factor_names[0] == "floor_hue" and ds.factor_sizes == SIZES["shapes3d"]
  assert ds.image_shape == (64, 64, 3) and ds.num_images == n
  images = ds.images(np.arange(n))
  assert images.dtype == np.float32 and images.min() >= -1 and images.max() <= 1
  np.testing.assert_array_equal(_decode_rgb(images), np.arange(n))
  indices = np.array([5, 0, n - 1, 5])  # any order, repeats
  np.testing.assert_array_equal(_decode_rgb(ds.images(indices)), indices)
  # The conversion is cached beside the file and reused (same pixels, no rebuild).
  cache = glob.glob(str(tmp_path / "*.canonical_images.npy"))
  assert len(cache) == 1
  mtime = os.stat(cache[0]).st_mtime_ns
  np.testing.assert_array_equal(data.get_dataset(_config("shapes3d", tmp_path)).images(indices), ds.images(indices))
  assert os.stat(cache[0]).st_mtime_ns == mtime


def test_dsprites_from_npz(tmp_path):
  n = int(np.prod(SIZES["dsprites"]))
  _write_dsprites(tmp_path, SIZES["dsprites"], _shuffled(n, 1))
  ds = data.get_dataset(_config("dsprites", tmp_path))
  assert ds.factor_names == ("shape", "scale", "orientation", "posX", "posY") and ds.image_shape == (64, 64, 1)
  images = ds.images(np.arange(n))
  assert set(np.unique(images)) == {-1.0, 1.0}  # 0/1 pixels -> -1/1
  np.testing.assert_array_equal(_decode_binary(images), np.arange(n))


@pytest.mark.parametrize("name, compressed", [("mpi3d_toy", False), ("mpi3d_real", True)])
def test_mpi3d_from_npz(tmp_path, name, compressed):
  _write_mpi3d(tmp_path, name, SIZES[name], compressed)
  ds = data.get_dataset(_config(name, tmp_path))
  n = int(np.prod(SIZES[name]))
  assert ds.factor_names == ("object_color", "object_shape", "object_size", "camera_height", "background_color",
                             "horizontal_axis", "vertical_axis")
  np.testing.assert_array_equal(_decode_rgb(ds.images(np.arange(n))), np.arange(n))
  # Uncompressed members are mapped in place (no copy); compressed ones are converted once.
  assert len(glob.glob(str(tmp_path / "*.npy"))) == int(compressed)


def test_cars3d_order_is_elevation_azimuth_sorted_object(tmp_path):
  _write_cars3d(tmp_path, SIZES["cars3d"])
  sizes = SIZES["cars3d"]
  for manual_dir in (tmp_path, tmp_path / "data" / "cars"):  # the archive root or the folder of .mat files
    ds = data.get_dataset(_config("cars3d", manual_dir))
    assert ds.factor_names == ("elevation", "azimuth", "object_type") and ds.num_images == 24  # never repeated
    images = ds.images(np.arange(ds.num_images))
    expected = np.array([_cars_colour(e, a, o) for e in range(sizes[0]) for a in range(sizes[1])
                         for o in range(sizes[2])])
    np.testing.assert_array_equal(np.round((images + 1) * 127.5).astype(int), np.broadcast_to(
        expected[:, None, None], images.shape))


def test_cars3d_resize_matches_pil_thumbnail():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from concept_diffusion.data import official_files  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
  picture = Image.fromarray(image)
  picture.thumbnail((64, 64), Image.LANCZOS)
  np.testing.assert_array_equal(official_files.resize_like_official(image, 64), np.asarray(picture))


def test_smaller_image_size_averages_blocks(tmp_path):
  _write_mpi3d(tmp_path, "mpi3d_toy", SIZES["mpi3d_toy"], compressed=False)
  full = data.get_dataset(_config("mpi3d_toy", tmp_path)).images(np.arange(6))
  half = data.get_dataset(_config("mpi3d_toy", tmp_path, image_size=32)).images(np.arange(6))
  assert half.shape == (6, 32, 32, 3)
  np.testing.assert_allclose(half, full.reshape(6, 32, 2, 32, 2, 3).mean((2, 4)), atol=1e-6)
  with pytest.raises(ValueError, match="must divide 64"):
    data.get_dataset(_config("mpi3d_toy", tmp_path, image_size=24))


# --- TFDS source ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mpi3d_toy", "cars3d"])
def test_prepare_then_read_through_tfds(tmp_path, small_specs, capsys, name):
  manual, tfds_dir = tmp_path / "manual", tmp_path / "tfds"
  os.makedirs(manual)
  if name == "cars3d":
    _write_cars3d(manual, SIZES[name])
  else:
    _write_mpi3d(manual, name, SIZES[name], compressed=True)
  assert prepare.main([f"--dataset={name}", f"--manual_dir={manual}", f"--data_dir={tfds_dir}"]) == 0
  assert "is prepared in" in capsys.readouterr().out
  assert not glob.glob(str(tfds_dir / ".incomplete*"))
  from_tfds = data.get_dataset(_config(name, tfds_data_dir=tfds_dir))  # source "auto" -> tfds
  from_files = data.get_dataset(_config(name, manual))
  assert from_tfds.source.startswith("tfds:") and from_files.source.startswith("files:")
  indices = np.arange(from_tfds.num_images)
  np.testing.assert_array_equal(from_tfds.images(indices), from_files.images(indices))
  np.testing.assert_array_equal(from_tfds.images(indices[::-1][:5]), from_files.images(indices[::-1][:5]))
  # TFDS shuffled the records; the cached canonical order (written by prepare) undoes it.
  rows = np.load(glob.glob(str(tfds_dir / "**" / "*.canonical_rows.npy"), recursive=True)[0])
  assert sorted(rows) == list(indices) and (rows != indices).any()
  # Preparing again finds the dataset and does nothing.
  assert prepare.main([f"--dataset={name}", f"--manual_dir={manual}", f"--data_dir={tfds_dir}"]) == 0


def _tfds_catalog_fake(real_builder, name, sizes, labels, image_shape, source_file):
  """TFDS's own shapes3d/dsprites builder, with the tests' factor sizes and PIL-encoded images (no TensorFlow).

  The records come from TFDS's own `_generate_examples` on a tiny file in the official format, so the
  feature names, label values and the shuffle-on-write are exactly those of `tfds build shapes3d|dsprites`.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with tfds.core.registered.skip_registration():

    class Fake(real_builder):  # pylint: disable=missing-class-docstring
      VERSION = real_builder.VERSION

      def _info(self):
        features = {"image": tfds.features.Image(shape=image_shape)}
        for key, size in zip(labels, sizes):
          features[key] = tfds.features.ClassLabel(num_classes=size)
          features["value_" + key[len("label_"):]] = tfds.features.Tensor(shape=(), dtype=np.float32)
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(source_file)}

      def _generate_examples(self, filepath):
        for key, record in super()._generate_examples(filepath):
          record["image"] = Image.fromarray(record["image"].squeeze(-1) if image_shape[-1] == 1 else record["image"])
          yield key, record

  Fake.name = name
  return Fake


@pytest.mark.parametrize("name", ["shapes3d", "dsprites"])
def test_tfds_catalog_datasets_are_put_in_canonical_order(tmp_path, monkeypatch, name):
  sizes, n = SIZES[name], int(np.prod(SIZES[name]))
  if name == "shapes3d":
    from tensorflow_datasets.datasets.shapes3d import shapes3d_dataset_builder as module
    source_file = _write_shapes3d(tmp_path, sizes, _shuffled(n, 2))
  else:
    from tensorflow_datasets.datasets.dsprites import dsprites_dataset_builder as module
    source_file = _write_dsprites(tmp_path, sizes, _shuffled(n, 3))[1]
  spec = dataclasses.replace(catalog.SPECS[name], factor_sizes=sizes, tfds_name=f"test_{name}")
  monkeypatch.setitem(catalog.SPECS, name, spec)
  fake = _tfds_catalog_fake(module.Builder, spec.tfds_name, sizes, spec.tfds_labels, spec.image_shape, source_file)
  fake(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()

  ds = data.get_dataset(_config(name, tfds_data_dir=tmp_path / "tfds", source="tfds"))
  images = ds.images(np.arange(n))
  decoded = _decode_rgb(images) if name == "shapes3d" else _decode_binary(images)
  np.testing.assert_array_equal(decoded, np.arange(n))
  np.testing.assert_array_equal(images, data.get_dataset(_config(name, tmp_path, source="files")).images(np.arange(n)))


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_module", [shapes3d_config, mpi3d_config, cars3d_config, dsprites_config])
def test_configs_without_data_fail_at_start_with_one_message(config_module, tmp_path):
  config = config_module.get_config()
  spec = catalog.SPECS[config.data.name]
  for manual_dir in ("", str(tmp_path)):
    config.data.manual_dir = manual_dir
    with pytest.raises(FileNotFoundError) as error:
      data.get_dataset(config.data)
    message = str(error.value)
    assert spec.download.split()[0] in message  # where to download
    assert f"--dataset={spec.name}" in message and "data.manual_dir" in message and "data.tfds_data_dir" in message
  config.data.source, config.data.tfds_data_dir = "tfds", str(tmp_path)
  with pytest.raises(FileNotFoundError, match="no prepared TFDS dataset"):
    data.get_dataset(config.data)


def test_real_configs_pass_the_schema():
  from concept_diffusion.config import validate_config  # pylint: disable=g-import-not-at-top
  for module, name, channels in ((shapes3d_config, "shapes3d", 3), (mpi3d_config, "mpi3d_toy", 3),
                                 (cars3d_config, "cars3d", 3), (dsprites_config, "dsprites", 1)):
    config = module.get_config()
    validate_config(config)
    assert (config.data.name, config.data.channels, config.data.image_size) == (name, channels, 64)
    assert (config.data.source, config.data.factor_sizes) == ("auto", ())


def test_cars3d_with_a_missing_file(tmp_path):
  paths = _write_cars3d(tmp_path, SIZES["cars3d"])
  os.remove(paths[1])
  with pytest.raises(ValueError, match=r"found 3 \.mat files .* expected 4"):
    data.get_dataset(_config("cars3d", tmp_path))


@pytest.mark.parametrize("images, message", [
    (np.zeros((12, 32, 32, 3), np.uint8), r"shape \(32, 32, 3\), expected \(64, 64, 3\)"),
    (np.zeros((12, 64, 64, 3), np.float32), "dtype float32, expected uint8"),
    (np.zeros((13, 64, 64, 3), np.uint8), "holds 13 images, but factor sizes"),
])
def test_mpi3d_wrong_shape_dtype_or_count(tmp_path, images, message):
  _write_mpi3d(tmp_path, "mpi3d_real", SIZES["mpi3d_real"], compressed=False, images=images)
  with pytest.raises(ValueError, match=message):
    data.get_dataset(_config("mpi3d_real", tmp_path))


def test_mpi3d_real_complex_is_recognised(tmp_path):
  # Only the .npy header is read before the count check, so a header claiming 460,800 images is enough.
  header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 64, 64, 3), np.uint8))
  header["shape"] = (460_800, 64, 64, 3)
  member = tmp_path / "images.npy"
  with open(member, "wb") as f:
    np.lib.format.write_array_header_1_0(f, header)
  with zipfile.ZipFile(tmp_path / "mpi3d_real.npz", "w") as archive:
    archive.write(member, "images.npy")
  with pytest.raises(ValueError, match=r"real_complex.*data.factor_sizes=\(4, 4, 2, 3, 3, 40, 40\)"):
    data.get_dataset(_config("mpi3d_real", tmp_path, factor_sizes=()))


def test_wrong_image_dtype_in_h5_and_wrong_im_in_mat(tmp_path):
  n = int(np.prod(SIZES["shapes3d"]))
  _write_shapes3d(tmp_path, SIZES["shapes3d"], np.arange(n), dtype=np.float32)
  with pytest.raises(ValueError, match="dtype float32, expected uint8"):
    data.get_dataset(_config("shapes3d", tmp_path))
  paths = _write_cars3d(tmp_path, SIZES["cars3d"])
  scipy.io.savemat(paths[0], {"im": np.zeros((64, 64, 3, 3, 2), np.uint8)})
  with pytest.raises(ValueError, match=r"'im' is uint8 \(64, 64, 3, 3, 2\), expected uint8 \(128, 128, 3, 3, 2\)"):
    data.get_dataset(_config("cars3d", tmp_path))


def test_corrupted_files(tmp_path):
  (tmp_path / "3dshapes.h5").write_bytes(b"not an hdf5 file" * 100)
  with pytest.raises(ValueError, match="not a readable HDF5 file"):
    data.get_dataset(_config("shapes3d", tmp_path))
  _truncate(_write_mpi3d(tmp_path, "mpi3d_toy", SIZES["mpi3d_toy"], compressed=True))
  with pytest.raises(ValueError, match="download it again"):
    data.get_dataset(_config("mpi3d_toy", tmp_path))
  assert not glob.glob(str(tmp_path / "*.npy*"))  # no half-written cache
  paths = _write_cars3d(tmp_path, SIZES["cars3d"])
  _truncate(paths[2])  # the first file is checked up front; this one fails during the conversion
  with pytest.raises(ValueError, match=r"not a readable \.mat file"):
    data.get_dataset(_config("cars3d", tmp_path))
  assert not glob.glob(str(tmp_path / "data" / "cars" / "*.npy*"))


def test_labels_that_miss_a_combination(tmp_path):
  n = int(np.prod(SIZES["dsprites"]))
  order = _shuffled(n)
  order[3] = order[4]  # one combination twice, one never
  _write_dsprites(tmp_path, SIZES["dsprites"], order)
  with pytest.raises(ValueError, match="exactly once"):
    data.get_dataset(_config("dsprites", tmp_path))


@pytest.mark.parametrize("factor_sizes, message", [
    ((2, 2, 2, 2, 3, 2), r"column 4 \(shape\): 2 distinct values, expected 3"),
    ((2, 2, 2), "must be 6 positive ints"),
])
def test_factor_sizes_not_matching_the_data(tmp_path, factor_sizes, message):
  n = int(np.prod(SIZES["shapes3d"]))
  _write_shapes3d(tmp_path, SIZES["shapes3d"], np.arange(n))
  with pytest.raises(ValueError, match=message):
    data.get_dataset(_config("shapes3d", tmp_path, factor_sizes=factor_sizes))


def test_tfds_dataset_with_other_factor_sizes_or_damaged_records(tmp_path, small_specs):
  manual, tfds_dir = tmp_path / "manual", tmp_path / "tfds"
  os.makedirs(manual)
  _write_mpi3d(manual, "mpi3d_toy", SIZES["mpi3d_toy"], compressed=False)
  assert prepare.main(["--dataset=mpi3d_toy", f"--manual_dir={manual}", f"--data_dir={tfds_dir}"]) == 0
  # The prepared data's sizes count, not the builder code's (here the same small ones).
  with pytest.raises(ValueError, match=r"has factor sizes \(2, 2, 1, 1, 1, 2, 3\), but the config expects "
                                       r"\(6, 6, 2, 3, 3, 40, 40\)"):
    data.get_dataset(_config("mpi3d_toy", tfds_data_dir=tfds_dir, factor_sizes=(6, 6, 2, 3, 3, 40, 40)))
  shard = glob.glob(str(tfds_dir / "mpi3d" / "toy" / "1.0.0" / "*.array_record*"))[0]
  with open(shard, "r+b") as f:
    f.seek(os.path.getsize(shard) // 2)
    f.write(b"\x00" * 4096)
  with pytest.raises(ValueError, match="the data is damaged"):
    data.get_dataset(_config("mpi3d_toy", tfds_data_dir=tfds_dir)).images(np.arange(12))


def test_failed_prepare_leaves_nothing_behind(tmp_path, small_specs, capsys):
  manual, tfds_dir = tmp_path / "manual", tmp_path / "tfds"
  os.makedirs(manual)
  _truncate(_write_cars3d(manual, SIZES["cars3d"])[-1])  # fails after TFDS has written the other cars
  assert prepare.main(["--dataset=cars3d", f"--manual_dir={manual}", f"--data_dir={tfds_dir}"]) == 1
  assert "not a readable .mat file" in capsys.readouterr().err
  assert os.listdir(tfds_dir) == []
  assert prepare.main(["--dataset=mpi3d_toy", f"--data_dir={tfds_dir}"]) == 1
  assert "--manual_dir is required" in capsys.readouterr().err and os.listdir(tfds_dir) == []


def test_prepare_says_how_to_install_tensorflow(tmp_path, monkeypatch, capsys):
  real_find_spec = prepare.importlib.util.find_spec
  monkeypatch.setattr(prepare.importlib.util, "find_spec",
                      lambda name, *args: None if name == "tensorflow" else real_find_spec(name, *args))
  assert prepare.main(["--dataset=shapes3d", f"--data_dir={tmp_path}"]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'pip install -e ".[tfds]"' in err
  assert os.listdir(tmp_path) == []


def test_unknown_source_and_registry():
  for name in ("shapes3d", "dsprites", "mpi3d_toy", "mpi3d_realistic", "mpi3d_real", "cars3d", "procedural_dsprites"):
    assert name in data.known_datasets()
  with pytest.raises(ValueError, match="data.source must be one of"):
    data.get_dataset(_config("shapes3d", source="gcs"))
