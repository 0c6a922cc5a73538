"""Official EncDiff model and training settings on the offline procedural Shapes3D-like data.

The values are those of concept_diffusion/config.py (the official Shapes3D config); see README's
"paper vs official code vs our default" table. 64x64 images, VQ f=4 first stage, 42.3M parameters.
"""
import ml_collections

from concept_diffusion.config import get_base_config


def get_config() -> ml_collections.ConfigDict:
  config = get_base_config()
  config.name = "procedural_shapes"
  config.data.supersample = 4  # anti-aliased edges, as the real 3dshapes renders (config.py)
  return config
