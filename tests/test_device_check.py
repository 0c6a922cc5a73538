"""tools/device_check.py: every check runs and is reported even when one fails; the table has one row per
benchmark that ran; DDIM is timed once per dtype. The checks themselves (lowering, training, benchmark) have
their own tests; here they are replaced by recorders so that the report's assembly is what is tested."""
import json
import types

from concept_diffusion.tools import benchmark, device_check, tpu_estimates
from configs import smoke

_ESTIMATE = {"chip": "v5e", "num_devices": 8, "mesh": [8, 1], "compute_dtype": "bfloat16", "batch_size": 8,
             "function": "diffusion_train_step", "ok": True, "error": "", "compile_s": 61.0, "step_ms": 16.0,
             "images_per_s": 500.0, "mfu": 0.31, "bytes_per_device": 2.5e9, "fits": True,
             "source": "compiler cost model, not a measurement", "date": "2026-12-08",
             "command": "encdiff-compile --config=procedural_shapes --topology=v5e:2x4"}


def test_device_check_reports_every_check_and_survives_a_failure(monkeypatch):
  calls = []

  def fake_benchmark(config, batch_sizes, **kwargs):
    (batch,) = batch_sizes
    calls.append((config.train.compute_dtype, batch, kwargs["sample_steps"]))
    if config.train.compute_dtype == "bfloat16" and batch == 16:
      raise MemoryError("RESOURCE_EXHAUSTED: out of memory allocating 12 GiB\nsecond line")
    row = {"train_step_ms": 20.0, "images_per_s": batch / 0.02, "mfu": 0.25, "memory_bytes": 3e9,
           "peak_device_memory_bytes": None, "compile_s": 12.5, "sample_steps": kwargs["sample_steps"],
           "sample_ms_per_image": 1.5 if kwargs["sample_steps"] else None, "encode_images_per_s": 900.0}
    return {"results": [row], "peak_source": "published"}

  monkeypatch.setattr(benchmark, "run_benchmark", fake_benchmark)
  monkeypatch.setattr(device_check, "_lowering", lambda config, platform: [{"target": "diffusion_train_step",
                                                                           "seconds": 1.0}])

  def failing_training(config, steps):
    raise RuntimeError("smoke training diverged")

  monkeypatch.setattr(device_check, "_smoke_training", failing_training)
  said = []
  report = device_check.run_device_check(smoke.get_config(), smoke.get_config(), batch_sizes=(8, 16),
                                         dtypes=("float32", "bfloat16"), sample_steps=7, say=said.append)
  # Sampling only at the first batch size of each dtype; every benchmark ran despite the failures.
  assert calls == [("float32", 8, 7), ("float32", 16, 0), ("bfloat16", 8, 7), ("bfloat16", 16, 0)]
  assert report["ok"] is False
  checks = report["checks"]
  assert checks["lowering (cpu)"]["ok"] and checks["benchmark float32 batch 16"]["ok"]
  assert checks["smoke training (50 steps)"]["error"] == "RuntimeError: smoke training diverged"
  assert checks["benchmark bfloat16 batch 16"]["error"] == "MemoryError: RESOURCE_EXHAUSTED: out of memory allocating 12 GiB"
  assert [(r["compute_dtype"], r["batch_size"]) for r in report["benchmark"]] == [
      ("float32", 8), ("float32", 16), ("bfloat16", 8)]
  json.dumps(report)  # what experiments/device_check.py writes

  markdown = device_check.format_markdown(report)
  rows = [line for line in markdown.splitlines() if line.startswith("| float32") or line.startswith("| bfloat16")]
  assert rows[0] == "| float32 | 8 | 20.0 | 400 | 25.0% | 3.00 | - | 12.5 | 1.50 (7 steps) | - |"
  assert rows[1].endswith("| 12.5 | - | - |") and len(rows) == 3
  assert "| benchmark bfloat16 batch 16 | FAILED: MemoryError: RESOURCE_EXHAUSTED" in markdown
  assert "[smoke training (50 steps)] FAILED: RuntimeError: smoke training diverged (0.0 s)" in said


def test_on_a_tpu_each_benchmark_row_is_set_against_its_compile_estimate(monkeypatch):
  """The first device loan calibrates the cost model: measured / estimated per row where an estimate exists."""
  tpu = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")
  monkeypatch.setattr(device_check.jax, "devices", lambda: [tpu] * 8)
  monkeypatch.setattr(tpu_estimates, "load", lambda path=tpu_estimates.PACKAGED: [_ESTIMATE])
  monkeypatch.setattr(device_check, "_lowering", lambda config, platform: [])
  monkeypatch.setattr(device_check, "_smoke_training", lambda config, steps: {})
  row = {"train_step_ms": 20.0, "images_per_s": 400.0, "mfu": 0.25, "memory_bytes": 3e9,
         "peak_device_memory_bytes": None, "compile_s": 12.5, "sample_steps": 0, "sample_ms_per_image": None,
         "encode_images_per_s": 900.0}
  monkeypatch.setattr(benchmark, "run_benchmark", lambda config, batch_sizes, **kw: {"results": [dict(row)],
                                                                                       "peak_source": "published"})
  report = device_check.run_device_check(smoke.get_config(), smoke.get_config(), batch_sizes=(8, 16),
                                         dtypes=("bfloat16",), sample_steps=0, say=lambda line: None)
  estimated, missing = report["benchmark"]
  assert estimated["estimated_step_ms"] == 16.0 and estimated["measured_over_estimated"] == 20.0 / 16.0
  assert missing["estimated_step_ms"] is None and missing["measured_over_estimated"] is None
  assert "| 16.0 (1.25x) |" in device_check.format_markdown(report)


def test_the_plan_lists_each_step_with_its_estimate_or_says_there_is_none():
  plan = device_check.plan(smoke.get_config(), chip="v5e", num_devices=8, platform="tpu", batch_sizes=(8, 16),
                           dtypes=("bfloat16", "float32"), train_steps=50, sample_steps=200,
                           estimates=[_ESTIMATE, dict(_ESTIMATE, batch_size=16, ok=False,
                                                      error="RESOURCE_EXHAUSTED: 20 GiB")], cache_dir="/cache")
  lines = plan.splitlines()
  assert lines[0] == "Plan on 8 x v5e (config `smoke`); compilation cache: /cache."
  text = "\n".join(lines)
  assert "bfloat16, batch 8: compile, 2 warm-up + timed steps; DDIM-200 at batch 8" in text
  assert ("estimate (compiler cost model, not a measurement): 16.0 ms/step, 500 img/s, MFU 31.0%, 2.50 GB per chip "
          "(fits); compiled in 61 s on the CPU host (2026-12-08: encdiff-compile --config=procedural_shapes "
          "--topology=v5e:2x4)") in text
  assert "rejected it on the CPU host: RESOURCE_EXHAUSTED: 20 GiB" in text
  assert text.count("no compile estimate for this slice") == 2  # float32 at both batch sizes


def test_estimate_rows_merge_by_key_and_look_up_by_slice(tmp_path):
  path = str(tmp_path / "estimates.json")
  tpu_estimates.merge(path, [_ESTIMATE, dict(_ESTIMATE, batch_size=16)])
  tpu_estimates.merge(path, [dict(_ESTIMATE, step_ms=12.0)])  # the same key replaces
  rows = tpu_estimates.load(path)
  assert len(rows) == 2
  assert tpu_estimates.lookup(rows, "v5e", 8, "bfloat16", 8)["step_ms"] == 12.0
  assert tpu_estimates.lookup(rows, "v5e", 8, "bfloat16", 8, mesh=(4, 2)) is None
  assert tpu_estimates.lookup(rows, "v6e", 8, "bfloat16", 8) is None
  assert [tpu_estimates.chip_of_device_kind(k) for k in ("TPU v5 lite", "TPU v5", "TPU v6 lite", "TPU v4", "cpu")] == [
      "v5e", "v5p", "v6e", "v4", None]
