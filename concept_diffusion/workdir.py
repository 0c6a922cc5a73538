"""Every file of a run: the workdir layout, config.json, metrics.jsonl + TensorBoard, the evaluation files.

  W/config.json            the run's full config (what evaluate/visualize/load_run read)
  W/autoencoder/<step>/    first-stage checkpoints (Orbax)      W/diffusion/<step>/  diffusion-stage checkpoints
  W/baseline/<step>/       a VAE baseline's checkpoints         W/metrics.jsonl      one JSON record per log point
  W/tensorboard/           event files                          W/figures/*.png      figures
  W/eval/metrics_<step>.json, W/eval/codes_<step>.npy           an evaluation's scores and the code table behind them
  W/lock.json              while a training runs: its host, pid and start time (one training per workdir)
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import sys
from typing import Any, Iterator, Mapping

import ml_collections
import numpy as np

from concept_diffusion import config as config_lib

AE_DIR, DIFFUSION_DIR, BASELINE_DIR = "autoencoder", "diffusion", "baseline"
FIGURES_DIR, EVAL_DIR, TENSORBOARD_DIR = "figures", "eval", "tensorboard"
CONFIG_FILE, METRICS_FILE, LOCK_FILE = "config.json", "metrics.jsonl", "lock.json"

# An evaluation at step S writes W/eval/metrics_S.json (its scores) and W/eval/codes_S.npy (the code table they
# were computed from); every reader and writer of those names goes through these two functions.
EVAL_FILE_SUFFIXES = {"metrics": ".json", "codes": ".npy"}


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """A temporary name beside `path` to write to; renamed onto `path` when the block ends without an error, removed
  otherwise. A reader never sees a half-written file, and an interrupted write leaves the previous one intact.

  The temporary name keeps the extension (savefig and np.save pick the format from it) and the directory (a rename
  is atomic only within one filesystem), whose folders are created.
  """
  directory, name = os.path.split(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  root, ext = os.path.splitext(name)
  tmp = os.path.join(directory, f".{root}.tmp-{os.getpid()}{ext}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, value: Any, **dump_kwargs) -> None:
  """`value` as JSON at `path`, atomically (see atomic_path)."""
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, **dump_kwargs)
    f.write("\n")


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


class WorkdirInUse(RuntimeError):
  """Another live process holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def ensure_workdir(workdir: str) -> None:
  """Creates the workdir, with one clear error when the path is taken by a file."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir {workdir} is a file, not a directory: pass a directory (a new one starts a "
                             "new run).")
  os.makedirs(workdir, exist_ok=True)


@contextlib.contextmanager
def workdir_lock(workdir: str, enabled: bool = True) -> Iterator[None]:
  """Holds W/lock.json ({host, pid, started}) for the block: a second training on the workdir stops at once, naming
  the holder. A lock left by a dead process on this host is taken over with a warning. On a shared filesystem only
  process 0 takes it (`enabled`), so the hosts of one pod run do not lock each other out.
  """
  if not enabled:
    yield
    return
  ensure_workdir(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  mine = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  while True:
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        with open(path, encoding="utf-8") as f:
          holder = json.load(f)
      except (OSError, ValueError):  # being written this instant, or damaged: treat as held by an unknown process
        holder = {}
      if holder.get("host") == mine["host"] and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
        print(f"warning: {path} was left by process {holder['pid']} (started {holder.get('started', '?')}), which "
              "is gone; taking the workdir over.", file=sys.stderr)
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
        continue
      who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
             if holder else "an unknown process")
      raise WorkdirInUse(f"{workdir} is in use by {who} (its lock: {path}). Wait for that run to finish or stop it, "
                         "or use another --workdir. If that process is gone (e.g. its machine crashed), delete "
                         f"{path}.") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(mine, f)
    break
  try:
    yield
  finally:
    with contextlib.suppress(OSError, ValueError):
      with open(path, encoding="utf-8") as f:
        still_mine = json.load(f) == mine
      if still_mine:
        os.remove(path)


def check_or_write_config(config: ml_collections.ConfigDict, workdir: str, write: bool = True) -> None:
  """Refuses a workdir whose config.json describes a different run; writes config.json otherwise."""
  ensure_workdir(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    saved = _read_config_json(path)
    diffs = config_lib.differing_fields(config, saved)
    if diffs:
      lines = "\n".join(f"  {k}: workdir has {old!r}, this run has {new!r}" for k, old, new in diffs[:20])
      raise ValueError(
          f"The workdir {workdir} holds a run with a different config:\n{lines}\n"
          "Use a new --workdir, or pass the workdir's values (see its config.json) to resume it.")
  if write:
    write_json(path, config_lib.config_to_dict(config), indent=2, sort_keys=True)


def _read_config_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    config_lib.config_from_dict(saved)  # every field it names must be in the schema
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{path} is not a valid run config ({type(e).__name__}: {e}). Restore it from a copy, or "
                     "write it again: run encdiff-train with the run's --config on this --workdir.") from None
  return saved


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config from its config.json (for evaluate/visualize/load_run, which take only the workdir); imports
  the extensions it names, so their registered models can be built."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a workdir written by encdiff-train?")
  config = config_lib.config_from_dict(_read_config_json(path))
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
