"""Evaluate a run: encode its dataset with the trained encoder, compute the metrics, write W/eval/."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from concept_diffusion import generate
from concept_diffusion.data.base import GroundTruthDataset
from concept_diffusion.evaluation.encode import encode_dataset
from concept_diffusion.evaluation.metrics import evaluate_codes
from concept_diffusion.evaluation.token_reliance import token_reliance
from concept_diffusion.train.workdir import computation_config


def _scalars(frozen_config, state, images):
  return generate.encode(frozen_config, state, images)[0]


def encode_run(config, state, dataset: GroundTruthDataset, *, out_path: str | None = None,
               progress: bool = True) -> np.ndarray:
  """The (num_images, num_tokens) scalar table: running BatchNorm statistics, raw (non-EMA) encoder."""
  frozen = computation_config(config)
  encoder_state = state.replace(opt_state=None, ema_unet=None)  # only what the encoder reads crosses into jit
  return encode_dataset(lambda s, images: _scalars(frozen, s, images), encoder_state, dataset,
                        config.eval.batch_size, out_path=out_path, progress=progress)


def evaluate_run(config, state, dataset: GroundTruthDataset, workdir: str, step: int, *,
                 metrics: Sequence[str] | None = None, metric_kwargs: dict | None = None,
                 progress: bool = True, save_codes: bool = True,
                 encode: Callable[..., np.ndarray] | None = None,
                 ae_params: Any = None) -> tuple[dict[str, float], dict[str, Any]]:
  """Writes W/eval/metrics_<step>.json (and W/eval/codes_<step>.npy); returns (scores, extras).

  `encode(config, state, dataset, out_path=, progress=)` makes the code table; default `encode_run` (EncDiff's
  scalars). The baselines pass their own (the mean of q(z|x)), so every model is scored by the same code.
  An EncDiff run's scores also get the token-reliance diagnostic (eval.token_reliance_images; in a latent space
  only when its first stage's `ae_params` are given).
  """
  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  codes_path = os.path.join(eval_dir, f"codes_{step}.npy") if save_codes else None
  codes = (encode or encode_run)(config, state, dataset, out_path=codes_path, progress=progress)
  scores, extras = evaluate_codes(np.asarray(codes), dataset.factor_sizes,
                                  metrics=tuple(metrics or config.eval.metrics), seed=config.eval.seed,
                                  metric_kwargs=metric_kwargs, return_extras=True)
  if encode is None:
    scores.update(reliance_scores(config, state, dataset, ae_params))
  record = {"step": int(step), "dataset": dataset.name, "factor_names": list(dataset.factor_names), **scores,
            "runtime_s": extras["runtime_s"]}
  if "dci.importance_matrix" in extras:
    record["dci.importance_matrix"] = np.asarray(extras["dci.importance_matrix"]).tolist()
  path = os.path.join(eval_dir, f"metrics_{step}.json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  os.replace(path + ".tmp", path)
  return scores, extras


def reliance_scores(config, state, dataset: GroundTruthDataset, ae_params: Any) -> dict[str, float]:
  """The token-reliance diagnostic on eval.token_reliance_images images drawn with eval.seed ({} when off, or in a
  latent space without the first stage's `ae_params`)."""
  num = config.eval.get("token_reliance_images", 0)
  if num < 2 or (config.first_stage.kind != "none" and ae_params is None):
    return {}
  images = dataset.sample(num, np.random.RandomState(config.eval.seed))[1]
  return token_reliance(config, state, images, jax.random.PRNGKey(config.eval.seed), ae_params=ae_params,
                        num_bands=config.eval.get("token_reliance_bands", 5))


def format_table(scores: dict[str, float]) -> str:
  width = max(len(k) for k in scores)
  return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in sorted(scores.items()))
