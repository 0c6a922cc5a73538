r"""Parameter counts of a config's model, from abstract shapes (seconds at any size).

  encdiff-summary --config=procedural_shapes [--json]
"""
from __future__ import annotations

import json

import jax
import numpy as np

from concept_diffusion.config import validate_config
from concept_diffusion.models.encdiff import build_model


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def parameter_counts(config) -> dict[str, int]:
  """{'unet', 'encoder' (trunk), 'token_mlps', 'first_stage', 'total'} without allocating any parameter."""
  model = build_model(config)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0))["params"]
  enc = params["encoder"]
  counts = {
      "unet": _count(params["unet"]),
      "encoder": _count({k: v for k, v in enc.items() if not k.startswith("net_")}),
      "token_mlps": _count({k: v for k, v in enc.items() if k.startswith("net_")}),
      "first_stage": _count(model.abstract_ae_params()),
  }
  counts["total"] = sum(counts.values())
  return counts


def main() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from concept_diffusion.tools import cli  # pylint: disable=g-import-not-at-top
  config_flag = config_flags.DEFINE_config_file("config", None, "Config: a name in configs/ or a .py file.")
  json_flag = flags.DEFINE_bool("json", False, "Print one JSON object.")
  flags.mark_flags_as_required(["config"])

  def run(argv):
    del argv
    validate_config(config_flag.value)
    counts = parameter_counts(config_flag.value)
    if json_flag.value:
      print(json.dumps(counts))
      return
    for name, n in counts.items():
      print(f"{name:<12} {n:>14,}")
  cli.run(run)


if __name__ == "__main__":
  main()
