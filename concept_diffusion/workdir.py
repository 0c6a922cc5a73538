"""Every file of a run: the workdir layout, config.json, metrics.jsonl + TensorBoard, the evaluation files.

  W/config.json            the run's full config (what evaluate/visualize/load_run read)
  W/autoencoder/<step>/    first-stage checkpoints (Orbax)      W/diffusion/<step>/  diffusion-stage checkpoints
  W/baseline/<step>/       a VAE baseline's checkpoints         W/metrics.jsonl      one JSON record per log point
  W/tensorboard/           event files                          W/figures/*.png      figures
  W/eval/metrics_<step>.json, W/eval/codes_<step>.npy           an evaluation's scores and the code table behind them
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import ml_collections
import numpy as np

from concept_diffusion import config as config_lib

AE_DIR, DIFFUSION_DIR, BASELINE_DIR = "autoencoder", "diffusion", "baseline"
FIGURES_DIR, EVAL_DIR, TENSORBOARD_DIR = "figures", "eval", "tensorboard"
CONFIG_FILE, METRICS_FILE = "config.json", "metrics.jsonl"

# An evaluation at step S writes W/eval/metrics_S.json (its scores) and W/eval/codes_S.npy (the code table they
# were computed from); every reader and writer of those names goes through these two functions.
EVAL_FILE_SUFFIXES = {"metrics": ".json", "codes": ".npy"}


def eval_path(workdir: str, kind: str, step: int) -> str:
  """W/eval/metrics_<step>.json (kind "metrics") or W/eval/codes_<step>.npy (kind "codes")."""
  return os.path.join(workdir, EVAL_DIR, f"{kind}_{int(step)}{EVAL_FILE_SUFFIXES[kind]}")


def eval_steps(workdir: str, kind: str) -> list[int]:
  """Steps with an evaluation file of this kind in W/eval, ascending."""
  eval_dir = os.path.join(workdir, EVAL_DIR)
  names = os.listdir(eval_dir) if os.path.isdir(eval_dir) else []
  pattern = re.compile(rf"{kind}_(\d+){re.escape(EVAL_FILE_SUFFIXES[kind])}")
  return sorted(int(m.group(1)) for m in map(pattern.fullmatch, names) if m)


def eval_history(workdir: str) -> list[dict]:
  """Every W/eval/metrics_<step>.json record, by step."""
  records = []
  for step in eval_steps(workdir, "metrics"):
    with open(eval_path(workdir, "metrics", step), encoding="utf-8") as f:
      records.append(json.load(f))
  return records


def figure_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, FIGURES_DIR, name)


def first_stage_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the first stage lives: this workdir, or first_stage.checkpoint when this run does not train it."""
  source = workdir if "first_stage" in config.stages else (config.first_stage.checkpoint or workdir)
  return os.path.join(source, AE_DIR)


def check_or_write_config(config: ml_collections.ConfigDict, workdir: str, write: bool = True) -> None:
  """Refuses a workdir whose config.json describes a different run; writes config.json otherwise."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    diffs = config_lib.differing_fields(config, saved)
    if diffs:
      lines = "\n".join(f"  {k}: workdir has {old!r}, this run has {new!r}" for k, old, new in diffs[:20])
      raise ValueError(
          f"The workdir {workdir} holds a run with a different config:\n{lines}\n"
          "Use a new --workdir, or pass the workdir's values (see its config.json) to resume it.")
  if write:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(config_lib.config_to_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config from its config.json (for evaluate/visualize/load_run, which take only the workdir); imports
  the extensions it names, so their registered models can be built."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a workdir written by encdiff-train?")
  with open(path, encoding="utf-8") as f:
    config = config_lib.config_from_dict(json.load(f))
  config_lib.import_extensions(config)
  return config


class MetricWriter:
  """Appends one JSON line per logged step to W/metrics.jsonl and mirrors scalars/images to TensorBoard
  (tensorboardX: event files without TensorFlow). Only process 0 writes, so multi-host runs log once."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._workdir = workdir
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

  def scalars(self, step: int, values: Mapping[str, float], stage: str) -> None:
    if not self.enabled:
      return
    record = {"stage": stage, "step": int(step), **{k: float(v) for k, v in values.items()}}
    with open(os.path.join(self._workdir, METRICS_FILE), "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in values.items():
      self._tb.add_scalar(f"{stage}/{key}", float(value), int(step))

  def progress(self, stage: str, step: int) -> dict[str, float]:
    """{"wall_s", "images_seen"} of `stage`'s training record at `step` ({} if there is none).

    The loop logs at every checkpoint and hook step, so an evaluation at `step` can carry how long the stage had
    trained and on how many images; a resumed run continues its clock from here. Step 0 (an untrained model) is
    zero on both, so its evaluation sits at the origin of the metric-vs-time curves.
    """
    found = {"wall_s": 0.0, "images_seen": 0} if step == 0 else {}
    for record in read_metrics(self._workdir):  # the last record wins: a resume may re-log a step
      if record.get("stage") == stage and record.get("step") == step and "wall_s" in record:
        found = {k: record[k] for k in ("wall_s", "images_seen") if k in record}
    return found

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """image: (H, W, 3) uint8."""
    if self.enabled:
      self._tb.add_image(tag, image, int(step), dataformats="HWC")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
