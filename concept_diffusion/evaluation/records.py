"""Reading a run's evaluation records back: W/eval/metrics_<step>.json and generation_<step>.json (written by
evaluation/evaluate.py), for figures as much as for evaluation."""
from __future__ import annotations

import json
from typing import Any, Optional

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


# A token is uninformative when the information its scalar carries about all factors together is below this share
# of the most informative token's (as the figures label tokens).
UNINFORMATIVE_SHARE = 0.05


def informative_tokens(matrix: np.ndarray) -> np.ndarray:
  """Indices of the tokens (rows of a (num_tokens, num_factors) information matrix) that are not uninformative."""
  total = np.asarray(matrix, np.float64).sum(axis=1)
  return np.flatnonzero(total >= UNINFORMATIVE_SHARE * max(total.max(), 1e-12))


def swap_factor_labels(record: Optional[dict[str, Any]], num_tokens: int, min_take: float = 0.2
                       ) -> dict[int, str]:
  """token -> the factor its swaps really change: the largest take-rate in its row of the swap matrix beyond what
  chance gives (at least `min_take` and twice 1 / factor size: a generator that draws a 4-valued factor at random
  shows the target's value in a quarter of the swaps), from a generation record; {} without one."""
  if not record or "generation.swap_matrix" not in record:
    return {}
  matrix, names = np.asarray(record["generation.swap_matrix"]), record.get("factor_names") or []
  if not matrix.size:
    return {}
  sizes = np.asarray(record.get("generation.factor_sizes") or [np.inf] * matrix.shape[1], np.float64)
  beyond_chance = np.where(matrix >= np.maximum(min_take, 2.0 / sizes), matrix, -1.0)
  labels = {}
  for row, k in enumerate(record["generation.swap_tokens"]):
    if k < num_tokens and beyond_chance[row].max() >= 0:
      f = int(beyond_chance[row].argmax())
      labels[k] = f"{names[f] if f < len(names) else f'factor {f}'} {matrix[row, f]:.0%}"
  return labels


def latest_generation_record(workdir: str) -> dict | None:
  """The last W/eval/generation_<step>.json record, or None."""
  steps = eval_steps(workdir, "generation")
  return json.loads(read_text(eval_path(workdir, "generation", steps[-1]))) if steps else None
