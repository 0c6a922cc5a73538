"""The compile estimates kept with the package (tpu_estimates.json), for the device check to plan with and to
compare against.

`encdiff-compile --save_estimates=concept_diffusion/tools/tpu_estimates.json` merges one row per (chip, devices,
mesh, dtype, batch, function) of its reports into the file, each with the command that produced it; docs/scaling.md
shows the same rows. On a TPU, `encdiff-device-check` looks up the row of the step it measures and reports
measured / estimated, so that the first device loan says how far the cost model is off.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

from concept_diffusion.tools.tpu_topology import CHIPS
from concept_diffusion.workdir import write_json

PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tpu_estimates.json")
_KEY = ("chip", "num_devices", "mesh", "compute_dtype", "batch_size", "function")


def rows_from_reports(reports: Iterable[dict[str, Any]], date: str) -> list[dict[str, Any]]:
  """One flat row per compiled function of encdiff-compile's reports (each report carries its "command")."""
  rows = []
  for report in reports:
    for f in report["functions"]:
      est = f.get("estimate") or {}
      rows.append({
          "chip": report["chip"], "num_devices": report["num_devices"], "mesh": list(report["mesh"].values()),
          "compute_dtype": report["compute_dtype"], "batch_size": report["batch_size"], "function": f["function"],
          "ok": f["ok"], "error": f["error"], "compile_s": f["compile_s"],
          "bytes_per_device": f.get("bytes_per_device"), "fits": f.get("fits"),
          "flops_per_device": (f.get("cost") or {}).get("flops_per_device"),
          "collective_wire_bytes_per_device": f.get("collective_wire_bytes_per_device"),
          "step_ms": None if not est else est["step_s"] * 1e3,
          "compute_ms": None if not est else est["compute_s"] * 1e3, "compute_model": est.get("compute_model"),
          "images_per_s": est.get("images_per_s"), "mfu": est.get("mfu"),
          "communication_share": est.get("communication_share"), "source": report["estimate_source"],
          "config": report["config"], "jax_version": report["jax_version"],
          "libtpu_version": report["libtpu_version"], "command": report["command"], "date": date,
      })
  return rows


def load(path: str = PACKAGED) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return json.load(f)["rows"]


def merge(path: str, new_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The rows of `path` with `new_rows` replacing those of the same key, written back (sorted, stable)."""
  keyed = {_key(r): r for r in load(path)}
  keyed.update({_key(r): r for r in new_rows})
  rows = sorted(keyed.values(), key=lambda r: tuple(str(v) for v in _key(r)))
  write_json(path, {"rows": rows}, indent=1)
  return rows


def _key(row: dict[str, Any]) -> tuple:
  return tuple(tuple(row[k]) if isinstance(row[k], list) else row[k] for k in _KEY)


def chip_of_device_kind(device_kind: str) -> str | None:
  """"TPU v5 lite" -> "v5e", "TPU v5" -> "v5p", "TPU v6 lite" -> "v6e", "TPU v4" -> "v4"; None for others."""
  kind = device_kind.lower()
  for name, marker in (("v5e", "v5 lite"), ("v5e", "v5e"), ("v6e", "v6 lite"), ("v6e", "v6e"), ("v5p", "v5"),
                       ("v4", "v4")):
    if marker in kind and name in CHIPS:
      return name
  return None


def lookup(rows: list[dict[str, Any]], chip: str | None, num_devices: int, compute_dtype: str, batch_size: int,
           function: str = "diffusion_train_step", mesh: tuple[int, int] | None = None) -> dict[str, Any] | None:
  """The row for a step on `num_devices` chips (mesh default: all on data, as the device check runs it)."""
  mesh = list(mesh or (num_devices, 1))
  for row in rows:
    if (row["chip"], row["num_devices"], row["mesh"], row["compute_dtype"], row["batch_size"], row["function"]) == (
        chip, num_devices, mesh, compute_dtype, batch_size, function):
      return row
  return None
