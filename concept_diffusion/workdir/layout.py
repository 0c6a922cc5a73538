"""Where each file of a run lives under its workdir W (a local path or a URL):

  W/config.json            the run's full config (what evaluate/visualize/load_run read)
  W/autoencoder/<step>/    first-stage checkpoints (Orbax)      W/diffusion/<step>/  diffusion-stage checkpoints
  W/baseline/<step>/       a VAE baseline's checkpoints         W/metrics.jsonl      one JSON record per log point
  W/tensorboard/           event files                          W/figures/*.png      figures
  W/eval/metrics_<step>.json, W/eval/codes_<step>.npy           an evaluation's scores and the code table behind them
  W/lock.json              while a training runs: its host, pid and start time (one training per workdir)
"""
from __future__ import annotations

import os
import re

from etils import epath
import ml_collections

AE_DIR, DIFFUSION_DIR, BASELINE_DIR = "autoencoder", "diffusion", "baseline"
FIGURES_DIR, EVAL_DIR, TENSORBOARD_DIR = "figures", "eval", "tensorboard"
CONFIG_FILE, METRICS_FILE, LOCK_FILE = "config.json", "metrics.jsonl", "lock.json"

# An evaluation at step S writes W/eval/metrics_S.json (its scores) and W/eval/codes_S.npy (the code table they
# were computed from); every reader and writer of those names goes through these two functions.
EVAL_FILE_SUFFIXES = {"metrics": ".json", "codes": ".npy", "generation": ".json"}


def eval_path(workdir: str, kind: str, step: int) -> str:
  """W/eval/metrics_<step>.json (kind "metrics") or W/eval/codes_<step>.npy (kind "codes")."""
  return os.path.join(workdir, EVAL_DIR, f"{kind}_{int(step)}{EVAL_FILE_SUFFIXES[kind]}")


def eval_steps(workdir: str, kind: str) -> list[int]:
  """Steps with an evaluation file of this kind in W/eval, ascending."""
  eval_dir = epath.Path(workdir) / EVAL_DIR
  names = [p.name for p in eval_dir.iterdir()] if eval_dir.is_dir() else []
  pattern = re.compile(rf"{kind}_(\d+){re.escape(EVAL_FILE_SUFFIXES[kind])}")
  return sorted(int(m.group(1)) for m in map(pattern.fullmatch, names) if m)


def figure_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, FIGURES_DIR, name)


def first_stage_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the first stage lives: this workdir, or first_stage.checkpoint when this run does not train it."""
  source = workdir if "first_stage" in config.stages else (config.first_stage.checkpoint or workdir)
  return os.path.join(source, AE_DIR)


def ensure_workdir(workdir: str) -> None:
  """Creates the workdir, with one clear error when the path is taken by a file."""
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f"--workdir {workdir} is a file, not a directory: pass a directory (a new one starts a "
                             "new run).")
  path.mkdir(parents=True, exist_ok=True)  # remote: a no-op but for a missing bucket (an object store has no folders)
