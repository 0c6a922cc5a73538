"""TFDS builders for the datasets TFDS lacks: MPI3D (toy, realistic, real) and Cars3D, from the official files.

Importing this module registers `mpi3d` (configs toy / realistic / real) and `cars3d` with TFDS. They read
data.manual_dir through `official_files` (same checks, same canonical order) and write features `image`
(PNG) + one `label_<factor>` ClassLabel per factor. Images are handed to TFDS as PIL images, which TFDS
encodes with PIL: preparing needs no TensorFlow. Use `python -m concept_diffusion.data.prepare`.
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from concept_diffusion.data import catalog, official_files

_HOMEPAGES = {"mpi3d": "https://github.com/rr-learning/disentanglement_dataset",
              "cars3d": "http://www.scottreed.info/"}


def _features(spec: catalog.DatasetSpec) -> tfds.features.FeaturesDict:
  labels = {key: tfds.features.ClassLabel(num_classes=size) for key, size in zip(spec.tfds_labels, spec.factor_sizes)}
  return tfds.features.FeaturesDict({"image": tfds.features.Image(shape=spec.image_shape), **labels})


def _open(spec: catalog.DatasetSpec, manual_dir: str):
  # Opened in _split_generators, not in the generator, so that bad files fail before TFDS starts writing.
  return official_files.open_official(spec, manual_dir, spec.factor_sizes)


def _examples(spec: catalog.DatasetSpec, reader):
  """(canonical index, example) of every image; TFDS shuffles them on write, the labels keep the order."""
  for indices, images in reader.blocks():
    factors = np.stack(np.unravel_index(indices, spec.factor_sizes), axis=-1)
    for index, image, row in zip(indices, images, factors):
      example = {"image": PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)}
      example.update({key: int(value) for key, value in zip(spec.tfds_labels, row)})
      yield int(index), example


class Mpi3d(tfds.core.GeneratorBasedBuilder):
  """MPI3D-toy / realistic / real (Gondal et al. 2019), 1,036,800 images of 64x64x3 each."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "concept_diffusion's builder: image + label_<factor>, from mpi3d_<variant>.npz."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=variant, description=f"mpi3d_{variant}.npz")
                     for variant in catalog.MPI3D_VARIANTS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (f"Put mpi3d_<variant>.npz (key images) in the manual dir. Download: "
                                  f"{catalog.MPI3D_URL}.")

  @property
  def _spec(self) -> catalog.DatasetSpec:
    return catalog.SPECS[f"mpi3d_{self.builder_config.name}"]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=_features(self._spec),
                                 homepage=_HOMEPAGES["mpi3d"])

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(_open(self._spec, str(dl_manager.manual_dir)))}

  def _generate_examples(self, reader):
    return _examples(self._spec, reader)


class Cars3d(tfds.core.GeneratorBasedBuilder):
  """Cars3D (Reed et al. 2015): 183 cars x 24 azimuths x 4 elevations, resized to 64x64x3 (17,568 images).

  Objects are numbered in sorted file-name order (the official code uses os.listdir order).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "concept_diffusion's builder: image + label_<factor>, from data/cars/*.mat."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (f"Extract {catalog.CARS3D_URL} and give its root (or data/cars) as the manual "
                                  "dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=_features(catalog.SPECS["cars3d"]),
                                 homepage=_HOMEPAGES["cars3d"])

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(_open(catalog.SPECS["cars3d"], str(dl_manager.manual_dir)))}

  def _generate_examples(self, reader):
    return _examples(catalog.SPECS["cars3d"], reader)
