"""What the hardware runs natively, for the choices that depend on it (train.compute_dtype="auto")."""
from __future__ import annotations

import functools

import jax


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
  """This host's CPU feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


# AVX512-BF16 (Zen 4, Cooper Lake and later Xeons) and AMX (Sapphire Rapids and later): bf16 dot products in
# hardware. XLA:CPU (JAX 0.10.2) uses them only for a bf16 matmul whose result is float32 (2048^3: ~280 GFLOP/s
# against ~90 in float32 on the development VM's Emerald Rapids); a bf16 result, and every convolution, run no
# faster than float32, so the whole UNet step was 1.2x *slower* in bf16 there (docs/performance.md, "bf16 and
# processes on a CPU"). Hence "auto" stays float32 on CPUs whatever their flags; the benchmark reports them.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags() -> list[str]:
  """Which of CPU_BF16_FLAGS this host's CPU has (for reports)."""
  return [flag for flag in CPU_BF16_FLAGS if flag in cpu_flags()]


def native_bf16(backend: str) -> bool:
  """Whether train.compute_dtype="auto" computes in bfloat16 on `backend`: on TPUs; on GPUs of compute capability
  >= 8.0 (Ampere and later; ROCm GPUs, which report none, are assumed to); not on CPUs (see CPU_BF16_FLAGS)."""
  if backend == "tpu":
    return True
  if backend in ("gpu", "cuda", "rocm"):
    try:
      devices = jax.devices(backend)
    except RuntimeError:  # lowering for a GPU this host does not have: what current data-centre GPUs do
      return True
    capabilities = [getattr(d, "compute_capability", None) for d in devices]
    return all(c is None or float(c) >= 8.0 for c in capabilities)
  return False
