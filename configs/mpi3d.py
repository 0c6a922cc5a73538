"""Official EncDiff settings on MPI3D-toy (1,036,800 images, 64x64x3).

Needs the data (docs/data.md): mpi3d_toy.npz in data.manual_dir, or the TFDS dataset `mpi3d/toy` prepared by
`python -m concept_diffusion.data.prepare --dataset=mpi3d_toy` in data.tfds_data_dir. The other variants:
`--config.data.name=mpi3d_realistic` or `mpi3d_real`. Model values as concept_diffusion/config.py (the released configs are
identical across datasets).
"""
import ml_collections

from concept_diffusion.config import get_base_config


def get_config() -> ml_collections.ConfigDict:
  config = get_base_config()
  config.name = "mpi3d"
  config.data.name = "mpi3d_toy"  # EncDiff trains and reports on the toy variant
  config.eval.every = 8_100  # official: every epoch, 1,036,800 / 128
  config.train.num_steps = 81_000  # ~10 epochs: where the [fork] reproduction reported its MPI3D numbers
  return config
