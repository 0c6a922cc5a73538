"""Token reliance of the raw UNet vs its EMA (the one the figures sample with), on one checkpoint of each run.

Usage, from the repository root with the runs under runs/repro (ema_vs_raw_reliance.jsonl was written so, 2026-12-02):
  python results/cpu_repro/scripts/ema_vs_raw_reliance.py encdiff_seed2 encdiff_seed0 encdiff_seed1
"""
import json
import sys

from concept_diffusion.evaluation.evaluate import reliance_scores
from concept_diffusion.train.run import load_dataset, restore_diffusion_state
from concept_diffusion.train.workdir import load_config

STEP = 2400
records = []
for run in sys.argv[1:]:
  workdir = f"runs/repro/{run}"
  config = load_config(workdir)
  dataset = load_dataset(config)
  state = restore_diffusion_state(config, workdir, STEP)
  ema_state = state.replace(params={**state.params, "unet": state.ema_unet})  # same encoder, EMA UNet
  for unet, scored in (("raw", state), ("ema", ema_state)):
    records.append({"run": run, "step": STEP, "unet": unet, **reliance_scores(config, scored, dataset, None)})
    print(json.dumps(records[-1]), flush=True)
with open("results/cpu_repro/ema_vs_raw_reliance.jsonl", "w", encoding="utf-8") as f:
  f.writelines(json.dumps(record) + "\n" for record in records)
