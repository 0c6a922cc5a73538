"""Whole-dataset encoding (order, padding, streaming), evaluate_run's outputs and the evaluate CLI's errors."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion.data.shapes import ProceduralShapes3D
from concept_diffusion.evaluation.encode import encode_dataset
from concept_diffusion.evaluation.metrics import evaluate_codes
from tests.conftest import TinyBlocks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _index_code(params, images):
  """Recovers the index of a TinyBlocks image from its pixels (block position and colour)."""
  del params
  mask = images[..., 2] > 0  # the block's blue channel is 0.5, the background -1
  ys, xs = jnp.arange(16)[None, :, None], jnp.arange(16)[None, None, :]
  area = jnp.sum(mask, axis=(1, 2))
  x = (jnp.sum(mask * xs, axis=(1, 2)) / area - 3.5) / 4
  y = (jnp.sum(mask * ys, axis=(1, 2)) / area - 3.5) / 3
  color = (jnp.max(jnp.where(mask, images[..., 0], -10.0), axis=(1, 2)) + 1) * 2
  return (jnp.round(x) * 20 + jnp.round(y) * 5 + jnp.round(color))[:, None]


@pytest.mark.parametrize("batch_size", [1, 7, 60, 64])
def test_every_index_encoded_once_in_order(batch_size, tmp_path):
  dataset = TinyBlocks()
  out = str(tmp_path / "codes.npy")
  codes = encode_dataset(_index_code, None, dataset, batch_size, out_path=out, progress=False)
  np.testing.assert_array_equal(codes[:, 0], np.arange(dataset.num_images))
  np.testing.assert_array_equal(np.load(out), codes)


class _First300(ProceduralShapes3D):
  """The first 300 indices of the procedural dataset, rendered on device."""

  @property
  def num_images(self):
    return 300


class _First300OnHost(_First300):
  renders_on_device = False


def test_device_rendering_path_equals_host_path_and_compiles_once():
  traces = []

  def mean_pixel(offset, images):
    traces.append(images.shape)  # runs at trace time only
    return images.mean(axis=(1, 2, 3))[:, None] + offset

  on_device = encode_dataset(mean_pixel, 0.0, _First300(16), 128, progress=False)
  assert len(traces) == 1  # the last partial batch is padded, not recompiled
  on_host = encode_dataset(mean_pixel, 0.0, _First300OnHost(16), 128, progress=False)
  assert on_device.shape == (300, 1) and on_device.std() > 0
  np.testing.assert_allclose(on_device, on_host, atol=1e-5)


def test_a_repeated_dataset_cannot_be_evaluated():
  """The official Cars3D evaluation encodes a 10x-repeated dataset; the row count check refuses it."""
  factor_sizes = (4, 24, 183)
  codes = np.random.default_rng(0).normal(size=(np.prod(factor_sizes) * 10, 5))
  with pytest.raises(ValueError, match="17568|rows"):
    evaluate_codes(codes, factor_sizes, metrics=("mig",))


def test_evaluate_cli_without_a_checkpoint_is_one_clear_line(tmp_path):
  from concept_diffusion.workdir import check_or_write_config
  from configs import smoke
  check_or_write_config(smoke.get_config(), str(tmp_path))
  proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "evaluate.py"), f"--workdir={tmp_path}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "No diffusion checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_evaluate_cli_on_a_directory_that_is_not_a_workdir(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "evaluate.py"), f"--workdir={tmp_path}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "config.json" in proc.stderr


def _shapes_workdir(tmp_path, step):
  """A smoke workdir whose step-`step` evaluation saved a code table with one clean dim per factor but the last."""
  from concept_diffusion.workdir import check_or_write_config
  from configs import smoke
  config = smoke.get_config()
  config.data.name = "procedural_shapes"
  check_or_write_config(config, str(tmp_path))
  sizes = ProceduralShapes3D.factor_sizes
  factors = np.stack(np.unravel_index(np.arange(np.prod(sizes)), sizes), axis=1).astype(np.float32)
  factors[:, -1] = np.random.RandomState(0).randn(len(factors))  # the last factor is not in the code
  os.makedirs(tmp_path / "eval")
  np.save(tmp_path / "eval" / f"codes_{step}.npy", factors)
  return config


def test_eval_files_are_found_by_step_not_by_name_order(tmp_path):
  from concept_diffusion.workdir import eval_path, eval_steps
  assert eval_steps(str(tmp_path), "metrics") == []  # no eval/ yet
  os.makedirs(tmp_path / "eval")
  for name in ("metrics_1200.json", "metrics_300.json", "metrics_300.json.tmp", "codes_300.npy", "metrics_x.json",
               "codes_1200.npy.tmp"):
    (tmp_path / "eval" / name).write_text("{}")
  assert eval_steps(str(tmp_path), "metrics") == [300, 1200]  # an interrupted write's .tmp is not an evaluation
  assert eval_steps(str(tmp_path), "codes") == [300]
  assert eval_path(str(tmp_path), "codes", np.int64(300)) == str(tmp_path / "eval" / "codes_300.npy")


def test_rescoring_saved_codes_keeps_the_steps_other_metrics(tmp_path):
  from concept_diffusion.evaluation.evaluate import evaluate_saved_codes
  config = _shapes_workdir(tmp_path, 7)
  dataset = ProceduralShapes3D(image_size=16)
  earlier = {"step": 7, "factor_vae.eval_accuracy": 0.5, "runtime_s": {"factor_vae": 1.0}}
  (tmp_path / "eval" / "metrics_7.json").write_text(json.dumps(earlier))
  step, scores, _ = evaluate_saved_codes(config, dataset, str(tmp_path), metrics=("mig",))
  record = json.loads((tmp_path / "eval" / "metrics_7.json").read_text())
  assert step == 7 and record["factor_vae.eval_accuracy"] == 0.5  # not recomputed, not erased
  assert record["mig.discrete_mig"] == scores["mig.discrete_mig"] and set(record["runtime_s"]) == {"factor_vae", "mig"}
  per_factor = record["mig.per_factor"]
  assert list(per_factor) == list(dataset.factor_names)
  assert per_factor["orientation"] < 0.05 < 0.5 < min(v for k, v in per_factor.items() if k != "orientation")
  with pytest.raises(FileNotFoundError, match=r"codes_8.npy .*steps with one: \[7\]"):
    evaluate_saved_codes(config, dataset, str(tmp_path), 8, metrics=("mig",))
  os.remove(tmp_path / "eval" / "codes_7.npy")
  with pytest.raises(FileNotFoundError, match="steps with one: none"):
    evaluate_saved_codes(config, dataset, str(tmp_path), metrics=("mig",))


def test_evaluate_cli_from_saved_codes_prints_per_factor_scores(tmp_path):
  _shapes_workdir(tmp_path, 3)
  proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "evaluate.py"), f"--workdir={tmp_path}",
                         "--from_codes", "--metrics=mig"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "step 3 (saved codes)" in proc.stdout
  rows = {line.split()[0]: float(line.split()[-1]) for line in proc.stdout.splitlines()
          if line.split() and line.split()[0] in ProceduralShapes3D.factor_names}
  assert set(rows) == set(ProceduralShapes3D.factor_names) and rows["orientation"] < 0.05 < 0.5 < rows["floor_hue"]
  assert os.path.exists(tmp_path / "eval" / "metrics_3.json")


def test_training_evaluations_keep_their_code_tables_only_when_asked(monkeypatch):
  import types
  from concept_diffusion.evaluation import evaluate
  from configs import smoke
  saved = []
  monkeypatch.setattr(evaluate, "evaluate_encdiff",
                      lambda *args, **kwargs: (saved.append(kwargs.get("save_codes", True)), ({}, {}))[1])
  config = smoke.get_config()
  snapshot = types.SimpleNamespace(config=config, model=None, state=None, dataset=None, workdir="w", step=2,
                                   ae_params=None, final=False)
  evaluate.evaluation_hook(snapshot)
  config.eval.save_train_codes = True  # so that DCI can be added to this step later: --from_codes --step=2
  evaluate.evaluation_hook(snapshot)
  evaluate.evaluation_hook(types.SimpleNamespace(**{**vars(snapshot), "final": True}))
  assert saved == [False, True, True]
