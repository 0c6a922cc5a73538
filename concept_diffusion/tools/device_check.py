"""One call that measures whatever accelerator JAX sees (experiments/device_check.py).

Four checks, each recorded as passed or with its first error line (a failed check never stops the others):
lowering of every function for the devices' own platform on the benchmark config; a short smoke training in a
temporary workdir (loss, images/s, MFU from its metrics.jsonl); the benchmark config's train step at each batch
size in each compute dtype (tools/benchmark.py: img/s, MFU, memory, compile time); DDIM sampling at the first
batch size. The report is one JSON and one Markdown table, so that the numbers go into the README as they are.

On a TPU each benchmark row also carries the compile estimate for that step from the package's estimates file
(tools/tpu_estimates.py, made by encdiff-compile on a CPU host) and measured / estimated: the first device loan
calibrates the compiler-cost-model numbers of docs/scaling.md. `plan(...)` says beforehand what will be compiled
and run, with those estimates.
"""
from __future__ import annotations

import datetime
import json
import os
import platform as host_platform
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

import jax
import ml_collections

from concept_diffusion import parallel
from concept_diffusion.checkpoint import first_line
from concept_diffusion.tools import benchmark, lower, tpu_estimates
from concept_diffusion.train import trainer


def _check(report: dict[str, Any], name: str, fn: Callable[[], Any], say: Callable[[str], None]) -> Any:
  start = time.perf_counter()
  say(f"[{name}] ...")
  try:
    result = fn()
    entry = {"ok": True}
  except Exception as e:  # pylint: disable=broad-except  (a failed check is a result; the others still run)
    result, entry = None, {"ok": False, "error": first_line(e), "traceback": traceback.format_exc(limit=8)}
  entry["seconds"] = round(time.perf_counter() - start, 1)
  report["checks"][name] = entry
  say(f"[{name}] {'ok' if entry['ok'] else 'FAILED: ' + entry['error']} ({entry['seconds']} s)")
  return result


def _lowering(config: ml_collections.ConfigDict, platform: str) -> list[dict[str, Any]]:
  results = lower.lower_all(config, parallel.make_mesh(config.mesh), [platform])
  failed = [r for r in results if not r.ok]
  if failed:
    raise RuntimeError("; ".join(f"{r.target}: {r.error}" for r in failed))
  return [{"target": r.target, "seconds": round(r.seconds, 2)} for r in results]


def _smoke_training(config: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.num_steps = steps
  config.train.log_every = max(1, steps // 5)
  config.eval.final = False
  config.eval.every = 0
  config.train.figure_every = 0
  with tempfile.TemporaryDirectory(prefix="device_check_") as workdir:
    start = time.perf_counter()
    trainer.train(config, workdir)
    seconds = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      records = [json.loads(line) for line in f if line.strip()]
  last = [r for r in records if r.get("stage") == "diffusion"][-1]
  return {"steps": steps, "wall_s": round(seconds, 1), "loss": last["loss"], "images_per_s": last["images_per_s"],
          "mfu": last.get("mfu")}


def run_device_check(benchmark_config: ml_collections.ConfigDict, smoke_config: ml_collections.ConfigDict, *,
                     batch_sizes: Sequence[int] = (32, 128, 256), dtypes: Sequence[str] = ("float32", "bfloat16"),
                     train_steps: int = 50, bench_steps: int = 10, sample_steps: int = 200,
                     say: Callable[[str], None] = print) -> dict[str, Any]:
  """The report (see the module docstring); `report["ok"]` is whether every check passed."""
  devices = jax.devices()
  report: dict[str, Any] = {
      "date": datetime.date.today().isoformat(), "host": host_platform.node(),
      "platform": devices[0].platform, "device_kind": devices[0].device_kind, "num_devices": len(devices),
      "jax_version": jax.__version__, "config": benchmark_config.name, "checks": {}, "benchmark": [],
  }
  platform = "cuda" if devices[0].platform == "gpu" else devices[0].platform
  chip = tpu_estimates.chip_of_device_kind(devices[0].device_kind) if platform == "tpu" else None
  estimates = tpu_estimates.load() if chip else []
  report["lowering"] = _check(report, f"lowering ({platform})", lambda: _lowering(benchmark_config, platform), say)
  report["smoke_training"] = _check(report, f"smoke training ({train_steps} steps)",
                                    lambda: _smoke_training(smoke_config, train_steps), say)
  for dtype in dtypes:
    config = ml_collections.ConfigDict(benchmark_config.to_dict())
    config.train.compute_dtype = dtype
    for i, batch_size in enumerate(batch_sizes):
      # DDIM once per dtype, at the first batch size: the sampler's compile is the slow part of a short check.
      steps = sample_steps if i == 0 else 0
      result = _check(report, f"benchmark {dtype} batch {batch_size}", lambda: benchmark.run_benchmark(
          config, [batch_size], steps=bench_steps, warmup=2, sample_steps=steps, encode_batches=2,
          pipeline_batches=0, with_first_stage=False, count_remat_warnings=False), say)
      if result is not None:
        row = result["results"][0]
        estimated = tpu_estimates.lookup(estimates, chip, len(devices), dtype, batch_size)
        estimated_ms = None if estimated is None else estimated["step_ms"]
        report["benchmark"].append({
            "compute_dtype": dtype, "batch_size": batch_size, "train_step_ms": row["train_step_ms"],
            "images_per_s": row["images_per_s"], "mfu": row["mfu"], "memory_bytes": row["memory_bytes"],
            "peak_device_memory_bytes": row["peak_device_memory_bytes"], "compile_s": row["compile_s"],
            "sample_steps": row["sample_steps"], "sample_ms_per_image": row["sample_ms_per_image"],
            "encode_images_per_s": row["encode_images_per_s"], "peak_source": result["peak_source"],
            "estimated_step_ms": estimated_ms,
            "measured_over_estimated": None if not estimated_ms else row["train_step_ms"] / estimated_ms})
  report["ok"] = all(c["ok"] for c in report["checks"].values())
  return report


def plan(benchmark_config: ml_collections.ConfigDict, *, chip: str | None, num_devices: int, platform: str,
         batch_sizes: Sequence[int], dtypes: Sequence[str], train_steps: int, sample_steps: int,
         estimates: list[dict[str, Any]], cache_dir: str | None) -> str:
  """What run_device_check will compile and run, in order, with the packaged compile estimate of each train step
  on this slice where there is one."""
  num = benchmark.format_number
  lines = [f"Plan on {num_devices} x {chip or platform} (config `{benchmark_config.name}`); compilation cache: "
           f"{cache_dir or 'off'}.",
           f"1. lower every function for {platform}",
           f"2. smoke training, {train_steps} steps (compiles both smoke steps)"]
  for dtype in dtypes:
    for i, batch_size in enumerate(batch_sizes):
      line = f"3. {benchmark_config.name} train step, {dtype}, batch {batch_size}: compile, 2 warm-up + timed steps"
      if i == 0 and sample_steps:
        line += f"; DDIM-{sample_steps} at batch {batch_size}"
      row = tpu_estimates.lookup(estimates, chip, num_devices, dtype, batch_size)
      if row is None:
        line += "\n     no compile estimate for this slice (encdiff-compile --save_estimates makes one)"
      elif not row["ok"]:
        line += f"\n     the TPU compiler rejected it on the CPU host: {row['error']}"
      else:
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        line += (f"\n     estimate ({row['source']}): {num(row['step_ms'])} ms/step, "
                 f"{num(row['images_per_s'], 1, 0)} img/s, MFU {mfu}, {num(row['bytes_per_device'], 1e9, 2)} GB per "
                 f"chip ({'fits' if row['fits'] else 'DOES NOT FIT'}); compiled in {row['compile_s']:.0f} s on the "
                 f"CPU host ({row['date']}: {row['command']})")
      lines.append(line)
  return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
  """The report as Markdown: what ran where, one row per (dtype, batch size), then each check's outcome."""
  lines = [f"Device check, {report['date']}: {report['num_devices']} x {report['device_kind']} "
           f"({report['platform']}), JAX {report['jax_version']}, config `{report['config']}`.", ""]
  smoke = report.get("smoke_training")
  if smoke:
    lines += [f"Smoke training: {smoke['steps']} steps in {smoke['wall_s']} s (compilation included), final loss "
              f"{smoke['loss']:.4f}, {smoke['images_per_s']:.0f} img/s at the last log point.", ""]
  num = benchmark.format_number
  lines += ["| dtype | batch | step ms | img/s | MFU | memory GB (XLA plan) | peak GB | compile s | DDIM ms/img | "
            "estimated step ms (measured / estimated) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in report["benchmark"]:
    ddim = f"{num(r['sample_ms_per_image'], 1, 2)} ({r['sample_steps']} steps)" if r["sample_steps"] else "-"
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    lines.append(f"| {r['compute_dtype']} | {r['batch_size']} | {num(r['train_step_ms'])} | "
                 f"{num(r['images_per_s'], 1, 0)} | {mfu} | {num(r['memory_bytes'], 1e9, 2)} | "
                 f"{num(r['peak_device_memory_bytes'], 1e9, 2)} | {num(r['compile_s'])} | {ddim} | "
                 f"{_versus_estimate(r)} |")
  lines += ["", "| check | result | seconds |", "|---|---|---:|"]
  for name, c in report["checks"].items():
    outcome = "ok" if c["ok"] else "FAILED: " + c["error"].replace("|", "\\|")
    lines.append(f"| {name} | {outcome} | {c['seconds']} |")
  return "\n".join(lines) + "\n"


def _versus_estimate(row: dict[str, Any]) -> str:
  if row.get("estimated_step_ms") is None:
    return "-"
  return f"{row['estimated_step_ms']:.1f} ({row['measured_over_estimated']:.2f}x)"
