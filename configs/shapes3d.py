"""Official EncDiff settings on DeepMind's Shapes3D (480,000 images, 64x64x3).

Needs the data (docs/data.md): 3dshapes.h5 in data.manual_dir, or a TFDS `shapes3d` (array_record) in
data.tfds_data_dir. Model and training values are those of concept_diffusion/config.py, which are the
official Shapes3D config (the released configs are identical across datasets).
"""
import ml_collections

from concept_diffusion.config import get_base_config


def get_config() -> ml_collections.ConfigDict:
  config = get_base_config()
  config.name = "shapes3d"
  config.data.name = "shapes3d"
  # eval.every (3,750 = one epoch at batch 128) and train.num_steps (40k) are the defaults' Shapes3D values.
  return config
