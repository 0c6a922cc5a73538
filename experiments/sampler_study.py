r"""Reconstructions of a trained run under each sampler setting: which one reconstructs best, measured.

  python experiments/sampler_study.py --workdir=runs/quickstart [--num_images=64] [--json=sampler_study.json]

For DDIM steps x eta x {clip_x0, timestep spacing, alpha_bar floor}: the pixel MSE of reconstructions from the
images' own tokens (EMA UNet, one seed) and, with the dataset's factor reader, the share of factor values the
reader reads back correctly. docs/generation.md gives a table of it and the reasons.
"""
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from concept_diffusion import api
from concept_diffusion.evaluation.factor_reader import reader_for
from concept_diffusion.tools import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained EncDiff workdir.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 64, "Images reconstructed per setting (seeded).")
_STEPS = flags.DEFINE_list("steps", ["25", "50", "200"], "DDIM step counts.")
_ETAS = flags.DEFINE_list("etas", ["0", "1"], "DDIM etas.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")
_READER_DIR = flags.DEFINE_string("reader_dir", None, "Factor reader cache (default: eval.generation_reader_dir).")
flags.mark_flags_as_required(["workdir"])

# name -> EncDiff sampler fields (models/encdiff.py): the three fixes for alpha_bar_T ~ 0, alone and together.
VARIANTS = {
    "plain": dict(clip_x0=False, timestep_spacing="leading", min_alpha_bar=0.0),
    "clip_x0": dict(clip_x0=True, timestep_spacing="leading", min_alpha_bar=0.0),
    "trailing": dict(clip_x0=False, timestep_spacing="trailing", min_alpha_bar=0.0),
    "floor_1e-4": dict(clip_x0=False, timestep_spacing="leading", min_alpha_bar=1e-4),
    "clip_x0+trailing": dict(clip_x0=True, timestep_spacing="trailing", min_alpha_bar=0.0),
}


def _main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  run = api.load_run(_WORKDIR.value)
  dataset = run.dataset
  factors = dataset.sample_factors(_NUM_IMAGES.value, np.random.default_rng(run.config.eval.seed))
  images = dataset.images_from_factors(factors)
  reader = reader_for(dataset, run.config.data, _READER_DIR.value or run.config.eval.generation_reader_dir,
                      steps=run.config.eval.generation_reader_steps)
  tokens = run.tokens(run.encode(images))
  rows = []
  for name, fields in VARIANTS.items():
    model = dataclasses.replace(run.model, **fields)
    for steps in map(int, _STEPS.value):
      for eta in map(float, _ETAS.value):
        recon = np.asarray(model.sample_jit(run.variables, run.ae_params, jnp.asarray(tokens),
                                            jax.random.PRNGKey(0), steps=steps, eta=eta))
        mse = float(np.mean((np.clip(recon, -1, 1) - images) ** 2))
        accuracy = (reader.read(recon) == factors).mean(axis=0)
        rows.append({"sampler": name, "steps": steps, "eta": eta, "mse": mse,
                     "reader_accuracy": dict(zip(dataset.factor_names, accuracy.round(3).tolist()))})
        print(f"{name:<17} DDIM {steps:>4} eta {eta:.0f}  MSE {mse:8.4f}  reader accuracy "
              + " ".join(f"{a:.2f}" for a in accuracy), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"workdir": _WORKDIR.value, "step": run.step, "num_images": _NUM_IMAGES.value,
                 "factor_names": list(dataset.factor_names), "rows": rows}, f, indent=2)
  print(f"{_NUM_IMAGES.value} images of {dataset.name}, step {run.step}", file=sys.stderr)


def main():
  cli.run(_main)


if __name__ == "__main__":
  main()
