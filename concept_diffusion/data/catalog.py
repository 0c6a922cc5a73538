"""What each real (file- or TFDS-backed) dataset is: factors, native image shape, files, URLs, TFDS names.

One table, so that the file readers, the TFDS builders, the prepare command and the "no data" message all
say the same thing. Nothing here reads data or imports a heavy dependency.
"""
from __future__ import annotations

import dataclasses
import math

MPI3D_VARIANTS = ("toy", "realistic", "real")
CARS3D_URL = "http://www.scottreed.info/files/nips2015-analogy-data.tar.gz"
# The file TFDS's own builders take from a manual dir instead of downloading it (their checksums.tsv names).
TFDS_MANUAL_FILES = {"shapes3d": "3dshapes.h5", "dsprites": "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.hdf5"}
MPI3D_URL = ("https://github.com/rr-learning/disentanglement_dataset (the links in its README; the files are now "
             "also on Hugging Face, waleedgondal/mpi3d)")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A real ground-truth dataset.

  Attributes:
    name: registry name (config.data.name).
    factor_names: factor names in canonical (row-major) order.
    factor_sizes: the official number of values of each factor.
    image_shape: stored (H, W, C); images are uint8.
    pixel_max: the stored value of full intensity: 255, or 1 for dSprites' binary images.
    files: what data.manual_dir must hold, as shown to the user.
    download: where to download `files`.
    tfds_name: name (with config) for `tfds.data_source`.
    tfds_labels: the integer label feature of each factor in the TFDS dataset.
    tfds_owner: "tfds" when the builder is TFDS's own catalog builder, "concept_diffusion" when it is ours.
  """
  name: str
  factor_names: tuple[str, ...]
  factor_sizes: tuple[int, ...]
  image_shape: tuple[int, int, int]
  pixel_max: int
  files: str
  download: str
  tfds_name: str
  tfds_labels: tuple[str, ...]
  tfds_owner: str

  @property
  def num_images(self) -> int:
    return math.prod(self.factor_sizes)


_MPI3D_FACTORS = ("object_color", "object_shape", "object_size", "camera_height", "background_color",
                  "horizontal_axis", "vertical_axis")
_CARS3D_FACTORS = ("elevation", "azimuth", "object_type")

SPECS: dict[str, DatasetSpec] = {
    "shapes3d": DatasetSpec(
        name="shapes3d",
        factor_names=("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"),
        factor_sizes=(10, 10, 10, 8, 4, 15),
        image_shape=(64, 64, 3), pixel_max=255,
        files="3dshapes.h5 (keys images (480000, 64, 64, 3) uint8 and labels (480000, 6) float)",
        download="https://storage.googleapis.com/3d-shapes/3dshapes.h5",
        tfds_name="shapes3d",
        tfds_labels=("label_floor_hue", "label_wall_hue", "label_object_hue", "label_scale", "label_shape",
                     "label_orientation"),
        tfds_owner="tfds"),
    "dsprites": DatasetSpec(
        name="dsprites",
        factor_names=("shape", "scale", "orientation", "posX", "posY"),
        factor_sizes=(3, 6, 40, 32, 32),
        image_shape=(64, 64, 1), pixel_max=1,
        files=("dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz (keys imgs (737280, 64, 64) uint8 0/1 and "
               "latents_classes (737280, 6))"),
        download=("https://github.com/deepmind/dsprites-dataset (raw file: https://github.com/deepmind/"
                  "dsprites-dataset/raw/master/dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz)"),
        tfds_name="dsprites",
        tfds_labels=("label_shape", "label_scale", "label_orientation", "label_x_position", "label_y_position"),
        tfds_owner="tfds"),
    **{f"mpi3d_{variant}": DatasetSpec(
        name=f"mpi3d_{variant}",
        factor_names=_MPI3D_FACTORS,
        factor_sizes=(6, 6, 2, 3, 3, 40, 40),
        image_shape=(64, 64, 3), pixel_max=255,
        files=f"mpi3d_{variant}.npz (key images (1036800, 64, 64, 3) uint8, row-major over the factors)",
        download=MPI3D_URL,
        tfds_name=f"mpi3d/{variant}",
        tfds_labels=tuple(f"label_{name}" for name in _MPI3D_FACTORS),
        tfds_owner="concept_diffusion") for variant in MPI3D_VARIANTS},
    "cars3d": DatasetSpec(
        name="cars3d",
        factor_names=_CARS3D_FACTORS,
        factor_sizes=(4, 24, 183),
        image_shape=(64, 64, 3), pixel_max=255,
        files=("the 183 .mat files of nips2015-analogy-data.tar.gz (key im (128, 128, 3, 24, 4) uint8; the "
               "extracted archive's root, with data/cars/*.mat, also works)"),
        download=CARS3D_URL,
        tfds_name="cars3d",
        tfds_labels=tuple(f"label_{name}" for name in _CARS3D_FACTORS),
        tfds_owner="concept_diffusion"),
}


def prepare_command(spec: DatasetSpec) -> str:
  """The shell command that prepares `spec` as a TFDS dataset that `data.source="tfds"` reads."""
  if spec.tfds_owner == "tfds":
    # TFDS's own builder downloads the file itself (or takes it from --manual_dir) and needs TensorFlow.
    return (f'pip install -e ".[tfds]" && python -m concept_diffusion.data.prepare --dataset={spec.name} '
            f"--data_dir=DATA_DIR [--manual_dir=DIR with {TFDS_MANUAL_FILES[spec.name]}, else it downloads]")
  return f"python -m concept_diffusion.data.prepare --dataset={spec.name} --manual_dir=DIR --data_dir=DATA_DIR"


def no_data_message(spec: DatasetSpec, problem: str) -> str:
  """One message for a dataset that cannot be found: what is wrong, what to download, how to prepare it."""
  return (f"{spec.name}: {problem}\n"
          f"  Files option: set data.manual_dir to a folder with {spec.files} (data.source='files' or 'auto'). "
          f"Download: {spec.download}.\n"
          f"  TFDS option: `{prepare_command(spec)}`, then set data.tfds_data_dir=DATA_DIR (data.source='tfds' or "
          "'auto').")
