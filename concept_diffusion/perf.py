"""Performance arithmetic for experiments/benchmark.py: device peaks, FLOPs and memory of compiled steps, MFU.

Everything here reads what XLA and the runtime report; nothing is estimated. Where a number is not available
(a device kind without a published peak, a backend without memory statistics) the answer is None, never a guess.
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from concept_diffusion.errors import UserError

# Published dense (no structured sparsity) peak FLOP/s per chip, keyed by a substring of `device.device_kind`;
# the first match wins, so more specific names come first. Sources:
#   TPU: Cloud TPU system architecture pages, https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e
#        (bf16 TFLOPS per chip: v2 45, v3 123, v4 275, v5e 197, v5p 459, v6e 918).
#   GPU: NVIDIA datasheets (A100: nvidia.com/en-us/data-center/a100, H100/H200: .../h100, .../h200, L4: .../l4),
#        the dense tensor-core numbers (the datasheets' headline numbers with sparsity are twice these).
# "float32" is the peak that an fp32 matmul reaches at XLA's *default* precision, which is not IEEE fp32:
#   on TPU, DEFAULT precision runs f32 dots as one bf16 pass on the MXU, so the bf16 peak is the ceiling;
#   on Ampere and later GPUs, JAX's DEFAULT precision lets cuBLAS/cuDNN use TF32 tensor cores, so the TF32 peak.
# Set jax_default_matmul_precision="highest" and these fp32 MFUs are no longer comparable (the ceiling is lower).
_T = 1e12
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("TPU v2", {"bfloat16": 45 * _T, "float32": 45 * _T}),
    ("TPU v3", {"bfloat16": 123 * _T, "float32": 123 * _T}),
    ("TPU v4", {"bfloat16": 275 * _T, "float32": 275 * _T}),
    ("TPU v5 lite", {"bfloat16": 197 * _T, "float32": 197 * _T}),  # v5e
    ("TPU v5e", {"bfloat16": 197 * _T, "float32": 197 * _T}),
    ("TPU v5p", {"bfloat16": 459 * _T, "float32": 459 * _T}),
    ("TPU v5", {"bfloat16": 459 * _T, "float32": 459 * _T}),  # v5p reports "TPU v5"
    ("TPU v6 lite", {"bfloat16": 918 * _T, "float32": 918 * _T}),  # v6e (Trillium)
    ("TPU v6e", {"bfloat16": 918 * _T, "float32": 918 * _T}),
    ("A100", {"bfloat16": 312 * _T, "float32": 156 * _T}),  # SXM and PCIe; fp32 = TF32
    ("H100 PCIe", {"bfloat16": 756 * _T, "float32": 378 * _T}),
    ("H100", {"bfloat16": 989 * _T, "float32": 494 * _T}),  # SXM (HBM3); fp32 = TF32
    ("H200", {"bfloat16": 989 * _T, "float32": 494 * _T}),  # same compute as H100 SXM
    ("L4", {"bfloat16": 121 * _T, "float32": 60 * _T}),  # fp32 = TF32
)


def published_peak_flops(device_kind: str, dtype: str) -> float | None:
  """Per-chip peak FLOP/s for `dtype` ("float32" | "bfloat16"); None when the table has no entry."""
  for key, peaks in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


def measure_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 10,
                        device: Any = None) -> float:
  """Best FLOP/s of a (size x size) @ (size x size) matmul on `device`: a measured ceiling for CPUs.

  The best of `repeats` timed calls (after one warm-up) is used, since other processes can only slow a
  call down; 2048 is large enough for the BLAS kernel's steady state and fits in a second on two cores.
  """
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  b = jax.device_put(jnp.full((size, size), 0.5, dtype), device)
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  matmul(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best


def device_peak_flops(device: Any, dtype: str) -> tuple[float | None, str]:
  """(peak FLOP/s per device, where it came from): measured on CPUs, the published table otherwise."""
  if device.platform == "cpu":
    return measure_matmul_peak(dtype, device=device), f"measured: fastest {dtype} 2048^3 matmul on this CPU"
  peak = published_peak_flops(device.device_kind, dtype)
  if peak is None:
    return None, (f"no published peak for device kind {device.device_kind!r} ({dtype}); MFU is not reported. "
                  "Add it to concept_diffusion/perf.py PEAK_FLOPS with its source.")
  return peak, f"published peak for {device.device_kind} ({dtype}), see concept_diffusion/perf.py"


def first_cost_analysis(compiled: Any) -> dict:
  """XLA's cost analysis of a compiled computation as one dict ("flops", "bytes accessed", on TPU
  "optimal_seconds"); older jaxlibs return a list with one dict per computation, newer ones the dict itself."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    return analysis[0] if analysis else {}
  return analysis or {}


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled computation by XLA's cost analysis (per device when SPMD-partitioned)."""
  flops = first_cost_analysis(compiled).get("flops")
  return float(flops) if flops is not None and flops >= 0 else None


def compiled_memory(compiled: Any) -> dict[str, int] | None:
  """XLA's static memory plan of a compiled computation, in bytes (per device)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  out = {
      "argument_bytes": int(stats.argument_size_in_bytes),
      "output_bytes": int(stats.output_size_in_bytes),
      "alias_bytes": int(stats.alias_size_in_bytes),  # outputs that reuse (donated) argument buffers
      "temp_bytes": int(stats.temp_size_in_bytes),
      "generated_code_bytes": int(stats.generated_code_size_in_bytes),
  }
  # What the call needs live at once: arguments, temporaries, and the outputs that do not alias an argument.
  out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  # The buffer assignment's own peak, where the backend reports one (TPU: its temporaries are counted here and
  # not in temp_size_in_bytes); None elsewhere.
  peak = getattr(stats, "peak_memory_in_bytes", None)
  out["peak_bytes"] = int(peak) if peak else None
  return out


def peak_device_memory(devices: Sequence[Any]) -> int | None:
  """The largest `peak_bytes_in_use` over `devices`; None where the backend keeps no statistics (CPU)."""
  peaks = []
  for device in devices:
    try:
      stats = device.memory_stats()
    except (NotImplementedError, RuntimeError):
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def mfu(flops_per_step: float | None, step_seconds: float, peak_flops: float | None) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s over peak FLOP/s (same device count on both sides); None if unknown."""
  if flops_per_step is None or peak_flops is None or peak_flops <= 0 or step_seconds <= 0:
    return None
  return flops_per_step / step_seconds / peak_flops


def check_batch_divides(batch_size: int, num_devices: int) -> None:
  if batch_size < 1:
    raise UserError(f"batch size must be >= 1, got {batch_size}.")
  if batch_size % num_devices:
    raise UserError(f"batch size {batch_size} does not divide over the {num_devices} devices JAX sees; use a "
                     f"multiple of {num_devices} (or limit the devices, e.g. CUDA_VISIBLE_DEVICES).")


def time_calls(fn, num: int) -> list[float]:
  """Wall seconds of `num` calls of fn(), each waited for with block_until_ready."""
  times = []
  for _ in range(num):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def summarize(times: Sequence[float]) -> dict[str, float]:
  """Median and 90th percentile in milliseconds."""
  arr = np.asarray(times, np.float64) * 1e3
  return {"median_ms": float(np.median(arr)), "p90_ms": float(np.percentile(arr, 90))}


def run_peak_flops(per_device: float | None, platform: str) -> float | None:
  """The peak of all the run's devices from one device's: x devices, but on CPU x processes, since one process's
  (fake) CPU devices share the cores its measured matmul already used."""
  if per_device is None:
    return None
  return per_device * (jax.process_count() if platform == "cpu" else jax.device_count())


class LoopMfu:
  """MFU of a training loop's step, for its log records: the compiled step's FLOPs (`step.flops_per_step`, all
  devices, known once the step has run) at the measured steps/s, over the devices' peak. The peak is published
  for TPUs/GPUs; on a CPU it is the best of a few 1024^3 matmuls, measured once per process at the first log
  point (the benchmark's 2048^3 measurement is steadier; this one must cost a training run ~0.1 s)."""

  def __init__(self, step: Any, dtype: str):
    self.step, self.dtype = step, dtype
    self._peak: float | None = None
    self._measured = False

  def peak_flops(self) -> float | None:
    """All devices of the run (run_peak_flops)."""
    if not self._measured:
      self._measured = True
      device = jax.local_devices()[0]
      if device.platform == "cpu":
        peak = measure_matmul_peak(self.dtype, size=1024, repeats=5, device=device)
      else:
        peak = published_peak_flops(device.device_kind, self.dtype)
      self._peak = run_peak_flops(peak, device.platform)
    return self._peak

  def __call__(self, steps_per_s: float) -> float | None:
    flops = getattr(self.step, "flops_per_step", None)
    if flops is None or steps_per_s <= 0:
      return None
    return mfu(flops, 1.0 / steps_per_s, self.peak_flops())
