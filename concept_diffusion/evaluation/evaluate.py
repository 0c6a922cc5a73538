"""Evaluate a run: encode its dataset with the trained encoder, compute the metrics, write W/eval/."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from concept_diffusion.data.base import GroundTruthDataset
from concept_diffusion.evaluation.encode import encode_dataset
from concept_diffusion.evaluation.metrics import evaluate_codes
from concept_diffusion.evaluation.token_reliance import token_reliance
from concept_diffusion.models.encdiff import EncDiff, EncDiffVariables
from concept_diffusion.evaluation.records import token_factor_matrix
from concept_diffusion.workdir import EVAL_DIR, eval_path, eval_steps, exists, load_npy, read_text, write_json

# encode(dataset, out_path=, progress=) -> the (num_images, d) code table of a dataset in canonical order.
EncodeFn = Callable[..., np.ndarray]


def encoder_of(model: EncDiff, state, batch_size: int) -> EncodeFn:
  """EncDiff's code table: the scalars, with running BatchNorm statistics and the raw (non-EMA) encoder."""
  variables = EncDiffVariables(state.params, state.batch_stats, None, state.scale_factor)  # what crosses into jit
  return lambda dataset, **kwargs: encode_dataset(model.encode, variables, dataset, batch_size, **kwargs)


def evaluate_run(config, encode: EncodeFn, dataset: GroundTruthDataset, workdir: str, step: int, *,
                 metrics: Sequence[str] | None = None, metric_kwargs: dict | None = None,
                 progress: bool = True, save_codes: bool = True,
                 extra_scores: Callable[[], dict[str, float]] | None = None) -> tuple[dict[str, float], dict[str, Any]]:
  """Writes W/eval/metrics_<step>.json (and W/eval/codes_<step>.npy); returns (scores, extras).

  `encode` makes the code table: `encoder_of(model, state, ...)` for EncDiff's scalars; the baselines pass their
  own (the mean of q(z|x)), so every model is scored by the same code. `extra_scores()` adds diagnostics (EncDiff:
  `reliance_scores`).
  """
  codes_path = eval_path(workdir, "codes", step) if save_codes else None
  codes = encode(dataset, out_path=codes_path, progress=progress)
  scores, extras = evaluate_codes(np.asarray(codes), dataset.factor_sizes,
                                  metrics=tuple(metrics or config.eval.metrics), seed=config.eval.seed,
                                  metric_kwargs=metric_kwargs, return_extras=True)
  if extra_scores is not None:
    scores.update(extra_scores())
  write_metrics(eval_path(workdir, "metrics", step), step, dataset, scores, extras)
  return scores, extras


def evaluate_encdiff(config, model: EncDiff, state, dataset: GroundTruthDataset, workdir: str, step: int, *,
                     ae_params: Any = None, **kwargs) -> tuple[dict[str, float], dict[str, Any]]:
  """`evaluate_run` of an EncDiff state, with the token-reliance diagnostic (eval.token_reliance_images; in a
  latent space only when its first stage's `ae_params` are given)."""
  return evaluate_run(config, encoder_of(model, state, config.eval.batch_size), dataset, workdir, step,
                      extra_scores=lambda: reliance_scores(config, model, state, dataset, ae_params), **kwargs)


def evaluation_hook(snapshot) -> dict[str, float]:
  """The trainer's evaluate hook (train/trainer.py Hooks): eval.train_metrics during training, keeping the code
  table (480,000 x 20 floats = 38 MB each) only with eval.save_train_codes; the full eval.metrics with the code
  table when final."""
  s = snapshot
  if s.final:
    return evaluate_encdiff(s.config, s.model, s.state, s.dataset, s.workdir, s.step, ae_params=s.ae_params)[0]
  return evaluate_encdiff(s.config, s.model, s.state, s.dataset, s.workdir, s.step, ae_params=s.ae_params,
                          metrics=s.config.eval.train_metrics, progress=False,
                          save_codes=s.config.eval.get("save_train_codes", False))[0]


def evaluate_saved_codes(config, dataset: GroundTruthDataset, workdir: str, step: int | None = None, *,
                         metrics: Sequence[str] | None = None) -> tuple[int, dict[str, float], dict[str, Any]]:
  """Re-scores the code table an earlier evaluation saved, without a checkpoint or re-encoding the dataset (the
  480,000-image pass is most of an evaluation on a CPU). Returns (step, scores, extras); merges into the step's
  metrics file. No token reliance: that needs the model."""
  steps = eval_steps(workdir, "codes")
  if not steps or (step is not None and step not in steps):
    wanted = os.path.basename(eval_path(workdir, "codes", step)) if step is not None else "code tables"
    raise FileNotFoundError(
        f"no saved {wanted} in {os.path.join(workdir, EVAL_DIR)}; steps with one: {steps or 'none'} (evaluations "
        "save them unless save_codes=False). Evaluate from the checkpoint instead: drop --from_codes.")
  step = steps[-1] if step is None else step
  codes = load_npy(eval_path(workdir, "codes", step))
  scores, extras = evaluate_codes(codes, dataset.factor_sizes, metrics=tuple(metrics or config.eval.metrics),
                                  seed=config.eval.seed, return_extras=True)
  write_metrics(eval_path(workdir, "metrics", step), step, dataset, scores, extras)
  return step, scores, extras


def write_metrics(path: str, step: int, dataset: GroundTruthDataset, scores: dict[str, float],
                  extras: dict[str, Any]) -> dict[str, Any]:
  """Writes (atomically) the step's record, keeping what an earlier evaluation of the step computed and this one
  did not: re-scoring one metric must not erase the others. Per-factor values are keyed by factor name."""
  record = {}
  if exists(path):
    record = json.loads(read_text(path))
  runtime = {**record.get("runtime_s", {}), **extras["runtime_s"]}
  record.update({"step": int(step), "dataset": dataset.name, "factor_names": list(dataset.factor_names), **scores,
                 "runtime_s": runtime})
  for key in ("dci.importance_matrix", "mig.normalized_mutual_info"):
    if key in extras:
      record[key] = np.asarray(extras[key]).tolist()
  for key in ("dci.informativeness_test_per_factor", "mig.per_factor"):
    if extras.get(key) is not None:
      record[key] = {name: float(v) for name, v in zip(dataset.factor_names, np.asarray(extras[key]))}
  write_json(path, record, indent=2)
  return record


def reliance_scores(config, model: EncDiff, state, dataset: GroundTruthDataset,
                    ae_params: Any) -> dict[str, float]:
  """The token-reliance diagnostic on eval.token_reliance_images images drawn with eval.seed ({} when off, or in a
  latent space without the first stage's `ae_params`)."""
  num = config.eval.token_reliance_images
  if num < 2 or (model.first_stage is not None and ae_params is None):
    return {}
  images = dataset.sample(num, np.random.RandomState(config.eval.seed))[1]
  return token_reliance(model, state, images, jax.random.PRNGKey(config.eval.seed), ae_params=ae_params,
                        num_bands=config.eval.token_reliance_bands)


def format_table(scores: dict[str, float]) -> str:
  width = max(len(k) for k in scores)
  return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in sorted(scores.items()))


def describe_factors(record: dict[str, Any]) -> str:
  """One line per factor of an evaluation record (W/eval/metrics_<step>.json): the token that carries it most
  (`token_factor_matrix`), how much of the factor that token's scalar tells (I / H, from MIG's
  estimate), its MIG gap and DCI's test accuracy where those ran. "" when the record has neither matrix."""
  matrix, source = token_factor_matrix(record)
  if matrix is None:
    return ""
  names = record.get("factor_names") or [f"factor {j}" for j in range(matrix.shape[1])]
  mi = record.get("mig.normalized_mutual_info")
  mi = None if mi is None else np.asarray(mi)
  gaps = record.get("mig.per_factor", {})
  accuracy = record.get("dci.informativeness_test_per_factor", {})
  width = max(len(n) for n in names)
  lines = [f"per factor (token = the scalar that carries it most, by {source}):"]
  for j, name in enumerate(names):
    k = int(matrix[:, j].argmax())
    parts = [f"{name:<{width}}  token {k:>2}"]
    if mi is not None:
      parts.append(f"I/H {mi[k, j]:.2f}")
    if name in gaps:
      parts.append(f"MIG gap {gaps[name]:.2f}")
    if name in accuracy:
      parts.append(f"DCI accuracy {accuracy[name]:.2f}")
    lines.append("  ".join(parts))
  return "\n".join(lines)


def describe_step(workdir: str, step: int) -> str:
  """`describe_factors` of the step's evaluation record ("" when there is none)."""
  path = eval_path(workdir, "metrics", step)
  return describe_factors(json.loads(read_text(path))) if exists(path) else ""


def describe_hook(snapshot) -> str:
  """The trainer's describe hook: the final evaluation's per-factor lines."""
  return describe_step(snapshot.workdir, snapshot.step)
