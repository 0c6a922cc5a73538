"""Reading a run's evaluation records back: W/eval/metrics_<step>.json (written by evaluation/evaluate.py)."""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from concept_diffusion.workdir import eval_path, eval_steps, read_text


def eval_history(workdir: str) -> list[dict]:
  """Every W/eval/metrics_<step>.json record, by step."""
  return [json.loads(read_text(eval_path(workdir, "metrics", step))) for step in eval_steps(workdir, "metrics")]


def token_factor_matrix(record: dict[str, Any] | None) -> tuple[np.ndarray | None, str]:
  """(num_tokens, num_factors) how much each token's scalar says about each factor, and its source: DCI's
  importance matrix when the record has one (the boosted trees see all codes at once), else MIG's mutual
  information over the factor's entropy; (None, "") when the record has neither."""
  for key, source in (("dci.importance_matrix", "DCI importance"), ("mig.normalized_mutual_info", "MIG's I/H")):
    if record and key in record:
      return np.asarray(record[key], np.float64), source
  return None, ""
