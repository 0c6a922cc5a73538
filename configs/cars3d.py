"""Official EncDiff settings on Cars3D (17,568 images: 4 elevations x 24 azimuths x 183 cars, 64x64x3).

Needs the data (docs/data.md): the 183 data/cars/*.mat of nips2015-analogy-data.tar.gz in data.manual_dir, or
the TFDS dataset `cars3d` prepared by `python -m concept_diffusion.data.prepare --dataset=cars3d`. Objects are
numbered in sorted file-name order. The official code repeats the dataset 10x for training; ours draws
epochs from the sampler instead, and evaluates on the 17,568 images once each (no repeat, no misalignment).
Model values as concept_diffusion/config.py (the released configs are identical across datasets).
"""
import ml_collections

from concept_diffusion.config import get_base_config


def get_config() -> ml_collections.ConfigDict:
  config = get_base_config()
  config.name = "cars3d"
  config.data.name = "cars3d"
  # Official: every 5 epochs of the 10x repeated set (175,680 / 128 = 1,373 steps each), i.e. the same images seen.
  config.eval.every = 6_865
  config.train.num_steps = 27_000  # [fork]: FactorVAE plateaus from ~5k steps, DCI rises until ~25k
  return config
