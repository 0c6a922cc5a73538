"""Images of a prepared TFDS dataset (array_record) by canonical index, through `tfds` random access.

No TensorFlow is needed to read: TFDS's data sources parse the records and decode the PNGs with numpy/PIL.
TFDS shuffles records on write, so record order says nothing about the factors: the canonical order is
rebuilt once from the `label_*` features (one pass over the labels without decoding images) and cached as a
.npy of record numbers, beside the prepared data or in data.cache_dir.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from concept_diffusion.data import array_files, canonical
from concept_diffusion.data.catalog import DatasetSpec, no_data_message, prepare_command
from concept_diffusion.errors import UserError

_LABEL_CHUNK = 4096  # records per read while collecting labels
_DEFAULT_REMOTE_CACHE = os.path.join("~", ".cache", "concept_diffusion")


def _passthrough_decoder():
  """A TFDS decoder that leaves a feature's bytes alone (no PNG decoding while reading labels)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class Undecoded(tfds.decode.Decoder):

    def decode_example(self, serialized_example):
      return serialized_example

    def decode_example_np(self, serialized_example):
      return serialized_example

  return Undecoded()


class TfdsImages:
  """uint8 images (n, H, W, C) of a prepared TFDS dataset, addressed by canonical index; thread-safe reads."""

  def __init__(self, spec: DatasetSpec, data_dir: str, factor_sizes: Sequence[int], cache_dir: str = ""):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.spec, self.factor_sizes = spec, tuple(factor_sizes)
    if spec.tfds_owner == "concept_diffusion":
      # Importing registers our builders with TFDS.
      from concept_diffusion.data import tfds_builders  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    not_prepared = no_data_message(spec, f"no prepared TFDS dataset {spec.tfds_name!r} in data.tfds_data_dir="
                                         f"{data_dir!r}.")
    if not data_dir:
      raise FileNotFoundError(no_data_message(spec, "data.tfds_data_dir is not set."))
    try:
      builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise FileNotFoundError(not_prepared) from e
    if not builder.is_prepared():
      raise FileNotFoundError(not_prepared)
    self.where = builder.data_dir
    try:
      # The prepared data's own features.json: the builder's code may say other factor sizes.
      features = tfds.features.FeatureConnector.from_config(self.where)
    except (OSError, ValueError, KeyError):
      features = builder.info.features
    self._check_features(features)
    try:
      self._source = builder.as_data_source(split="train")
      labels_source = builder.as_data_source(split="train", decoders={"image": _passthrough_decoder()})
    except NotImplementedError as e:
      raise UserError(f"{spec.name}: the TFDS dataset in {self.where} was prepared as "
                       f"{builder.info.file_format}; random access needs array_record. Prepare it again: "
                       f"`{prepare_command(spec)}`.") from e
    if len(self._source) != self.num_images:
      raise UserError(f"{spec.name}: the TFDS dataset in {self.where} has {len(self._source):,} records, but "
                       f"factor sizes {self.factor_sizes} make {self.num_images:,}.")
    self._rows = self._cached_rows(labels_source, builder, cache_dir)

  @property
  def num_images(self) -> int:
    return int(np.prod(self.factor_sizes))

  def _check_features(self, features) -> None:
    spec = self.spec
    missing = [key for key in ("image",) + spec.tfds_labels if key not in features]
    if missing:
      raise UserError(f"{spec.name}: the TFDS dataset in {self.where} has no feature(s) {missing}; it is not "
                       f"the {spec.tfds_name} dataset this reader expects.")
    sizes = tuple(features[key].num_classes for key in spec.tfds_labels)
    if sizes != self.factor_sizes:
      raise UserError(f"{spec.name}: the TFDS dataset in {self.where} has factor sizes {sizes}, but the config "
                       f"expects {self.factor_sizes} (data.factor_sizes, or the official sizes when it is empty).")
    if tuple(features["image"].shape) != tuple(spec.image_shape):
      raise UserError(f"{spec.name}: the TFDS dataset in {self.where} has images of shape "
                       f"{tuple(features['image'].shape)}, expected {spec.image_shape}.")

  def _cached_rows(self, labels_source, builder, cache_dir: str) -> np.ndarray:
    """Record number (N,) of each canonical index, computed from the labels once and cached."""
    remote = "://" in self.where
    folder = os.path.expanduser(cache_dir or (_DEFAULT_REMOTE_CACHE if remote else self.where))
    name = f"{self.spec.tfds_name.replace('/', '_')}-{builder.info.version}.canonical_rows.npy"
    # Local shards stamp the cache (a re-prepared dataset rebuilds it); remote ones are stamped by name only.
    sources = [] if remote else sorted(str(p) for p in builder.data_path.glob("*-train.*"))

    def fill(out: np.ndarray) -> None:
      labels = np.empty((self.num_images, len(self.spec.tfds_labels)), np.int64)
      for start in range(0, self.num_images, _LABEL_CHUNK):
        keys = list(range(start, min(start + _LABEL_CHUNK, self.num_images)))
        records = self._get(labels_source, keys)
        labels[start:start + len(keys)] = [[record[key] for key in self.spec.tfds_labels] for record in records]
      out[:] = canonical.rows_of(canonical.canonical_indices(
          labels, self.factor_sizes, self.spec.factor_names, f"{self.spec.name} TFDS labels in {self.where}"))

    extra = {"dataset": str(self.where), "records": self.num_images}
    return array_files.cached_array(os.path.join(folder, name), sources, (self.num_images,), np.int64, fill,
                                    extra=extra, what=self.spec.name)

  def _get(self, source, keys: list[int]) -> list:
    try:
      return source.__getitems__(keys)
    except Exception as e:  # array_record, protobuf and PIL each raise their own types on damaged records
      raise UserError(f"{self.spec.name}: reading records {keys[0]}..{keys[-1]} of the TFDS dataset in "
                       f"{self.where} failed ({type(e).__name__}: {e}); the data is damaged. Delete it and prepare "
                       f"it again: `{prepare_command(self.spec)}`.") from e

  def __call__(self, indices: np.ndarray) -> np.ndarray:
    """Images (n, H, W, C) uint8 of canonical `indices` (checked by the caller)."""
    records = self._get(self._source, self._rows[indices].tolist())
    images = [np.asarray(record["image"]) for record in records]
    bad = [image.shape for image in images if image.shape != tuple(self.spec.image_shape)]
    if bad:
      raise UserError(f"{self.spec.name}: a record of the TFDS dataset in {self.where} decoded to shape {bad[0]}, "
                       f"expected {self.spec.image_shape}; the data is damaged: prepare it again.")
    return np.stack(images) if images else np.zeros((0,) + tuple(self.spec.image_shape), np.uint8)
