"""Generation metrics: what the diffusion side draws, read back by the dataset's factor reader.

On `num_images` seeded pairs (source, target) whose factors differ in every factor:
  (a) reconstruction accuracy per factor: reader(reconstruct(source)) == factors(source);
  (b) the swap matrix M[k, f]: the share of swaps of token k (source regenerated with scalar k taken from the
      target) where the reader sees factor f take the target's value. It is the generative counterpart of DCI's
      importance matrix: a disentangled generator has one large entry per column and nothing else in that row;
  (c) the swap score of factor f: take-rate of its best token k* (M[k*, f]) minus that token's leakage, the
      largest M[k*, g] over the other factors g.
A perfect generator scores 1 on all three; a generator that ignores its tokens scores 0 on (b) and (c).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from concept_diffusion.data.base import GroundTruthDataset
from concept_diffusion.errors import UserError
from concept_diffusion.evaluation.factor_reader import FactorReader
from concept_diffusion.evaluation.records import informative_tokens

# reconstruct(source_images) -> images; swap(source_images, target_images, token) -> images. Both regenerate
# from the same noise for the same sources, so a swap differs from the reconstruction only through its token.
ReconstructFn = Callable[[np.ndarray], np.ndarray]
SwapFn = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def headline_scores(record: dict[str, Any]) -> dict[str, float]:
  """The record's scores that sit beside FactorVAE, DCI and MIG in a score table (means over factors)."""
  return {k: float(record[k]) for k in ("generation.reconstruction_accuracy", "generation.swap_score") if k in record}


def tokens_to_swap(matrix: np.ndarray, which: str) -> np.ndarray:
  """The tokens the generation metrics swap, from a (num_tokens, num_factors) information matrix: "informative",
  "per_factor" (the token that carries each factor most, each once) or "all"."""
  if which == "all":
    return np.arange(matrix.shape[0])
  if which == "per_factor":
    return np.unique(np.asarray(matrix).argmax(axis=0))
  if which == "informative":
    return informative_tokens(matrix)
  raise UserError(f"unknown token choice {which!r}; choose 'informative', 'per_factor' or 'all'.")


def swap_pairs(dataset: GroundTruthDataset, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(source factors, target factors), (num, num_factors) each: targets differ from sources in every factor that
  has more than one value (a factor with one value cannot change)."""
  rng = np.random.default_rng(seed)
  sources = dataset.sample_factors(num, rng)
  sizes = np.asarray(dataset.factor_sizes)
  shift = np.stack([rng.integers(1, max(s, 2), size=num) for s in sizes], axis=-1) * (sizes > 1)
  return sources, (sources + shift) % sizes


def swap_scores(matrix: np.ndarray, factor_names: Sequence[str]) -> dict[str, dict[str, float]]:
  """Per factor: the best token (by take-rate), its take-rate, its leakage (largest take-rate of that token on
  another factor) and the swap score take - leakage. `matrix` rows are tokens, columns factors."""
  out = {}
  for f, name in enumerate(factor_names):
    k = int(matrix[:, f].argmax())
    others = np.delete(matrix[k], f)
    leak = float(others.max()) if others.size else 0.0
    out[name] = {"token_row": k, "take": float(matrix[k, f]), "leakage": leak, "score": float(matrix[k, f]) - leak}
  return out


def generation_metrics(reader: FactorReader, dataset: GroundTruthDataset, reconstruct: ReconstructFn,
                       swap: SwapFn, tokens: Sequence[int], *, num_images: int = 1_000, seed: int = 0,
                       batch_size: int = 100, progress: bool = True) -> dict[str, Any]:
  """The three generation metrics on `num_images` pairs, swapping each token in `tokens` (see the module doc).

  Returns a JSON-able record: generation.* headline scores (means over factors) and per-factor tables keyed by
  factor name, the swap matrix (rows in the order of `tokens`), and the reader's held-out accuracy.
  """
  if num_images < 1:
    raise UserError(f"generation metrics need num_images >= 1, got {num_images}.")
  if tuple(reader.factor_sizes) != tuple(dataset.factor_sizes):
    raise UserError(f"the factor reader reads factor sizes {reader.factor_sizes}, but {dataset.name} has "
                     f"{tuple(dataset.factor_sizes)}; train a reader for this dataset.")
  tokens = [int(k) for k in tokens]
  names = list(dataset.factor_names)
  src_factors, tgt_factors = swap_pairs(dataset, num_images, seed)
  recon_hits = np.zeros(len(names))
  takes = np.zeros((len(tokens), len(names)))
  start, done, total = time.time(), 0, num_images * (1 + len(tokens))
  for lo in range(0, num_images, batch_size):
    src_f, tgt_f = src_factors[lo:lo + batch_size], tgt_factors[lo:lo + batch_size]
    sources, targets = dataset.images_from_factors(src_f), dataset.images_from_factors(tgt_f)
    recon_hits += (reader.read(reconstruct(sources)) == src_f).sum(axis=0)
    for row, k in enumerate(tokens):
      takes[row] += (reader.read(swap(sources, targets, k)) == tgt_f).sum(axis=0)
    done += len(src_f) * (1 + len(tokens))
    if progress:
      eta = (time.time() - start) / done * (total - done)
      print(f"generation metrics: {done}/{total} images generated  ETA {eta:.0f} s", file=sys.stderr, flush=True)
  recon = recon_hits / num_images
  matrix = takes / num_images
  per_factor = swap_scores(matrix, names) if tokens else {}
  record: dict[str, Any] = {
      "generation.reconstruction_accuracy": float(recon.mean()),
      "generation.reconstruction_accuracy.per_factor": dict(zip(names, recon.tolist())),
      "generation.swap_tokens": tokens,
      "generation.swap_matrix": matrix.tolist(),
      "generation.num_images": int(num_images),
      "generation.factor_sizes": [int(v) for v in dataset.factor_sizes],
      "generation.seed": int(seed),
      "generation.reader_accuracy": dict(reader.accuracy),
  }
  if tokens:
    record.update({
        "generation.swap_score": float(np.mean([v["score"] for v in per_factor.values()])),
        "generation.swap_score.per_factor": {n: v["score"] for n, v in per_factor.items()},
        "generation.swap_take.per_factor": {n: v["take"] for n, v in per_factor.items()},
        "generation.swap_leakage.per_factor": {n: v["leakage"] for n, v in per_factor.items()},
        "generation.swap_token.per_factor": {n: tokens[v["token_row"]] for n, v in per_factor.items()},
    })
  return record


def describe_generation(record: dict[str, Any]) -> str:
  """The printout: one line per factor (reconstruction accuracy, best swap token, take-rate, leakage)."""
  recon = record.get("generation.reconstruction_accuracy.per_factor", {})
  if not recon:
    return ""
  take = record.get("generation.swap_take.per_factor", {})
  width = max(len(n) for n in recon)
  lines = [f"generation ({record['generation.num_images']} images; reader's held-out accuracy "
           f"{min(record['generation.reader_accuracy'].values()):.3f} or better):"]
  for name, acc in recon.items():
    line = f"{name:<{width}}  reconstructed {acc:.2f}"
    if name in take:
      line += (f"  swap token {record['generation.swap_token.per_factor'][name]:>2} moves it in {take[name]:.0%}, "
               f"leaks {record['generation.swap_leakage.per_factor'][name]:.0%} into another factor")
    lines.append(line)
  return "\n".join(lines)
