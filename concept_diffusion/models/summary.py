r"""Parameter counts of a config's model, from abstract shapes (seconds at any size).

  python -m concept_diffusion.models.summary --config=configs/procedural_shapes.py [--json]
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def parameter_counts(config) -> dict[str, int]:
  """{'unet', 'encoder' (trunk), 'token_mlps', 'first_stage', 'total'} without allocating any parameter."""
  from concept_diffusion.models import autoencoder  # pylint: disable=g-import-not-at-top
  from concept_diffusion.train.diffusion_stage import build_models, latent_shape  # pylint: disable=g-import-not-at-top
  encoder, unet = build_models(config)
  key = jax.random.PRNGKey(0)
  size, channels = config.data.image_size, config.data.channels
  enc = jax.eval_shape(encoder.init, key, jnp.zeros((1, size, size, channels)))["params"]
  tokens = jnp.zeros((1, config.encoder.num_tokens, config.encoder.token_dim))
  unet_params = jax.eval_shape(unet.init, key, jnp.zeros((1,) + latent_shape(config)), jnp.zeros((1,), jnp.int32),
                               tokens)["params"]
  fs_module = autoencoder.build_first_stage(config.first_stage, channels)
  fs = 0 if fs_module is None else _count(
      jax.eval_shape(fs_module.init, key, jnp.zeros((1, size, size, channels)))["params"])
  counts = {
      "unet": _count(unet_params),
      "encoder": _count({k: v for k, v in enc.items() if not k.startswith("net_")}),
      "token_mlps": _count({k: v for k, v in enc.items() if k.startswith("net_")}),
      "first_stage": fs,
  }
  counts["total"] = sum(counts.values())
  return counts


def main(argv):
  del argv
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  counts = parameter_counts(_CONFIG.value)
  if _JSON.value:
    print(json.dumps(counts))
    return
  for name, n in counts.items():
    print(f"{name:<12} {n:>14,}")


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())  # configs/ imports `concept_diffusion` and may import sibling configs
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
  _JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
