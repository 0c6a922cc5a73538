"""Tests of the disentanglement_lib metric reimplementations and of experiments/aggregate.py.

Sample sizes are far below the defaults so the file runs in well under a minute on two cores; what is checked is
behaviour that follows from each metric's definition (perfect codes score ~1, mixing lowers DCI/MIG, noise is at
chance, invariances, RNG stream order, n_jobs independence, input errors), not numbers copied from a run.
"""
import json
import math
import os

import numpy as np
import pytest

from concept_diffusion.evaluation import metrics as M

SIZES = (4, 4, 3, 5)  # 240 images
DCI_SIZES = (2, 2, 3)  # few classes -> few boosted trees (1 + 1 + 3 per stage) -> fast DCI
SMALL = {
    "factor_vae": dict(num_train=300, num_eval=300, num_variance_estimate=1000),
    "beta_vae": dict(num_train=200, num_eval=200),
    "dci": dict(num_train=200, num_test=100),
    "mig": dict(num_train=2000),
    "sap": dict(num_train=300, num_test=200),
    "modularity": dict(num_train=400, num_test=300),
}


def _factors(sizes):
  return np.stack(np.unravel_index(np.arange(int(np.prod(sizes))), sizes), axis=1)


def _perfect_code(sizes, num_noise=2, seed=0):
  """One increasing affine dim per factor (distinct slopes/offsets), then pure noise dims."""
  rs = np.random.RandomState(seed)
  signal = _factors(sizes) * rs.uniform(0.5, 2., len(sizes)) + rs.uniform(-1., 1., len(sizes))
  return np.concatenate([signal, rs.randn(signal.shape[0], num_noise)], axis=1)


def _rotated(codes, seed=0):
  """Standardise, then mix all dims with a random orthogonal matrix: same information, not disentangled."""
  q, _ = np.linalg.qr(np.random.RandomState(seed).randn(codes.shape[1], codes.shape[1]))
  return ((codes - codes.mean(0)) / codes.std(0)) @ q


def _evaluate(codes, sizes, metrics, **kwargs):
  return M.evaluate_codes(codes, sizes, metrics=metrics, n_jobs=1,
                          metric_kwargs={m: SMALL[m] for m in metrics}, **kwargs)


def _perm_affine(codes, seed=1):
  """Permutes dims and applies a positive per-dim affine map."""
  rs = np.random.RandomState(seed)
  perm = rs.permutation(codes.shape[1])
  return codes[:, perm] * rs.uniform(0.5, 3., codes.shape[1]) + rs.uniform(-5., 5., codes.shape[1])


# --------------------------------------------------------------------------------------------------------------
# Random stream and table lookup: the parts that make numbers match disentanglement_lib.
# --------------------------------------------------------------------------------------------------------------


def test_factor_sampling_consumes_rng_like_disentanglement_lib():
  table = M.CodeTable(np.zeros((int(np.prod(SIZES)), 1)), SIZES)
  got = table.sample_factors(16, np.random.RandomState(3))
  rs = np.random.RandomState(3)  # SplitDiscreteStateSpace: one randint(size, size=num) per factor, in order
  expected = np.stack([rs.randint(size, size=16) for size in SIZES], axis=1)
  np.testing.assert_array_equal(got, expected)


def test_batches_of_16_change_the_stream_and_follow_it():
  table = M.CodeTable(np.zeros((int(np.prod(SIZES)), 1)), SIZES)
  _, ys = M.generate_batch_factor_code(table, 40, np.random.RandomState(5), batch_size=16)
  rs = np.random.RandomState(5)
  expected = np.concatenate([np.stack([rs.randint(s, size=n) for s in SIZES], 1) for n in (16, 16, 8)])
  np.testing.assert_array_equal(ys.T, expected)
  _, ys_64 = M.generate_batch_factor_code(table, 40, np.random.RandomState(5), batch_size=64)
  assert not np.array_equal(ys, ys_64)


def test_table_lookup_is_row_major_like_factor_bases():
  codes = np.arange(int(np.prod(SIZES)), dtype=np.float64)[:, None]
  table = M.CodeTable(codes, SIZES)
  factors = table.sample_factors(50, np.random.RandomState(0))
  bases = np.prod(SIZES) / np.cumprod(SIZES)  # disentanglement_lib's index formula
  np.testing.assert_array_equal(table.represent(factors)[:, 0], np.dot(factors, bases))


# --------------------------------------------------------------------------------------------------------------
# Scores that follow from the definitions.
# --------------------------------------------------------------------------------------------------------------


def test_perfect_code_scores_high_and_rotation_scores_lower():
  perfect = _perfect_code(SIZES)
  scores = _evaluate(perfect, SIZES, ("factor_vae", "mig"))
  rotated = _evaluate(_rotated(perfect), SIZES, ("mig",))
  # Fixing a factor zeroes the variance of exactly its own dim, so every vote is right.
  assert scores["factor_vae.eval_accuracy"] == 1.0
  assert scores["factor_vae.train_accuracy"] == 1.0
  assert scores["mig.discrete_mig"] > 0.75
  assert rotated["mig.discrete_mig"] < scores["mig.discrete_mig"] - 0.3


def test_dci_perfect_vs_rotated():
  sizes = (2, 3, 4)  # 24 rows: enough that noise dims rarely tie with the factor dims' splits
  perfect = _perfect_code(sizes, num_noise=2)
  good = _evaluate(perfect, sizes, ("dci",))
  bad = _evaluate(_rotated(perfect), sizes, ("dci",))
  assert good["dci.disentanglement"] > 0.95
  assert good["dci.informativeness_test"] > 0.95
  assert bad["dci.disentanglement"] < good["dci.disentanglement"] - 0.3
  # On a tiny table noise dims sometimes tie with a factor's split and take some of its importance.
  assert bad["dci.completeness"] < good["dci.completeness"] - 0.3


def test_pure_noise_is_at_chance_for_factor_vae():
  sizes = (6, 6, 8, 5)  # a large table, so fixing one factor leaves many rows (little finite-table signal)
  noise = np.random.RandomState(0).randn(int(np.prod(sizes)), 6)
  scores = M.compute_factor_vae(noise, sizes, 0, num_train=500, num_eval=1000, num_variance_estimate=2000)
  assert abs(scores["eval_accuracy"] - 1. / len(sizes)) < 0.08


def test_fully_collapsed_code_gets_zero_factor_vae():
  codes = np.full((int(np.prod(SIZES)), 3), 0.7) + 0.001 * np.random.RandomState(0).randn(int(np.prod(SIZES)), 3)
  scores = M.compute_factor_vae(codes, SIZES, 0, num_train=10, num_eval=10, num_variance_estimate=200)
  assert scores == {"train_accuracy": 0., "eval_accuracy": 0., "num_active_dims": 0.}


# --------------------------------------------------------------------------------------------------------------
# Invariances the original metrics have (and only those).
# --------------------------------------------------------------------------------------------------------------


def test_factor_vae_mig_modularity_invariant_to_permutation_and_positive_affine():
  codes = _perfect_code(SIZES, num_noise=3)
  metrics = ("factor_vae", "mig", "modularity")
  base = _evaluate(codes, SIZES, metrics)
  moved = _evaluate(_perm_affine(codes), SIZES, metrics)
  # FactorVAE divides by the global variance; MIG/modularity bin each dim over its own range; explicitness z-scores.
  for key in base:
    tol = 1e-3 if "explicitness" in key else 1e-9
    assert moved[key] == pytest.approx(base[key], abs=tol), key


def test_dci_invariant_to_positive_affine_and_to_permutation_up_to_tie_breaking():
  codes = _rotated(_perfect_code(DCI_SIZES, num_noise=2))  # all dims informative, so importances are spread
  rs = np.random.RandomState(1)
  perm = rs.permutation(codes.shape[1])

  def dci(c):  # a fixed tree RNG: on a 12-row table many splits tie, and ties are broken by that RNG
    return M.compute_dci(c, DCI_SIZES, 0, n_jobs=1, tree_random_state=3, **SMALL["dci"])

  base = dci(codes)
  affine = dci(codes * rs.uniform(0.5, 3., codes.shape[1]) + rs.uniform(-5., 5., codes.shape[1]))
  permuted = dci(codes[:, perm])
  for key in base:
    # Trees only see the order of values within each dim ...
    assert affine[key] == pytest.approx(base[key], abs=1e-9), key
    # ... but the order in which features are visited (which of two tied splits wins) follows the dims.
    assert permuted[key] == pytest.approx(base[key], abs=0.02), key


def test_sap_and_beta_vae_invariant_to_permutation():
  codes = _rotated(_perfect_code(SIZES, num_noise=1))
  perm = np.random.RandomState(2).permutation(codes.shape[1])
  base = _evaluate(codes, SIZES, ("sap", "beta_vae"))
  moved = _evaluate(codes[:, perm], SIZES, ("sap", "beta_vae"))
  assert moved["sap.SAP_score"] == pytest.approx(base["sap.SAP_score"], abs=1e-12)
  assert moved["beta_vae.eval_accuracy"] == pytest.approx(base["beta_vae.eval_accuracy"], abs=0.01)


# --------------------------------------------------------------------------------------------------------------
# Seeds, n_jobs, PCA tokens.
# --------------------------------------------------------------------------------------------------------------


def test_same_seed_same_numbers_other_seed_other_sample():
  codes = np.random.RandomState(0).randn(int(np.prod(SIZES)), 5)
  metrics = ("factor_vae", "mig", "beta_vae")
  first = _evaluate(codes, SIZES, metrics, seed=0)
  assert _evaluate(codes, SIZES, metrics, seed=0) == first
  other = _evaluate(codes, SIZES, metrics, seed=1)
  assert sum(other[key] != first[key] for key in first if "num_active" not in key) >= 3


def test_dci_n_jobs_invariant_including_tree_tie_breaking():
  base = _rotated(_perfect_code(DCI_SIZES, num_noise=1))
  codes = np.concatenate([base, base[:, :2]], axis=1)  # exact duplicate dims: every split on them is a tie
  kwargs = dict(num_train=200, num_test=100)

  def run(n_jobs, global_seed):
    np.random.seed(global_seed)
    result = M.dci_importance_matrix(codes, DCI_SIZES, 0, n_jobs=n_jobs, **kwargs)
    return result, np.random.get_state()

  (seq, seq_state), (par, par_state) = run(1, 11), run(2, 11)
  np.testing.assert_array_equal(seq.importance_matrix, par.importance_matrix)
  assert seq.scores == par.scores
  assert M._same_state(seq_state, par_state)  # the global RNG is left where the sequential loop leaves it
  # The test has teeth: ties really are broken by the global RNG, so a wrong per-factor state would show.
  other, _ = run(1, 12)
  assert not np.array_equal(other.importance_matrix, seq.importance_matrix)


def test_dci_falls_back_to_sequential_if_rng_prediction_is_wrong(monkeypatch):
  codes = _perfect_code(DCI_SIZES, num_noise=1)
  expected = M.dci_importance_matrix(codes, DCI_SIZES, 0, n_jobs=1, tree_random_state=5, num_train=150,
                                     num_test=50)
  monkeypatch.setattr(M, "_predicted_tree_states",
                      lambda ys, state: [np.random.RandomState(99).get_state()] * (len(ys) + 1))
  with pytest.warns(UserWarning, match="refitting sequentially"):
    got = M.dci_importance_matrix(codes, DCI_SIZES, 0, n_jobs=2, tree_random_state=5, num_train=150, num_test=50)
  np.testing.assert_array_equal(got.importance_matrix, expected.importance_matrix)


def test_evaluate_codes_extras_hold_dci_importance_and_runtimes():
  codes = _perfect_code(DCI_SIZES, num_noise=1)
  scores, extras = _evaluate(codes, DCI_SIZES, ("dci", "mig"), return_extras=True)
  matrix = extras["dci.importance_matrix"]
  assert matrix.shape == (codes.shape[1], len(DCI_SIZES))
  np.testing.assert_allclose(matrix.sum(axis=0), 1.)  # sklearn normalises importances per factor
  assert set(extras["runtime_s"]) == {"dci", "mig"}
  assert all(isinstance(v, float) for v in scores.values())


def test_pca_tokens_recover_scalar_factors():
  rs = np.random.RandomState(0)
  factors = _factors(SIZES).astype(np.float64)
  directions = rs.randn(len(SIZES), 8)  # token t carries factor t along its own direction
  tokens = factors[:, :, None] * directions[None] + 0.01 * rs.randn(factors.shape[0], len(SIZES), 8)
  reduced = M.reduce_tokens_pca(tokens)
  assert reduced.shape == (factors.shape[0], len(SIZES))
  for t in range(len(SIZES)):
    assert abs(np.corrcoef(reduced[:, t], factors[:, t])[0, 1]) > 0.999
  scores = _evaluate(tokens, SIZES, ("factor_vae",), pca_tokens=True)
  assert scores["factor_vae.eval_accuracy"] == 1.0


# --------------------------------------------------------------------------------------------------------------
# Bad input: one clear ValueError each.
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codes, sizes, kwargs, match", [
    (np.zeros((239, 3)), SIZES, {}, "239 rows but prod"),
    (np.zeros(240), SIZES, {}, "must be 2-D"),
    (np.zeros((240, 2, 2, 2)), SIZES, {}, "must be 2-D"),
    (np.zeros((240, 3, 4)), SIZES, {}, "pca_tokens=True"),
    (np.zeros((240, 3)), SIZES, {"pca_tokens": True}, "expects 3-D"),
    (np.zeros((240, 3)), SIZES, {"metrics": ("factor_vae", "dcj")}, "Unknown metric 'dcj'"),
    (np.zeros((240, 3)), SIZES, {"metric_kwargs": {"mig": {"num_bin": 3}}}, "Unknown option"),
    (np.zeros((240, 3)), (), {}, "factor_sizes is empty"),
    (np.zeros((240, 3)), (4, 0, 3, 5), {}, r"factor_sizes\[1\]"),
    (np.array([["a"] * 3] * 240), SIZES, {}, "real numeric"),
])
def test_bad_inputs_raise_clear_errors(codes, sizes, kwargs, match):
  with pytest.raises(ValueError, match=match):
    M.evaluate_codes(codes, sizes, **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_codes_raise(bad):
  codes = np.random.RandomState(0).randn(240, 3)
  codes[17, 1] = bad
  with pytest.raises(ValueError, match=r"NaN/Inf in 1 row\(s\) \(first: \[17\]\)"):
    M.evaluate_codes(codes, SIZES)
  with pytest.raises(ValueError, match="NaN/Inf"):
    M.compute_mig(codes, SIZES)


@pytest.mark.parametrize("metric", ["dci", "mig", "sap", "modularity"])
def test_size_one_factor_names_factor_and_fix(metric):
  sizes = (4, 1, 3)
  codes = np.random.RandomState(0).randn(12, 3)
  with pytest.raises(ValueError, match=r"factor 1 has size 1.*Drop that factor"):
    M.evaluate_codes(codes, sizes, metrics=(metric,))


def test_size_one_factor_is_fine_where_the_metric_allows_it_and_dropping_it_keeps_the_table():
  codes = _perfect_code((4, 3), num_noise=0)  # on 12 rows a noise dim would carry MI with every factor
  kwargs = dict(num_train=100, num_eval=100, num_variance_estimate=500)
  with_const = M.compute_factor_vae(codes, (4, 1, 3), 0, **kwargs)
  assert with_const["eval_accuracy"] > 0.5  # the constant factor's votes are lost, the rest are right
  assert M.compute_mig(codes, (4, 3), 0, num_train=500)["discrete_mig"] > 0.75


def test_mig_needs_two_code_dims():
  with pytest.raises(ValueError, match="needs >= 2 code dimensions"):
    M.compute_mig(np.random.RandomState(0).randn(240, 1), SIZES)


def test_constant_code_dim_is_a_clear_error_for_explicitness():
  codes = np.random.RandomState(0).randn(240, 3)
  codes[:, 2] = 1.5
  with pytest.raises(ValueError, match=r"code dims \[2\] are constant"):
    M.compute_modularity_explicitness(codes, SIZES, 0, num_train=100, num_test=100)


# --------------------------------------------------------------------------------------------------------------
# experiments/aggregate.py
# --------------------------------------------------------------------------------------------------------------


def _load_aggregate():
  from experiments import aggregate  # pylint: disable=g-import-not-at-top
  return aggregate


def _fake_run(root, name, step_values, dataset_in_file=True, config_dataset="shapes3d"):
  workdir = root / name
  (workdir / "eval").mkdir(parents=True)
  for step, values in step_values.items():
    # Non-numeric fields as experiments/evaluate.py writes them must be skipped.
    payload = dict(values, step=step, factor_names=["a", "b"], runtime_s={"dci": 1.0},
                   **{"dci.importance_matrix": [[0.5, 0.5]]})
    if dataset_in_file:
      payload["dataset"] = "shapes3d"
    (workdir / "eval" / f"metrics_{step}.json").write_text(json.dumps(payload))
  (workdir / "config.json").write_text(json.dumps({"data": {"name": config_dataset}}))
  return workdir


def test_aggregate_uses_latest_step_and_sample_std(tmp_path, capsys):
  agg = _load_aggregate()
  runs = [
      # metrics_300 sorts after metrics_1200 as text; the numerically larger step must win.
      _fake_run(tmp_path, "s0", {300: {"dci.disentanglement": 0.1}, 1200: {"dci.disentanglement": 0.9}}),
      _fake_run(tmp_path, "s1", {1200: {"dci.disentanglement": 0.7, "mig.discrete_mig": 0.3}},
                dataset_in_file=False),
      _fake_run(tmp_path, "m0", {50: {"dci.disentanglement": 0.4}}, dataset_in_file=False, config_dataset="mpi3d"),
  ]
  out_json = tmp_path / "summary.json"
  assert agg.main([str(r) for r in runs] + [f"--json={out_json}"]) == 0
  summary = json.loads(out_json.read_text())
  dci = summary["shapes3d"]["metrics"]["dci.disentanglement"]
  assert dci["mean"] == pytest.approx(0.8)
  assert dci["std"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
  assert summary["shapes3d"]["n_runs"] == 2
  assert summary["shapes3d"]["metrics"]["mig.discrete_mig"]["n"] == 1
  assert summary["mpi3d"]["metrics"]["dci.disentanglement"]["std"] is None  # one run: no std
  assert set(summary["shapes3d"]["metrics"]) == {"dci.disentanglement", "mig.discrete_mig"}
  table = capsys.readouterr().out
  assert "ddof=1" in table and "| dci.disentanglement | 0.400 | 0.800 ± 0.141 |" in table


def test_aggregate_errors_on_workdir_without_eval(tmp_path, capsys):
  agg = _load_aggregate()
  (tmp_path / "empty_run").mkdir()
  assert agg.main([str(tmp_path / "empty_run")]) == 2
  assert "no eval/metrics_<step>.json" in capsys.readouterr().err
  with pytest.raises(FileNotFoundError):
    agg.aggregate([tmp_path / "empty_run"])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_aggregate_refuses_a_non_finite_metric_naming_run_file_and_metric(tmp_path, capsys, bad):
  agg = _load_aggregate()
  good = _fake_run(tmp_path, "s0", {10: {"dci.disentanglement": 0.5, "mig.discrete_mig": 0.2}})
  broken = _fake_run(tmp_path, "s1", {10: {"dci.disentanglement": 0.5, "mig.discrete_mig": bad}})
  out_json = tmp_path / "summary.json"
  assert agg.main([str(good), str(broken), f"--json={out_json}"]) == 2
  out, err = capsys.readouterr()
  assert f"error: {broken}: " in err and "metrics_10.json" in err and f"mig.discrete_mig={bad}" in err
  assert "dci.disentanglement" not in err and out == "" and not out_json.exists()


@pytest.mark.parametrize("again", ["runs/a", "runs/a/", "./runs/a", "link_to_a"])
def test_aggregate_refuses_a_workdir_given_twice_under_any_spelling(tmp_path, capsys, monkeypatch, again):
  agg = _load_aggregate()
  monkeypatch.chdir(tmp_path)
  _fake_run(tmp_path / "runs", "a", {10: {"dci.disentanglement": 0.5}})
  _fake_run(tmp_path / "runs", "b", {10: {"dci.disentanglement": 0.7}})
  (tmp_path / "link_to_a").symlink_to(tmp_path / "runs" / "a")
  assert agg.main(["runs/a", "runs/b", again, "--json=summary.json"]) == 2
  out, err = capsys.readouterr()
  assert f"error: {again}: given twice" in err and out == "" and not (tmp_path / "summary.json").exists()


def test_aggregate_json_goes_into_new_folders_and_an_unwritable_path_is_one_error_line(tmp_path, capsys):
  agg = _load_aggregate()
  run = str(_fake_run(tmp_path, "s0", {10: {"dci.disentanglement": 0.5}}))
  nested = tmp_path / "new" / "deeper" / "summary.json"
  assert agg.main([run, f"--json={nested}"]) == 0
  assert json.loads(nested.read_text())["shapes3d"]["n_runs"] == 1
  assert os.listdir(nested.parent) == ["summary.json"]  # no temporary file left beside it
  capsys.readouterr()
  (tmp_path / "a_file").write_text("")
  blocked = tmp_path / "a_file" / "summary.json"  # its parent is a file: no folder can be made there
  assert agg.main([run, f"--json={blocked}"]) == 2
  out, err = capsys.readouterr()
  assert out == "" and err.startswith(f"error: cannot write {blocked}: ") and err.count("\n") == 1


def test_per_factor_scores_average_to_the_scalars_and_single_out_a_missing_factor():
  codes = _perfect_code(SIZES, num_noise=1)
  codes[:, 1] = np.random.RandomState(5).randn(len(codes))  # factor 1 is nowhere in the code
  scores, extras = M.evaluate_codes(codes, SIZES, metrics=("dci", "mig"), n_jobs=1, return_extras=True,
                                    metric_kwargs={"dci": SMALL["dci"], "mig": SMALL["mig"]})
  dci, mig = extras["dci.informativeness_test_per_factor"], extras["mig.per_factor"]
  assert dci.shape == mig.shape == (len(SIZES),)
  assert np.mean(dci) == pytest.approx(scores["dci.informativeness_test"], abs=1e-12)
  assert np.mean(mig) == pytest.approx(scores["mig.discrete_mig"], abs=1e-12)
  others = [0, 2, 3]
  assert mig[1] < 0.1 < 0.5 < mig[others].min()
  # Not chance (0.25) for factor 1: on a 240-row table over half the test rows were also drawn for training, and
  # the trees memorise their noise values.
  assert dci[1] < 0.75 and dci[others].min() > 0.9
  # The matrix behind MIG: factor j's best code is code j of the perfect code, and the gap is its top two's gap.
  mi = extras["mig.normalized_mutual_info"]
  assert mi.shape == (codes.shape[1], len(SIZES))
  np.testing.assert_array_equal(mi[:, others].argmax(axis=0), others)
  top_two = np.sort(mi, axis=0)[::-1][:2]
  np.testing.assert_allclose(top_two[0] - top_two[1], mig, atol=1e-12)


def test_the_config_knows_every_metric_by_name():
  from concept_diffusion.config import EVAL_METRICS
  assert EVAL_METRICS == M.ALL_METRICS
