"""tools/device_check.py: every check runs and is reported even when one fails; the table has one row per
benchmark that ran; DDIM is timed once per dtype. The checks themselves (lowering, training, benchmark) have
their own tests; here they are replaced by recorders so that the report's assembly is what is tested."""
import json

from concept_diffusion.tools import benchmark, device_check
from configs import smoke


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
  assert rows[0] == "| float32 | 8 | 20.0 | 400 | 25.0% | 3.00 | - | 12.5 | 1.50 (7 steps) |"
  assert rows[1].endswith("| 12.5 | - |") and len(rows) == 3
  assert "| benchmark bfloat16 batch 16 | FAILED: MemoryError: RESOURCE_EXHAUSTED" in markdown
  assert "[smoke training (50 steps)] FAILED: RuntimeError: smoke training diverged (0.0 s)" in said
