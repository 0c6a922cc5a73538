r"""Prepares a real dataset as a TFDS dataset (array_record) that `data.source="tfds"` reads.

  python -m concept_diffusion.data.prepare --dataset=mpi3d_toy --manual_dir=DIR [--data_dir=DATA_DIR]
  python -m concept_diffusion.data.prepare --dataset=cars3d --manual_dir=nips2015-analogy-data [--data_dir=...]
  python -m concept_diffusion.data.prepare --dataset=shapes3d [--manual_dir=DIR_WITH_3dshapes.h5] [--data_dir=...]

mpi3d_* and cars3d use this package's builders (`tfds_builders`), which read the official files in
--manual_dir and need no TensorFlow. shapes3d and dsprites use TFDS's own builders, which download the file
(or take it from --manual_dir: 3dshapes.h5, dsprites_ndarray_co1sh3sc6or40x32y32_64x64.hdf5) and encode
images with TensorFlow: install the [tfds] extra for those.

Everything is written under a temporary folder inside --data_dir and moved into place at the end, so a
failed or interrupted run leaves no partial dataset behind. Afterwards the canonical order of the records is
computed once and cached beside them, so training starts without a pass over the labels.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import uuid
from typing import Optional, Sequence

from concept_diffusion.data import catalog
from concept_diffusion.errors import UserError

TFDS_EXTRA_HINT = 'pip install -e ".[tfds]"'


def _default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def _missing_prepare_dependency(spec: catalog.DatasetSpec) -> Optional[str]:
  """The one-line reason this dataset cannot be prepared here, or None."""
  if spec.tfds_owner == "tfds" and importlib.util.find_spec("tensorflow") is None:
    return (f"prepare --dataset={spec.name} needs TensorFlow (TFDS's {spec.tfds_name} builder encodes images with "
            f"it); install it with: {TFDS_EXTRA_HINT}")
  return None


def _builder(spec: catalog.DatasetSpec, data_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if spec.tfds_owner == "concept_diffusion":
    # Importing registers our builders with TFDS.
    from concept_diffusion.data import tfds_builders  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  return tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")


def prepare(dataset: str, manual_dir: str = "", data_dir: str = "") -> str:
  """Prepares `dataset` under `data_dir`; returns the prepared dataset's folder.

  Raises:
    FileNotFoundError, ValueError: missing or bad input files, or a bad argument (with what to do).
    RuntimeError: a dependency is missing (the message says what to install).
  """
  if dataset not in catalog.SPECS:
    raise UserError(f"--dataset must be one of {', '.join(catalog.SPECS)}, got {dataset!r}.")
  spec = catalog.SPECS[dataset]
  missing = _missing_prepare_dependency(spec)
  if missing:
    raise RuntimeError(missing)
  data_dir = os.path.abspath(os.path.expanduser(data_dir or _default_data_dir()))
  if "://" in data_dir:
    raise UserError("--data_dir must be a local folder; prepare locally, then copy the folder (e.g. gsutil -m cp "
                     "-r) and point data.tfds_data_dir at the copy.")
  if spec.tfds_owner == "concept_diffusion" and not manual_dir:
    raise FileNotFoundError(catalog.no_data_message(spec, "--manual_dir is required (the folder with the official "
                                                          "files)."))
  if manual_dir and not os.path.isdir(manual_dir):
    raise FileNotFoundError(catalog.no_data_message(spec, f"--manual_dir={manual_dir} is not a folder."))

  final = _builder(spec, data_dir)
  if not final.is_prepared():
    _prepare_into_place(spec, manual_dir, data_dir, final.data_dir)
  _cache_canonical_order(spec, data_dir)
  return final.data_dir


def _prepare_into_place(spec: catalog.DatasetSpec, manual_dir: str, data_dir: str, destination: str) -> None:
  """Runs the builder under data_dir/.incomplete-*, then renames its version folder to `destination`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  staging = os.path.join(data_dir, f".incomplete-{spec.name}-{uuid.uuid4().hex[:8]}")
  os.makedirs(staging)
  try:
    builder = _builder(spec, staging)
    # TFDS's own builders download: keep the download for a rerun. Ours download nothing.
    downloads = os.path.join(data_dir if spec.tfds_owner == "tfds" else staging, "downloads")
    builder.download_and_prepare(download_dir=downloads,
                                 download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None))
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    os.rename(builder.data_dir, destination)  # same filesystem: atomic
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    # Folders the builder made for nothing (a failed first run) are removed; existing ones stay.
    for folder in (os.path.dirname(destination), os.path.dirname(os.path.dirname(destination))):
      if folder.startswith(data_dir + os.sep) and os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)


def _cache_canonical_order(spec: catalog.DatasetSpec, data_dir: str) -> None:
  from concept_diffusion.data.tfds_source import TfdsImages  # pylint: disable=g-import-not-at-top
  TfdsImages(spec, data_dir, spec.factor_sizes)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m concept_diffusion.data.prepare",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", required=True, choices=sorted(catalog.SPECS))
  parser.add_argument("--manual_dir", default="", help="folder with the official files")
  parser.add_argument("--data_dir", default="", help="TFDS data dir to write (default: $TFDS_DATA_DIR or "
                                                     "~/tensorflow_datasets); set data.tfds_data_dir to it")
  args = parser.parse_args(argv)
  try:
    where = prepare(args.dataset, args.manual_dir, args.data_dir)
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except ImportError as e:  # e.g. array_record where tensorflow-datasets does not pull it in
    print(f"error: prepare needs the Python package {e.name!r}, which is not installed: pip install {e.name} "
          f"(TensorFlow, for shapes3d / dsprites: {TFDS_EXTRA_HINT}).", file=sys.stderr)
    return 1
  data_dir = os.path.abspath(os.path.expanduser(args.data_dir or _default_data_dir()))
  print(f"{args.dataset} is prepared in {where}. Train with data.name={args.dataset} "
        f"data.tfds_data_dir={data_dir} (data.source=auto or tfds).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
