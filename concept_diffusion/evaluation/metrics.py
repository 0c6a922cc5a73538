"""Disentanglement metrics, reimplemented to match google-research/disentanglement_lib (commit 86a644d4).

Why a reimplementation: disentanglement_lib needs TensorFlow 1 and gin, but EncDiff's numbers come from it. Every
metric here reproduces the original algorithm *and* its random stream, so a code table evaluated here gives the
numbers disentanglement_lib (and EncDiff's `main_val.eval_func`) would give for the same table and seed.

The "dataset" is a code table, as in EncDiff: `codes[i]` is the representation of the dataset image whose factor
indices are `np.unravel_index(i, factor_sizes)` (row-major, canonical order). Sampling an observation returns its
row index and the representation function is the table lookup, so the RandomState is consumed exactly as in
disentanglement_lib: `sample_factors(num)` draws `randint(size_j, size=num)` for each factor j in order, and
`sample_observations_from_factors` draws nothing (all factors are latent).

Kept quirks of the original (on purpose, they change numbers):
  * FactorVAE: `argmin` indexes the *active* dims but is used as a column of the full-width vote matrix, and
    `num_active_dims` reports `len(mask)`, i.e. all dims.
  * DCI/MIG/SAP/modularity sample factors in batches of 16, FactorVAE/beta-VAE in mini-batches of 64.
  * DCI's `GradientBoostingClassifier()` gets no `random_state`, so its trees draw from numpy's *global*
    RandomState (only feature-order tie-breaking depends on it). See `compute_dci` for how parallel fits reproduce
    the sequential draws exactly.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import joblib
import numpy as np
import scipy.stats
from sklearn import decomposition, ensemble, linear_model, preprocessing, svm
from sklearn import metrics as sk_metrics

from concept_diffusion.errors import UserError

# EncDiff's `main_val.eval_func` computes these four (beta-VAE, DCI, MIG, FactorVAE).
DEFAULT_METRICS = ("beta_vae", "dci", "mig", "factor_vae")
ALL_METRICS = DEFAULT_METRICS + ("sap", "modularity")
# Metrics whose classifiers / normalisers need every factor to take >= 2 values.
_NEEDS_VARYING_FACTORS = frozenset({"dci", "mig", "sap", "modularity"})
# Metrics that compare the best and second-best code dimension.
_NEEDS_TWO_DIMS = frozenset({"mig", "sap"})
# sklearn's tree splitters seed their internal rand_r state with `random_state.randint(0, RAND_R_MAX)`.
_RAND_R_MAX = 0x7FFFFFFF

RandomStateLike = int | np.random.RandomState


class DCIResult(NamedTuple):
  """DCI scores plus the (num_codes, num_factors) importance matrix behind them (for figures) and each factor's
  test accuracy (informativeness_test is their mean)."""
  importance_matrix: np.ndarray
  scores: dict[str, float]
  per_factor_test_accuracy: np.ndarray | None = None


# ----------------------------------------------------------------------------------------------------------------
# Input checks and the code-table "dataset".
# ----------------------------------------------------------------------------------------------------------------


def _check_factor_sizes(factor_sizes: Sequence[int]) -> tuple[int, ...]:
  sizes = tuple(factor_sizes)
  if not sizes:
    raise UserError("factor_sizes is empty; pass one size per ground-truth factor, e.g. (10, 10, 10, 8, 4, 15).")
  for j, size in enumerate(sizes):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
      raise UserError(f"factor_sizes[{j}] = {size!r} is not a positive integer.")
  return tuple(int(s) for s in sizes)


def _check_codes(codes: Any, factor_sizes: tuple[int, ...], *, pca_tokens: bool) -> np.ndarray:
  """Validates shape and values; returns a float array of shape (prod(factor_sizes), ...)."""
  codes = np.asarray(codes)
  if codes.dtype.kind not in "biuf":
    raise UserError(f"codes must be a real numeric array, got dtype {codes.dtype}.")
  if codes.ndim == 3 and not pca_tokens:
    raise UserError(f"codes has shape {codes.shape}: vector-valued tokens (num_images, num_tokens, dim) must be "
                     "reduced first; pass pca_tokens=True (1-component PCA per token, as EncDiff does).")
  if codes.ndim == 2 and pca_tokens:
    raise UserError(f"pca_tokens=True expects 3-D codes (num_images, num_tokens, dim), got shape {codes.shape}.")
  if codes.ndim not in (2, 3):
    raise UserError(f"codes must be 2-D (num_images, num_codes) or, with pca_tokens=True, 3-D (num_images, "
                     f"num_tokens, dim); got {codes.ndim}-D shape {codes.shape}.")
  num_rows = int(np.prod(factor_sizes))
  if codes.shape[0] != num_rows:
    raise UserError(f"codes has {codes.shape[0]} rows but prod(factor_sizes={factor_sizes}) = {num_rows}; the "
                     "table must hold one code per dataset image, in canonical row-major factor order.")
  if codes.shape[1] < 1 or (codes.ndim == 3 and codes.shape[2] < 1):
    raise UserError(f"codes has an empty code axis: shape {codes.shape}.")
  if not np.all(np.isfinite(codes)):
    bad = np.unique(np.nonzero(~np.isfinite(codes))[0])
    raise UserError(f"codes contains NaN/Inf in {bad.size} row(s) (first: {bad[:5].tolist()}); metrics are "
                     "undefined on non-finite codes. Fix the encoder output (or its dtype overflow) first.")
  # Integer codes would make np.var and the histogram discretiser behave differently from float representations.
  return codes if codes.dtype.kind == "f" else codes.astype(np.float64)


def _check_metric_needs(metric: str, factor_sizes: tuple[int, ...], num_codes: int) -> None:
  """Fails early with a fix, where disentanglement_lib would crash deep inside sklearn or return NaN."""
  if metric in _NEEDS_VARYING_FACTORS:
    for j, size in enumerate(factor_sizes):
      if size < 2:
        raise UserError(f"factor {j} has size 1 (factor_sizes={factor_sizes}); metric {metric!r} needs >= 2 "
                         "values per factor (a constant factor has zero entropy / one class). Drop that factor "
                         "from factor_sizes: a size-1 factor does not change the row-major index, so the code "
                         "table stays valid.")
  if metric in _NEEDS_TWO_DIMS and num_codes < 2:
    raise UserError(f"metric {metric!r} compares the best and second-best code dimension, so it needs >= 2 "
                     f"code dimensions; got {num_codes}.")


def reduce_tokens_pca(codes: np.ndarray) -> np.ndarray:
  """(N, T, D) token vectors -> (N, T) with one 1-component sklearn PCA per token, fit on the whole table.

  This is what EncDiff's `eval_func` does for vector-valued representations (EncDiff-V).
  """
  return np.concatenate(
      [decomposition.PCA(n_components=1).fit_transform(codes[:, t, :]) for t in range(codes.shape[1])], axis=1)


class CodeTable:
  """A ground-truth "dataset" whose observations are rows of a code table.

  It plays the role of disentanglement_lib's `GroundTruthData` with a `SplitDiscreteStateSpace` in which all
  factors are latent, so it draws from the RandomState in the same order.
  """

  def __init__(self, codes: Any, factor_sizes: Sequence[int]):
    self.factor_sizes = _check_factor_sizes(factor_sizes)
    self.codes = _check_codes(codes, self.factor_sizes, pca_tokens=False)

  @property
  def num_factors(self) -> int:
    return len(self.factor_sizes)

  @property
  def num_codes(self) -> int:
    return self.codes.shape[1]

  def sample_factors(self, num: int, random_state: np.random.RandomState) -> np.ndarray:
    """(num, num_factors) int64 factor indices; one `randint` call per factor, in factor order."""
    factors = np.zeros((num, self.num_factors), dtype=np.int64)
    for j, size in enumerate(self.factor_sizes):
      factors[:, j] = random_state.randint(size, size=num)
    return factors

  def represent(self, factors: np.ndarray) -> np.ndarray:
    """Codes of the images with these factors (no randomness, as in the original datasets)."""
    return self.codes[np.ravel_multi_index(tuple(factors.T), self.factor_sizes)]

  def sample(self, num: int, random_state: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    factors = self.sample_factors(num, random_state)
    return factors, self.represent(factors)


def _as_random_state(random_state: RandomStateLike) -> np.random.RandomState:
  if isinstance(random_state, np.random.RandomState):
    return random_state
  return np.random.RandomState(random_state)


def generate_batch_factor_code(table: CodeTable, num_points: int, random_state: np.random.RandomState,
                               batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Codes (num_codes, num_points) and factors (num_factors, num_points), sampled in batches as the original.

  The batch size matters: each batch draws `randint` once per factor, so batches of 16 and 64 give different
  streams.
  """
  factors, codes = [], []
  for start in range(0, num_points, batch_size):
    batch_factors, batch_codes = table.sample(min(batch_size, num_points - start), random_state)
    factors.append(batch_factors)
    codes.append(batch_codes)
  return np.concatenate(codes).T, np.concatenate(factors).T


def _histogram_discretize(target: np.ndarray, num_bins: int = 20) -> np.ndarray:
  """Per code: 20 equal-width bins over its range; `zeros_like` keeps the float dtype, as in the original."""
  discretized = np.zeros_like(target)
  for i in range(target.shape[0]):
    discretized[i, :] = np.digitize(target[i, :], np.histogram(target[i, :], num_bins)[1][:-1])
  return discretized


def _discrete_mutual_info(mus: np.ndarray, ys: np.ndarray) -> np.ndarray:
  """(num_codes, num_factors) mutual information in nats; argument order as in the original."""
  return np.array([[sk_metrics.mutual_info_score(ys[j, :], mus[i, :]) for j in range(ys.shape[0])]
                   for i in range(mus.shape[0])]).reshape(mus.shape[0], ys.shape[0])


def _discrete_entropy(ys: np.ndarray) -> np.ndarray:
  return np.array([sk_metrics.mutual_info_score(ys[j, :], ys[j, :]) for j in range(ys.shape[0])])


# ----------------------------------------------------------------------------------------------------------------
# FactorVAE score (disentanglement_lib/evaluation/metrics/factor_vae.py).
# ----------------------------------------------------------------------------------------------------------------


def _factor_vae_votes(table: CodeTable, random_state: np.random.RandomState, batch_size: int, num_points: int,
                      global_variances: np.ndarray, active_dims: np.ndarray) -> np.ndarray:
  votes = np.zeros((table.num_factors, global_variances.shape[0]), dtype=np.int64)
  for _ in range(num_points):
    factor_index = random_state.randint(table.num_factors)
    factors = table.sample_factors(batch_size, random_state)
    factors[:, factor_index] = factors[0, factor_index]
    local_variances = np.var(table.represent(factors), axis=0, ddof=1)
    # Quirk kept: an index into the active dims, used as a column of the full-width vote matrix.
    argmin = np.argmin(local_variances[active_dims] / global_variances[active_dims])
    votes[factor_index, argmin] += 1
  return votes


def _factor_vae(table: CodeTable, random_state: np.random.RandomState, *, batch_size: int, num_train: int,
                num_eval: int, num_variance_estimate: int, prune_threshold: float) -> dict[str, float]:
  global_variances = np.var(table.sample(num_variance_estimate, random_state)[1], axis=0, ddof=1)
  active_dims = np.sqrt(global_variances) >= prune_threshold
  if not active_dims.any():
    return {"train_accuracy": 0., "eval_accuracy": 0., "num_active_dims": 0}
  train_votes = _factor_vae_votes(table, random_state, batch_size, num_train, global_variances, active_dims)
  classifier = np.argmax(train_votes, axis=0)
  columns = np.arange(train_votes.shape[1])
  train_accuracy = np.sum(train_votes[classifier, columns]) * 1. / np.sum(train_votes)
  eval_votes = _factor_vae_votes(table, random_state, batch_size, num_eval, global_variances, active_dims)
  eval_accuracy = np.sum(eval_votes[classifier, columns]) * 1. / np.sum(eval_votes)
  # Quirk kept: len(mask) is the number of *all* dims.
  return {"train_accuracy": train_accuracy, "eval_accuracy": eval_accuracy, "num_active_dims": len(active_dims)}


def compute_factor_vae(codes: np.ndarray, factor_sizes: Sequence[int], random_state: RandomStateLike = 0, *,
                       batch_size: int = 64, num_train: int = 10000, num_eval: int = 5000,
                       num_variance_estimate: int = 10000, prune_threshold: float = 0.05) -> dict[str, float]:
  """FactorVAE score (Kim & Mnih 2018): majority vote on the argmin normalised variance.

  Defaults are disentanglement_lib's `factor_vae_metric.gin` (prune threshold 0.05 on the std, not 0).
  """
  table = CodeTable(codes, factor_sizes)
  return _floats(_factor_vae(table, _as_random_state(random_state), batch_size=batch_size, num_train=num_train,
                             num_eval=num_eval, num_variance_estimate=num_variance_estimate,
                             prune_threshold=prune_threshold))


# ----------------------------------------------------------------------------------------------------------------
# beta-VAE score, sklearn variant (beta_vae.py).
# ----------------------------------------------------------------------------------------------------------------


def _beta_vae_batch(table: CodeTable, random_state: np.random.RandomState, batch_size: int,
                    num_points: int) -> tuple[np.ndarray, np.ndarray]:
  points = np.zeros((num_points, table.num_codes))
  labels = np.zeros(num_points, dtype=np.int64)
  for i in range(num_points):
    index = random_state.randint(table.num_factors)
    factors1 = table.sample_factors(batch_size, random_state)
    factors2 = table.sample_factors(batch_size, random_state)
    factors2[:, index] = factors1[:, index]
    labels[i] = index
    points[i, :] = np.mean(np.abs(table.represent(factors1) - table.represent(factors2)), axis=0)
  return points, labels


def _beta_vae(table: CodeTable, random_state: np.random.RandomState, *, batch_size: int, num_train: int,
              num_eval: int) -> dict[str, float]:
  train_points, train_labels = _beta_vae_batch(table, random_state, batch_size, num_train)
  # The original hands the metric's RandomState to the classifier; with the lbfgs solver it is never drawn from.
  model = linear_model.LogisticRegression(random_state=random_state)
  model.fit(train_points, train_labels)
  train_accuracy = np.mean(model.predict(train_points) == train_labels)
  eval_points, eval_labels = _beta_vae_batch(table, random_state, batch_size, num_eval)
  eval_accuracy = model.score(eval_points, eval_labels)
  return {"train_accuracy": train_accuracy, "eval_accuracy": eval_accuracy}


def compute_beta_vae(codes: np.ndarray, factor_sizes: Sequence[int], random_state: RandomStateLike = 0, *,
                     batch_size: int = 64, num_train: int = 10000, num_eval: int = 5000) -> dict[str, float]:
  """beta-VAE score (Higgins et al. 2017) with sklearn's LogisticRegression (`beta_vae_sklearn.gin` defaults)."""
  table = CodeTable(codes, factor_sizes)
  return _floats(_beta_vae(table, _as_random_state(random_state), batch_size=batch_size, num_train=num_train,
                           num_eval=num_eval))


# ----------------------------------------------------------------------------------------------------------------
# DCI (dci.py), with per-factor gradient-boosted trees fitted in parallel but reproducing the sequential RNG.
# ----------------------------------------------------------------------------------------------------------------


def _same_state(a: tuple, b: tuple) -> bool:
  return a[0] == b[0] and np.array_equal(a[1], b[1]) and tuple(a[2:]) == tuple(b[2:])


def _state_copy(state: tuple) -> np.random.RandomState:
  rng = np.random.RandomState()
  rng.set_state(state)
  return rng


def _fit_gbt(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
             tree_rng: np.random.RandomState) -> tuple[np.ndarray, float, float, tuple]:
  """One factor's `GradientBoostingClassifier()`; returns importances, accuracies and the RNG state after."""
  # Passing the RandomState object is what `random_state=None` does internally (check_random_state(None) returns
  # numpy's global RandomState instance), so the trees draw exactly the same numbers.
  model = ensemble.GradientBoostingClassifier(random_state=tree_rng)
  model.fit(x_train, y_train)
  return (np.abs(model.feature_importances_), np.mean(model.predict(x_train) == y_train),
          np.mean(model.predict(x_test) == y_test), tree_rng.get_state())


def _predicted_tree_states(ys_train: np.ndarray, start_state: tuple) -> list[tuple]:
  """RNG state at the start of each factor's fit (and after the last), as the sequential loop would see them.

  Each regression tree of a GradientBoostingClassifier draws `randint(0, RAND_R_MAX)` once (its splitter seed);
  with the defaults (subsample=1.0, no early stopping) a fit builds n_estimators trees per boosting stage and
  class (one per stage for two classes). Replaying those draws is microseconds; `_importance_gbt` checks the
  prediction against the states the workers actually end in.
  """
  n_estimators = ensemble.GradientBoostingClassifier().n_estimators
  replay = _state_copy(start_state)
  states = [replay.get_state()]
  for y in ys_train:
    num_classes = np.unique(y).size
    for _ in range(n_estimators * (1 if num_classes <= 2 else num_classes)):
      replay.randint(0, _RAND_R_MAX)
    states.append(replay.get_state())
  return states


def _importance_gbt(mus_train: np.ndarray, ys_train: np.ndarray, mus_test: np.ndarray, ys_test: np.ndarray,
                    tree_rng: np.random.RandomState, n_jobs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(importance matrix, per-factor train accuracy, per-factor test accuracy)."""
  num_factors = ys_train.shape[0]
  n_jobs = min(joblib.effective_n_jobs(n_jobs), num_factors)
  args = [(mus_train.T, ys_train[j, :], mus_test.T, ys_test[j, :]) for j in range(num_factors)]
  fits = None
  if n_jobs > 1:
    states = _predicted_tree_states(ys_train, tree_rng.get_state())
    fits = joblib.Parallel(n_jobs=n_jobs)(
        joblib.delayed(_fit_gbt)(*args[j], _state_copy(states[j])) for j in range(num_factors))
    if all(_same_state(fit[3], states[j + 1]) for j, fit in enumerate(fits)):
      tree_rng.set_state(states[-1])  # Leave the RNG where the sequential loop would have left it.
    else:  # An sklearn whose trees draw differently: redo it sequentially rather than report other numbers.
      warnings.warn("DCI: sklearn's trees consumed the RNG differently than predicted; refitting sequentially.")
      fits = None
  if fits is None:
    fits = [_fit_gbt(*args[j], tree_rng) for j in range(num_factors)]
  importance_matrix = np.stack([fit[0] for fit in fits], axis=1).astype(np.float64)
  return importance_matrix, np.array([fit[1] for fit in fits]), np.array([fit[2] for fit in fits])


def _disentanglement(importance_matrix: np.ndarray) -> float:
  per_code = 1. - scipy.stats.entropy(importance_matrix.T + 1e-11, base=importance_matrix.shape[1])
  if importance_matrix.sum() == 0.:
    importance_matrix = np.ones_like(importance_matrix)
  code_importance = importance_matrix.sum(axis=1) / importance_matrix.sum()
  return np.sum(per_code * code_importance)


def _completeness(importance_matrix: np.ndarray) -> float:
  per_factor = 1. - scipy.stats.entropy(importance_matrix + 1e-11, base=importance_matrix.shape[0])
  if importance_matrix.sum() == 0.:
    importance_matrix = np.ones_like(importance_matrix)
  factor_importance = importance_matrix.sum(axis=0) / importance_matrix.sum()
  return np.sum(per_factor * factor_importance)


def _dci(table: CodeTable, random_state: np.random.RandomState, *, num_train: int, num_test: int, batch_size: int,
         n_jobs: int, tree_random_state: RandomStateLike | None) -> DCIResult:
  mus_train, ys_train = generate_batch_factor_code(table, num_train, random_state, batch_size)
  mus_test, ys_test = generate_batch_factor_code(table, num_test, random_state, batch_size)
  tree_rng = np.random.mtrand._rand if tree_random_state is None else _as_random_state(tree_random_state)
  importance_matrix, train_acc, test_acc = _importance_gbt(mus_train, ys_train, mus_test, ys_test, tree_rng, n_jobs)
  scores = {"informativeness_train": np.mean(train_acc), "informativeness_test": np.mean(test_acc),
            "disentanglement": _disentanglement(importance_matrix),
            "completeness": _completeness(importance_matrix)}
  return DCIResult(importance_matrix, _floats(scores), test_acc)


def compute_dci(codes: np.ndarray, factor_sizes: Sequence[int], random_state: RandomStateLike = 0, *,
                num_train: int = 10000, num_test: int = 5000, batch_size: int = 16, n_jobs: int = -1,
                tree_random_state: RandomStateLike | None = None) -> dict[str, float]:
  """DCI (Eastwood & Williams 2018) with one default `GradientBoostingClassifier()` per factor (`dci.gin`).

  Informativeness is mean *accuracy* (as in disentanglement_lib), not an error.

  The trees draw from numpy's global RandomState, as in the original (`tree_random_state=None`; pass an int or
  RandomState to use that stream instead). The fits are spread over `n_jobs` processes (capped at the number of
  factors) without changing any number: each factor's fit gets a copy of the RNG in the exact state the sequential
  loop would hand it (see `_predicted_tree_states`), and the RNG is left where the loop would leave it. Only
  feature-order tie-breaking in the trees depends on this RNG at all.
  """
  return dci_importance_matrix(codes, factor_sizes, random_state, num_train=num_train, num_test=num_test,
                               batch_size=batch_size, n_jobs=n_jobs, tree_random_state=tree_random_state).scores


def dci_importance_matrix(codes: np.ndarray, factor_sizes: Sequence[int], random_state: RandomStateLike = 0, *,
                          num_train: int = 10000, num_test: int = 5000, batch_size: int = 16, n_jobs: int = -1,
                          tree_random_state: RandomStateLike | None = None) -> DCIResult:
  """Like `compute_dci`, but also returns the (num_codes, num_factors) |feature_importances_| matrix."""
  table = CodeTable(codes, factor_sizes)
  _check_metric_needs("dci", table.factor_sizes, table.num_codes)
  return _dci(table, _as_random_state(random_state), num_train=num_train, num_test=num_test, batch_size=batch_size,
              n_jobs=n_jobs, tree_random_state=tree_random_state)


# ----------------------------------------------------------------------------------------------------------------
# MIG (mig.py).
# ----------------------------------------------------------------------------------------------------------------


def _mig_gaps(table: CodeTable, random_state: np.random.RandomState, *, num_train: int, batch_size: int,
              num_bins: int) -> tuple[np.ndarray, np.ndarray]:
  """Each factor's gap between its two most informative codes, over H(factor) (MIG is their mean), and the
  (num_codes, num_factors) mutual information over H(factor) it comes from."""
  mus_train, ys_train = generate_batch_factor_code(table, num_train, random_state, batch_size)
  m = _discrete_mutual_info(_histogram_discretize(mus_train, num_bins), ys_train)
  entropy = _discrete_entropy(ys_train)
  sorted_m = np.sort(m, axis=0)[::-1]
  return np.divide(sorted_m[0, :] - sorted_m[1, :], entropy[:]), np.divide(m, entropy[None, :])


def normalized_mutual_info(codes: np.ndarray, factors: np.ndarray, num_bins: int = 20) -> np.ndarray:
  """(num_codes, num_factors) I(code; factor) / H(factor) with MIG's 20-bin discretiser, from paired samples
  codes (n, num_codes) and factors (n, num_factors)."""
  m = _discrete_mutual_info(_histogram_discretize(np.asarray(codes, np.float64).T, num_bins), np.asarray(factors).T)
  return m / np.maximum(_discrete_entropy(np.asarray(factors).T), 1e-12)[None, :]


def _mig_with_extras(table: CodeTable, random_state: np.random.RandomState,
                     **kwargs) -> tuple[dict[str, float], dict[str, Any]]:
  gaps, normalized_mi = _mig_gaps(table, random_state, **kwargs)
  return {"discrete_mig": np.mean(gaps)}, {"mig.per_factor": gaps, "mig.normalized_mutual_info": normalized_mi}


def compute_mig(codes: np.ndarray, factor_sizes: Sequence[int], random_state: RandomStateLike = 0, *,
                num_train: int = 10000, batch_size: int = 16, num_bins: int = 20) -> dict[str, float]:
  """Mutual Information Gap (Chen et al. 2018), 20-bin histogram discretiser, normalised by H(factor) in nats."""
  table = CodeTable(codes, factor_sizes)
  _check_metric_needs("mig", table.factor_sizes, table.num_codes)
  scores, _ = _mig_with_extras(table, _as_random_state(random_state), num_train=num_train, batch_size=batch_size,
                               num_bins=num_bins)
  return _floats(scores)


# ----------------------------------------------------------------------------------------------------------------
# SAP (sap_score.py).
# ----------------------------------------------------------------------------------------------------------------


def _sap_score_matrix(mus: np.ndarray, ys: np.ndarray, mus_test: np.ndarray, ys_test: np.ndarray,
                      continuous_factors: bool) -> np.ndarray:
  score_matrix = np.zeros([mus.shape[0], ys.shape[0]])
  for i in range(mus.shape[0]):
    for j in range(ys.shape[0]):
      if continuous_factors:
        cov = np.cov(mus[i, :], ys[j, :], ddof=1)
        score_matrix[i, j] = cov[0, 1] ** 2 * 1. / (cov[0, 0] * cov[1, 1]) if cov[0, 0] > 1e-12 else 0.
      else:
        # No random_state, as in the original: liblinear's seed comes from numpy's global RandomState.
        classifier = svm.LinearSVC(C=0.01, class_weight="balanced")
        classifier.fit(mus[i, :, np.newaxis], ys[j, :])
        score_matrix[i, j] = np.mean(classifier.predict(mus_test[i, :, np.newaxis]) == ys_test[j, :])
  return score_matrix


def _sap(table: CodeTable, random_state: np.random.RandomState, *, num_train: int, num_test: int, batch_size: int,
         continuous_factors: bool) -> dict[str, float]:
  mus, ys = generate_batch_factor_code(table, num_train, random_state, batch_size)
  mus_test, ys_test = generate_batch_factor_code(table, num_test, random_state, batch_size)
  sorted_matrix = np.sort(_sap_score_matrix(mus, ys, mus_test, ys_test, continuous_factors), axis=0)
  return {"SAP_score": np.mean(sorted_matrix[-1, :] - sorted_matrix[-2, :])}


def compute_sap(codes: np.ndarray, factor_sizes: Sequence[int], random_state: RandomStateLike = 0, *,
                num_train: int = 10000, num_test: int = 5000, batch_size: int = 16,
                continuous_factors: bool = False) -> dict[str, float]:
  """SAP score (Kumar et al. 2018): `LinearSVC(C=0.01, class_weight="balanced")` per (code, factor) pair."""
  table = CodeTable(codes, factor_sizes)
  _check_metric_needs("sap", table.factor_sizes, table.num_codes)
  return _floats(_sap(table, _as_random_state(random_state), num_train=num_train, num_test=num_test,
                      batch_size=batch_size, continuous_factors=continuous_factors))


# ----------------------------------------------------------------------------------------------------------------
# Modularity and explicitness (modularity_explicitness.py).
# ----------------------------------------------------------------------------------------------------------------


def _modularity(mutual_information: np.ndarray) -> float:
  squared_mi = np.square(mutual_information)
  max_squared_mi = np.max(squared_mi, axis=1)
  numerator = np.sum(squared_mi, axis=1) - max_squared_mi
  denominator = max_squared_mi * (squared_mi.shape[1] - 1.)
  with np.errstate(divide="ignore", invalid="ignore"):  # codes with zero MI are set to 0 just below
    modularity_score = 1. - numerator / denominator
  modularity_score[max_squared_mi == 0.] = 0.
  return np.mean(modularity_score)


def _explicitness_per_factor(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                             y_test: np.ndarray) -> tuple[float, float]:
  clf = linear_model.LogisticRegression().fit(x_train, y_train)
  mlb = preprocessing.MultiLabelBinarizer()
  roc_train = sk_metrics.roc_auc_score(mlb.fit_transform(np.expand_dims(y_train, 1)), clf.predict_proba(x_train))
  roc_test = sk_metrics.roc_auc_score(mlb.fit_transform(np.expand_dims(y_test, 1)), clf.predict_proba(x_test))
  return roc_train, roc_test


def _modularity_explicitness(table: CodeTable, random_state: np.random.RandomState, *, num_train: int,
                             num_test: int, batch_size: int, num_bins: int) -> dict[str, float]:
  mus_train, ys_train = generate_batch_factor_code(table, num_train, random_state, batch_size)
  mus_test, ys_test = generate_batch_factor_code(table, num_test, random_state, batch_size)
  scores = {"modularity_score": _modularity(
      _discrete_mutual_info(_histogram_discretize(mus_train, num_bins), ys_train))}
  mean, stddev = np.mean(mus_train, axis=1), np.std(mus_train, axis=1)
  if np.any(stddev == 0):
    raise UserError(f"code dims {np.nonzero(stddev == 0)[0].tolist()} are constant on the sampled points; "
                     "explicitness z-scores every dim (disentanglement_lib would feed NaN to LogisticRegression). "
                     "Drop constant dims or leave 'modularity' out of the metrics.")
  x_train = ((mus_train - mean[:, np.newaxis]) / stddev[:, np.newaxis]).T
  x_test = ((mus_test - mean[:, np.newaxis]) / stddev[:, np.newaxis]).T
  per_factor = [_explicitness_per_factor(x_train, ys_train[j, :], x_test, ys_test[j, :])
                for j in range(ys_train.shape[0])]
  scores["explicitness_score_train"] = np.mean([train for train, _ in per_factor])
  scores["explicitness_score_test"] = np.mean([test for _, test in per_factor])
  return scores


def compute_modularity_explicitness(codes: np.ndarray, factor_sizes: Sequence[int],
                                    random_state: RandomStateLike = 0, *, num_train: int = 10000,
                                    num_test: int = 5000, batch_size: int = 16,
                                    num_bins: int = 20) -> dict[str, float]:
  """Modularity and explicitness (Ridgeway & Mozer 2018), `modularity_explicitness.gin` defaults."""
  table = CodeTable(codes, factor_sizes)
  _check_metric_needs("modularity", table.factor_sizes, table.num_codes)
  return _floats(_modularity_explicitness(table, _as_random_state(random_state), num_train=num_train,
                                          num_test=num_test, batch_size=batch_size, num_bins=num_bins))


# ----------------------------------------------------------------------------------------------------------------
# All metrics on one code table.
# ----------------------------------------------------------------------------------------------------------------

_DEFAULT_KWARGS: dict[str, dict[str, Any]] = {
    "factor_vae": dict(batch_size=64, num_train=10000, num_eval=5000, num_variance_estimate=10000,
                       prune_threshold=0.05),
    "beta_vae": dict(batch_size=64, num_train=10000, num_eval=5000),
    "dci": dict(num_train=10000, num_test=5000, batch_size=16, tree_random_state=None),
    "mig": dict(num_train=10000, batch_size=16, num_bins=20),
    "sap": dict(num_train=10000, num_test=5000, batch_size=16, continuous_factors=False),
    "modularity": dict(num_train=10000, num_test=5000, batch_size=16, num_bins=20),
}


def _dci_with_extras(table: CodeTable, random_state: np.random.RandomState,
                     **kwargs) -> tuple[dict[str, float], dict[str, Any]]:
  result = _dci(table, random_state, **kwargs)
  return result.scores, {"dci.importance_matrix": result.importance_matrix,
                         "dci.informativeness_test_per_factor": result.per_factor_test_accuracy}


def _without_extras(impl: Callable[..., dict[str, float]]) -> Callable[..., tuple[dict[str, float], dict[str, Any]]]:
  return lambda table, random_state, **kwargs: (impl(table, random_state, **kwargs), {})


# Each metric: (table, random_state, **kwargs) -> (scores, extras); extras are arrays kept beside the scalars.
_IMPLS = {"factor_vae": _without_extras(_factor_vae), "beta_vae": _without_extras(_beta_vae),
          "dci": _dci_with_extras, "mig": _mig_with_extras, "sap": _without_extras(_sap),
          "modularity": _without_extras(_modularity_explicitness)}


def _floats(scores: Mapping[str, Any]) -> dict[str, float]:
  return {key: float(value) for key, value in scores.items()}


def _check_metric_names(metrics: Sequence[str], metric_kwargs: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
  if isinstance(metrics, str):
    metrics = (metrics,)
  metrics = tuple(metrics)
  for name in tuple(metrics) + tuple(metric_kwargs):
    if name not in ALL_METRICS:
      raise UserError(f"Unknown metric {name!r}; choose from {ALL_METRICS}.")
  for name, kwargs in metric_kwargs.items():
    unknown = set(kwargs) - set(_DEFAULT_KWARGS[name])
    if unknown:
      raise UserError(f"Unknown option(s) {sorted(unknown)} for metric {name!r}; valid: "
                       f"{sorted(_DEFAULT_KWARGS[name])}.")
  return metrics


def evaluate_codes(codes: np.ndarray, factor_sizes: Sequence[int], *, metrics: Sequence[str] = DEFAULT_METRICS,
                   seed: int = 0, pca_tokens: bool = False, n_jobs: int = -1,
                   metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
                   return_extras: bool = False) -> dict[str, float] | tuple[dict[str, float], dict[str, Any]]:
  """Evaluates a code table with disentanglement_lib's metrics, each on a fresh `RandomState(seed)`.

  Args:
    codes: (prod(factor_sizes), num_codes) codes in canonical row-major factor order, or (prod, num_tokens, dim)
      token vectors together with `pca_tokens=True`.
    factor_sizes: number of values of each ground-truth factor, in canonical order.
    metrics: names from `ALL_METRICS`; the default is what EncDiff reports.
    seed: seed of every metric's RandomState (disentanglement_lib's `evaluation.random_seed`, 0).
    pca_tokens: reduce each token to one number with a 1-component PCA first (EncDiff-V).
    n_jobs: joblib processes for DCI's per-factor fits; results do not depend on it.
    metric_kwargs: per-metric overrides of the defaults, e.g. {"dci": {"num_train": 1000}}.
    return_extras: also return {"dci.importance_matrix": array, "runtime_s": {metric: seconds}} and, per factor
      in canonical order, "dci.informativeness_test_per_factor" and "mig.per_factor" (arrays whose means are the
      scalar scores: which factors a representation captures, and which it gives one code of its own), and
      "mig.normalized_mutual_info" (num_codes, num_factors): I(code; factor) / H(factor) behind MIG.

  Returns:
    Flat {"<metric>.<disentanglement_lib result key>": float}, e.g. "dci.disentanglement",
    "factor_vae.eval_accuracy"; with `return_extras`, a (scores, extras) pair.
  """
  metric_kwargs = dict(metric_kwargs or {})
  metrics = _check_metric_names(metrics, metric_kwargs)
  factor_sizes = _check_factor_sizes(factor_sizes)
  codes = _check_codes(codes, factor_sizes, pca_tokens=pca_tokens)
  if pca_tokens:
    codes = reduce_tokens_pca(codes)
  table = CodeTable(codes, factor_sizes)
  for name in metrics:
    _check_metric_needs(name, table.factor_sizes, table.num_codes)
  scores: dict[str, float] = {}
  extras: dict[str, Any] = {"runtime_s": {}}
  parallelism = {"dci": {"n_jobs": n_jobs}}  # not a metric option: results do not depend on it
  for name in metrics:
    kwargs = {**_DEFAULT_KWARGS[name], **metric_kwargs.get(name, {}), **parallelism.get(name, {})}
    random_state = np.random.RandomState(seed)
    start = time.perf_counter()
    metric_scores, metric_extras = _IMPLS[name](table, random_state, **kwargs)
    extras.update(metric_extras)
    extras["runtime_s"][name] = time.perf_counter() - start
    scores.update({f"{name}.{key}": float(value) for key, value in metric_scores.items()})
  return (scores, extras) if return_extras else scores
