"""Evaluate a run: encode its dataset with the trained encoder, compute the metrics, write W/eval/."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from concept_diffusion.data.base import GroundTruthDataset
from concept_diffusion.evaluation import generation
from concept_diffusion.evaluation.encode import encode_dataset
from concept_diffusion.evaluation.factor_reader import reader_for
from concept_diffusion.evaluation.metrics import evaluate_codes, normalized_mutual_info
from concept_diffusion.evaluation.token_reliance import token_reliance
from concept_diffusion.models.encdiff import EncDiff, EncDiffVariables
from concept_diffusion.errors import UserError
from concept_diffusion.evaluation.records import token_factor_matrix
from concept_diffusion.workdir import EVAL_DIR, eval_path, eval_steps, exists, load_npy, read_text, write_json

# encode(dataset, out_path=, progress=) -> the (num_images, d) code table of a dataset in canonical order.
EncodeFn = Callable[..., np.ndarray]
# eval.metrics may name it beside the code metrics: the generation metrics (evaluation/generation.py).
GENERATION = "generation"


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
  metrics = tuple(m for m in (metrics or config.eval.metrics) if m != GENERATION)
  scores, extras = evaluate_codes(np.asarray(codes), dataset.factor_sizes, metrics=metrics, seed=config.eval.seed,
                                  metric_kwargs=metric_kwargs, return_extras=True)
  if extra_scores is not None:
    scores.update(extra_scores())
  write_metrics(eval_path(workdir, "metrics", step), step, dataset, scores, extras)
  return scores, extras


def evaluate_encdiff(config, model: EncDiff, state, dataset: GroundTruthDataset, workdir: str, step: int, *,
                     ae_params: Any = None, **kwargs) -> tuple[dict[str, float], dict[str, Any]]:
  """`evaluate_run` of an EncDiff state, with the token-reliance diagnostic (eval.token_reliance_images; in a
  latent space only when its first stage's `ae_params` are given), then the generation metrics when the metrics
  name them."""
  wanted = tuple(kwargs.get("metrics") or config.eval.metrics)
  scores, extras = {}, {"runtime_s": {}}
  if any(m != GENERATION for m in wanted):
    scores, extras = evaluate_run(config, encoder_of(model, state, config.eval.batch_size), dataset, workdir, step,
                                  extra_scores=lambda: reliance_scores(config, model, state, dataset, ae_params),
                                  **kwargs)
  if GENERATION in wanted:
    record = evaluate_generation(config, model, state, ae_params, dataset, workdir, step,
                                 progress=kwargs.get("progress", True))
    scores.update(generation.headline_scores(record))
  return scores, extras


def encdiff_generators(model: EncDiff, variables, ae_params: Any, *, steps: int, eta: float, seed: int,
                       batch_size: int) -> tuple[generation.ReconstructFn, generation.SwapFn]:
  """(reconstruct, swap) for the generation metrics: DDIM with the EMA UNet from one fixed noise per batch
  position, so a swap differs from its reconstruction only through the swapped scalar. Batches are padded to
  `batch_size` (one compilation)."""
  encode, tokens = jax.jit(model.encode), jax.jit(model.tokens)
  key = jax.random.PRNGKey(seed)

  def padded(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.concatenate([x, np.repeat(x[-1:], batch_size - len(x), axis=0)]) if len(x) < batch_size else x

  def scalars_of(images: np.ndarray) -> np.ndarray:
    return np.array(encode(variables, padded(images)))

  def sample(scalars: np.ndarray, n: int) -> np.ndarray:
    out = model.sample_jit(variables, ae_params, tokens(variables, scalars), key, steps=steps, eta=eta)
    return np.asarray(out)[:n]

  def reconstruct(images: np.ndarray) -> np.ndarray:
    return sample(scalars_of(images), len(images))

  def swap(sources: np.ndarray, targets: np.ndarray, token: int) -> np.ndarray:
    scalars = scalars_of(sources)
    scalars[:, token] = scalars_of(targets)[:, token]
    return sample(scalars, len(sources))

  return reconstruct, swap


def token_information(model: EncDiff, variables, dataset: GroundTruthDataset, workdir: str, step: int,
                      num_images: int = 10_000, seed: int = 0) -> tuple[np.ndarray, str]:
  """(num_tokens, num_factors) how much each scalar tells about each factor: the step's evaluation record
  (`token_factor_matrix`) when it has one, else MIG's I/H on `num_images` freshly encoded images."""
  path = eval_path(workdir, "metrics", step)
  matrix, source = token_factor_matrix(json.loads(read_text(path)) if exists(path) else None)
  if matrix is not None:
    return matrix, source
  factors, codes = dataset.sample_factors(num_images, np.random.default_rng(seed)), []
  encode = jax.jit(model.encode)
  for lo in range(0, num_images, 500):
    codes.append(np.asarray(encode(variables, dataset.images_from_factors(factors[lo:lo + 500]))))
  return normalized_mutual_info(np.concatenate(codes), factors), f"MIG's I/H on {num_images} images"


def evaluate_generation(config, model: EncDiff, variables, ae_params: Any, dataset: GroundTruthDataset,
                        workdir: str, step: int, *, num_images: int | None = None, steps: int | None = None,
                        eta: float | None = None, tokens: Sequence[int] | None = None, progress: bool = True,
                        write: bool = True) -> dict[str, Any]:
  """The generation metrics of an EncDiff state (eval.generation_* and config.sample's DDIM settings unless
  given), swapping eval.generation_tokens (or `tokens`). Writes W/eval/generation_<step>.json, merges the headline
  scores into W/eval/metrics_<step>.json (unless `write` is False); figures draw W/figures/swap_matrix.png from it."""
  ev = config.eval
  if model.first_stage is not None and ae_params is None:
    raise UserError("generation metrics in a latent space need the first stage's parameters (ae_params).")
  reader = reader_for(dataset, config.data, ev.generation_reader_dir, steps=ev.generation_reader_steps,
                      seed=ev.seed, progress=progress)
  if tokens is None:
    info, _ = token_information(model, variables, dataset, workdir, step, seed=ev.seed)
    tokens = generation.tokens_to_swap(info, ev.generation_tokens)
  steps = steps or ev.generation_ddim_steps or config.sample.ddim_steps
  eta = config.sample.eta if eta is None else eta
  num_images = num_images or ev.generation_images
  batch = min(num_images, ev.generation_batch_size)
  reconstruct, swap = encdiff_generators(model, variables, ae_params, steps=steps, eta=eta, seed=ev.seed,
                                         batch_size=batch)
  record = generation.generation_metrics(reader, dataset, reconstruct, swap, tokens, num_images=num_images,
                                         seed=ev.seed, batch_size=batch, progress=progress)
  record.update({"step": int(step), "dataset": dataset.name, "factor_names": list(dataset.factor_names),
                 "generation.ddim_steps": int(steps), "generation.eta": float(eta),
                 "generation.clip_x0": bool(model.clip_x0), "generation.timestep_spacing": model.timestep_spacing})
  if write:
    write_json(eval_path(workdir, "generation", step), record, indent=2)
    metrics_path = eval_path(workdir, "metrics", step)
    merged = json.loads(read_text(metrics_path)) if exists(metrics_path) else {
        "step": int(step), "dataset": dataset.name, "factor_names": list(dataset.factor_names)}
    merged.update({k: v for k, v in record.items() if k.startswith("generation.")})
    write_json(metrics_path, merged, indent=2)
  return record


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
  """`describe_factors` of the step's evaluation record, then its generation lines ("" when there is neither)."""
  parts = []
  for kind, describe in (("metrics", describe_factors), ("generation", generation.describe_generation)):
    path = eval_path(workdir, kind, step)
    if exists(path):
      parts.append(describe(json.loads(read_text(path))))
  return "\n".join(p for p in parts if p)


def describe_hook(snapshot) -> str:
  """The trainer's describe hook: the final evaluation's per-factor lines."""
  return describe_step(snapshot.workdir, snapshot.step)
