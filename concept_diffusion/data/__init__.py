"""Ground-truth datasets: `get_dataset(config.data)` returns a `GroundTruthDataset`.

New datasets register a builder (`ConfigDict -> GroundTruthDataset`) under their config name with
`register_dataset`; builders import their heavy dependencies lazily so that using one dataset never
requires another's packages.
"""
from __future__ import annotations

from typing import Any, Callable

from concept_diffusion.data.base import GroundTruthDataset, validate_image_size
from concept_diffusion.data.catalog import SPECS as STORED_DATASETS
from concept_diffusion.data.dsprites import ProceduralDSprites
from concept_diffusion.data.shapes import ProceduralShapes3D
from concept_diffusion.errors import UserError

DatasetBuilder = Callable[[Any], GroundTruthDataset]
_BUILDERS: dict[str, DatasetBuilder] = {}


def register_dataset(name: str, builder: DatasetBuilder) -> None:
  """Makes `get_dataset` build `name` with `builder(data_config)`."""
  if name in _BUILDERS:
    raise ValueError(f"dataset {name!r} is already registered.")
  _BUILDERS[name] = builder


def known_datasets() -> tuple[str, ...]:
  return tuple(sorted(_BUILDERS))


def _field(data_config: Any, key: str, default: Any = None) -> Any:
  # ConfigDict and plain dicts both support .get; attribute-only objects fall back to getattr.
  if hasattr(data_config, "get"):
    return data_config.get(key, default)
  return getattr(data_config, key, default)


def get_dataset(data_config: Any) -> GroundTruthDataset:
  """The dataset named by `data_config.name`, checked against `image_size` and `channels`."""
  name = _field(data_config, "name")
  if name not in _BUILDERS:
    raise UserError(f"unknown dataset data.name={name!r}; known datasets: {', '.join(known_datasets())}.")
  validate_image_size(_field(data_config, "image_size"))
  dataset = _BUILDERS[name](data_config)
  channels = _field(data_config, "channels", dataset.image_shape[-1])
  if channels != dataset.image_shape[-1]:
    raise UserError(f"data.channels={channels!r} but {name} images have {dataset.image_shape[-1]} channels; "
                     f"set data.channels={dataset.image_shape[-1]}.")
  size = _field(data_config, "image_size")
  if tuple(dataset.image_shape[:2]) != (size, size):
    raise UserError(f"Dataset {name!r} yields images of shape {tuple(dataset.image_shape)}, but the config expects "
                     f"{(size, size, dataset.image_shape[-1])} (data.image_size, data.channels). Set them to match.")
  return dataset


def _build_procedural_shapes(data_config: Any) -> GroundTruthDataset:
  return ProceduralShapes3D(image_size=_field(data_config, "image_size"),
                            supersample=_field(data_config, "supersample", 1),
                            cache_dir=_field(data_config, "cache_dir", ""))


def _build_procedural_dsprites(data_config: Any) -> GroundTruthDataset:
  return ProceduralDSprites(image_size=_field(data_config, "image_size"))


def _stored_builder(name: str) -> DatasetBuilder:
  """Builder of a real dataset; its readers (h5py, scipy, tfds) are imported only when it is built."""

  def build(data_config: Any) -> GroundTruthDataset:
    from concept_diffusion.data.stored import build_stored  # pylint: disable=g-import-not-at-top
    return build_stored(name, image_size=_field(data_config, "image_size"),
                        source=_field(data_config, "source", "auto"), manual_dir=_field(data_config, "manual_dir", ""),
                        tfds_data_dir=_field(data_config, "tfds_data_dir", ""),
                        cache_dir=_field(data_config, "cache_dir", ""),
                        factor_sizes=tuple(_field(data_config, "factor_sizes", ()) or ()))

  return build


register_dataset("procedural_shapes", _build_procedural_shapes)
register_dataset("procedural_dsprites", _build_procedural_dsprites)
for _name in STORED_DATASETS:
  register_dataset(_name, _stored_builder(_name))

__all__ = ["GroundTruthDataset", "ProceduralDSprites", "ProceduralShapes3D", "STORED_DATASETS", "get_dataset",
           "known_datasets", "register_dataset", "validate_image_size"]
