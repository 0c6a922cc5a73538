"""TPU slices this host can compile for without a TPU, and what their chips have.

libtpu describes a TPU topology ("v5e:2x4": 8 v5e chips) on any host, and JAX compiles for its devices as it would
on the slice (`jax.experimental.topologies`). The chip table holds the published figures the compile report
sets its numbers against: HBM capacity, HBM and interconnect bandwidth. Peak FLOP/s come from
concept_diffusion/perf.py, the table MFU uses everywhere.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

GIB = 1024 ** 3
LIBTPU_MISSING = ("libtpu is not installed, so this host cannot compile for TPUs: install the [tpu] extra "
                  "(pip install -e '.[tpu]', a 213 MB wheel, 684 MB installed).")


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures (Cloud TPU system architecture pages, https://cloud.google.com/tpu/docs/v4, .../v5e,
  .../v5p-training, .../v6e, read 2026-12-08)."""
  name: str
  hbm_bytes: int
  hbm_bytes_per_s: float
  # One direction: half the published bidirectional ICI bandwidth per chip. A ring collective sends and receives
  # at once, so its time is its wire bytes over this. None where the page gives no per-chip figure (v4).
  ici_bytes_per_s: float | None
  # Two TensorCores per chip that JAX drives as one device ("megacore"), as on the slice itself.
  megacore: bool = False


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 1200e9, None, megacore=True),
    "v5e": Chip("v5e", 16 * GIB, 819e9, 400e9 / 2),
    "v5p": Chip("v5p", 95 * GIB, 2765e9, 1200e9 / 2, megacore=True),
    "v6e": Chip("v6e", 32 * GIB, 1638e9, 800e9 / 2),
}


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def chip_of(topology: str) -> Chip:
  """The chip of a topology name `<chip>:<shape>`, e.g. "v5e:2x4", "v5p:2x2x1"."""
  name = topology.split(":", 1)[0].lower()
  if ":" not in topology or name not in CHIPS:
    raise ValueError(f"--topology={topology}: expected <chip>:<shape> with chip one of {', '.join(CHIPS)}, "
                     "e.g. v5e:2x4 (8 chips), v5p:2x2x1 (4 chips).")
  return CHIPS[name]


def topology_devices(topology: str) -> list[Any]:
  """The compile-only devices of a TPU slice, one per chip (megacore chips as one device, as JAX runs them)."""
  chip = chip_of(topology)
  if not libtpu_installed():
    raise RuntimeError(LIBTPU_MISSING)
  # libtpu takes a host-wide lock file so that two processes never drive the same TPU chips; a topology
  # description drives none, so processes that only compile (tests in parallel, a table built in several
  # shells) need not queue on it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    description = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                               chip_config_name="megacore" if chip.megacore else "default")
  except Exception as e:  # pylint: disable=broad-except  (libtpu's own message says what is wrong with the name)
    raise ValueError(f"--topology={topology}: libtpu cannot describe it: {str(e).splitlines()[0]}") from e
  return list(description.devices)
