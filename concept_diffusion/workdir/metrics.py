"""W/metrics.jsonl (one JSON record per logged step) and its TensorBoard mirror, W/tensorboard/."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from etils import epath
import numpy as np

from concept_diffusion.workdir.layout import METRICS_FILE, TENSORBOARD_DIR
from concept_diffusion.workdir.storage import append_text, storage_for


class MetricWriter:
  """Appends one JSON line per logged step to W/metrics.jsonl and mirrors scalars/images to TensorBoard
  (tensorboardX: event files without TensorFlow). Only process 0 writes, so multi-host runs log once."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._workdir = workdir
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      logdir = os.path.join(workdir, TENSORBOARD_DIR)
      storage_for(logdir).route_event_files(logdir)
      self._tb = SummaryWriter(logdir)

  def scalars(self, step: int, values: Mapping[str, float], stage: str) -> None:
    if not self.enabled:
      return
    record = {"stage": stage, "step": int(step), **{k: float(v) for k, v in values.items()}}
    line = json.dumps(record) + "\n"
    append_text(os.path.join(self._workdir, METRICS_FILE), line)  # remote: read, extend, write (storage.py)
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
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
