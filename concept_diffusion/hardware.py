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
# hardware, which oneDNN/XLA:CPU use for bf16 matmuls.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16(backend: str) -> bool:
  """Whether `backend`'s devices compute in bfloat16 natively: TPUs; GPUs of compute capability >= 8.0 (Ampere
  and later; ROCm GPUs, which report none, are assumed to); CPUs with one of CPU_BF16_FLAGS."""
  if backend == "tpu":
    return True
  if backend in ("gpu", "cuda", "rocm"):
    try:
      devices = jax.devices(backend)
    except RuntimeError:  # lowering for a GPU this host does not have: what current data-centre GPUs do
      return True
    capabilities = [getattr(d, "compute_capability", None) for d in devices]
    return all(c is None or float(c) >= 8.0 for c in capabilities)
  if backend == "cpu":
    return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)
  return False
