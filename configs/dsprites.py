"""EncDiff's official model settings on dSprites (737,280 binary images, 64x64x1).

EncDiff releases no dSprites config; this is the official Shapes3D/MPI3D/Cars3D config (concept_diffusion/config.py) with one
input channel (the first stage and the concept encoder take data.channels; the UNet sees the 3-channel latent).
Needs the data (docs/data.md): dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz in data.manual_dir, or a TFDS
`dsprites` (array_record) in data.tfds_data_dir. Offline stand-in: `--config.data.name=procedural_dsprites`.
"""
import ml_collections

from concept_diffusion.config import get_base_config


def get_config() -> ml_collections.ConfigDict:
  config = get_base_config()
  config.name = "dsprites"
  config.data.name = "dsprites"
  config.data.channels = 1
  config.eval.every = 5_760  # one epoch, 737,280 / 128
  return config
