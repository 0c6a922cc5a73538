"""Ahead-of-time compilation for a TPU slice on a host without one (experiments/compile.py).

What `encdiff-lower` stops short of: the TPU compiler itself (libtpu) compiles every function a run compiles
(both stages' train steps, the encoder pass, the DDIM sampler) for the devices of a named topology, on the
("data", "fsdp") mesh a run would use, with the config as a TPU runs it (`compute_dtype=auto` -> bfloat16, the
`auto` kernels -> XLA's). Per function the report has:

  * whether the compiler accepted it (or its first error line), and the compile seconds on this host;
  * XLA's memory plan per device (arguments, outputs, aliasing, temporaries, peak) against the chip's nominal HBM
    (the runtime keeps a little of it for itself);
  * the compiler's cost analysis per device: FLOPs, bytes accessed, `optimal_seconds` (the TPU cost model's time);
  * the collectives of the compiled HLO in wire bytes per device by kind (tools/collectives.py), and for the
    diffusion step the least a step on the mesh must send;
  * how often GSPMD logged an "involuntary full rematerialization" while compiling.

From these an estimate: step time = computation + wire bytes / the chip's one-direction ICI bandwidth (no overlap
of communication with compute assumed, so an upper-side estimate of a step the cost model prices right), where the
computation is `optimal_seconds` or, where the cost model gives none (it returns a negative number for the
official-size train step), the roofline of the compiled program's FLOPs and bytes accessed (`compute_model`),
images/s, MFU against the published peak, and the share of the step that is communication. Every estimate
carries ESTIMATE_SOURCE: it is the compiler's cost model, not a measurement, until a device confirms it
(`encdiff-device-check` on a TPU compares the two).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import ml_collections

from concept_diffusion import parallel, perf
from concept_diffusion.checkpoint import first_line
from concept_diffusion.config import validate_config
from concept_diffusion.models.encdiff import compute_dtype_name
from concept_diffusion.tools import collectives, lower, tpu_topology

ESTIMATE_SOURCE = "compiler cost model, not a measurement"


def config_for_slice(config: ml_collections.ConfigDict, mesh_shape: tuple[int, int] | None = None,
                     batch_size: int | None = None) -> ml_collections.ConfigDict:
  """The config as the TPU runs it (lower.for_platform), on `mesh_shape` (data, fsdp) and with the diffusion
  stage's global batch `batch_size`, where given."""
  config = lower.for_platform(config, "tpu")
  if mesh_shape is not None:
    config.mesh.data, config.mesh.fsdp = mesh_shape
  if batch_size is not None:
    config.train.batch_size = batch_size
  validate_config(config)
  return config


def compute_seconds(cost: dict[str, float | None], chip: tpu_topology.Chip,
                    peak_flops: float | None) -> tuple[float | None, str | None]:
  """(seconds of the program's computation, how): the TPU cost model's `optimal_seconds` where it gives one; for
  large programs it returns a negative number instead, and then the roofline of the compiler's own FLOPs and bytes
  accessed at the chip's peak FLOP/s and HBM bandwidth."""
  if cost.get("optimal_seconds") and cost["optimal_seconds"] > 0:
    return cost["optimal_seconds"], "optimal_seconds"
  flops, accessed = cost.get("flops_per_device"), cost.get("bytes_accessed_per_device")
  if not flops or not accessed or not peak_flops:
    return None, None
  return max(flops / peak_flops, accessed / chip.hbm_bytes_per_s), "roofline"


def estimate(cost: dict[str, float | None], wire_bytes: int, chip: tpu_topology.Chip, peak_flops: float | None,
             images: int) -> dict[str, Any] | None:
  """Step time, images/s, MFU and communication share from the compiler's numbers (module docstring)."""
  compute_s, how = compute_seconds(cost, chip, peak_flops)
  if compute_s is None:
    return None
  communication_s = wire_bytes / chip.ici_bytes_per_s if chip.ici_bytes_per_s else None
  step_s = compute_s + (communication_s or 0.0)
  return {
      "source": ESTIMATE_SOURCE, "compute_s": compute_s, "compute_model": how,
      "communication_s": communication_s, "step_s": step_s,
      "communication_share": None if communication_s is None else communication_s / step_s,
      "images_per_s": images / step_s if images else None,
      "mfu": perf.mfu(cost.get("flops_per_device"), step_s, peak_flops),
  }


def _cost(compiled: Any) -> dict[str, float | None]:
  analysis = perf.first_cost_analysis(compiled)
  read = lambda key: float(analysis[key]) if analysis.get(key) is not None else None  # noqa: E731
  return {"flops_per_device": read("flops"), "bytes_accessed_per_device": read("bytes accessed"),
          "optimal_seconds": read("optimal_seconds")}


def compile_target(target: lower.Target, chip: tpu_topology.Chip, peak_flops: float | None) -> dict[str, Any]:
  """One function's report entry; a compiler error is recorded, never raised."""
  start = time.perf_counter()
  compiled, error = None, ""
  with collectives.captured_stderr() as log:
    try:
      compiled = target.trace().lower().compile()
    except Exception as e:  # pylint: disable=broad-except  (a rejected function is a result to report)
      error = first_line(e)
  seconds = time.perf_counter() - start
  remat = collectives.count_remat_warnings(log[0])
  # The GSPMD warnings stay visible; libtpu's start-up chatter on a host without TPUs does not.
  sys.stderr.write("".join(line + "\n" for line in log[0].splitlines() if collectives.REMAT_WARNING in line.lower()))
  entry: dict[str, Any] = {"function": target.name, "ok": compiled is not None, "error": error,
                           "compile_s": round(seconds, 2), "remat_warnings": remat, "images_per_call": target.images}
  if compiled is None:
    return entry
  memory = perf.compiled_memory(compiled) or {}
  # The larger of the buffer assignment's peak and arguments + outputs - aliased + temporaries: on TPU either can
  # be the larger (the peak leaves out some temporaries, temp_size_in_bytes is 0 for others), and "fits" must not
  # be flattered.
  sizes = [v for v in (memory.get("peak_bytes"), memory.get("total_bytes")) if v]
  per_device = max(sizes) if sizes else None
  cost = _cost(compiled)
  comm = collectives.collective_bytes(compiled.as_text())
  entry.update(
      memory=memory, bytes_per_device=per_device, hbm_bytes=chip.hbm_bytes,
      fits=None if per_device is None else per_device <= chip.hbm_bytes, cost=cost,
      collective_wire_bytes_per_device=comm["total"], collective_wire_bytes_by_kind=comm["by_kind"],
      collectives_by_kind=comm["count_by_kind"],
      estimate=estimate(cost, comm["total"], chip, peak_flops, target.images))
  if target.communication is not None:
    bound = target.communication(compiled)
    entry.update(min_collective_wire_bytes_per_device=bound["min_collective_bytes_per_step"],
                 collective_ratio=bound["collective_ratio"])
  return entry


def compile_for_topology(config: ml_collections.ConfigDict, topology: str, *,
                         mesh_shape: tuple[int, int] | None = None, batch_size: int | None = None,
                         functions: Sequence[str] | None = None) -> dict[str, Any]:
  """The report for one topology (module docstring); `functions` limits it to those target names."""
  chip = tpu_topology.chip_of(topology)
  devices = tpu_topology.topology_devices(topology)
  config = config_for_slice(config, mesh_shape, batch_size)
  mesh = parallel.make_mesh(config.mesh, devices)
  dtype = compute_dtype_name(config, "tpu")
  peak = perf.published_peak_flops(devices[0].device_kind, dtype)
  all_targets = lower.targets(config, mesh)
  unknown = sorted(set(functions or ()) - {t.name for t in all_targets})
  if unknown:
    raise ValueError(f"--functions: unknown {unknown}; this config compiles {[t.name for t in all_targets]}.")
  import jax  # pylint: disable=g-import-not-at-top
  return {
      "config": config.name, "topology": topology, "chip": chip.name, "device_kind": devices[0].device_kind,
      "num_devices": len(devices), "mesh": dict(mesh.shape), "compute_dtype": dtype,
      "batch_size": config.train.batch_size, "peak_flops_per_chip": peak,
      "ici_bytes_per_s_per_chip": chip.ici_bytes_per_s, "estimate_source": ESTIMATE_SOURCE,
      "jax_version": jax.__version__, "libtpu_version": _libtpu_version(),
      "functions": [compile_target(t, chip, peak) for t in all_targets if not functions or t.name in functions],
  }


def reestimate(report: dict[str, Any]) -> dict[str, Any]:
  """A saved report with every estimate made again from its compiled numbers (cost, collectives) and the current
  chip table and estimate rules, without compiling again."""
  chip = tpu_topology.CHIPS[report["chip"]]
  functions = [dict(f, estimate=estimate(f["cost"], f["collective_wire_bytes_per_device"], chip,
                                         report["peak_flops_per_chip"], f["images_per_call"])) if f["ok"] else f
               for f in report["functions"]]
  return dict(report, functions=functions)


def _libtpu_version() -> str | None:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return None


def _gb(value: float | None) -> str:
  return "-" if value is None else f"{value / 1e9:.2f}"


def format_report(report: dict[str, Any]) -> str:
  """One line per function; the estimate columns say what they are."""
  mesh = "x".join(str(n) for n in report["mesh"].values())
  lines = [f"{report['config']} on {report['topology']} ({report['num_devices']} x {report['device_kind']}), mesh "
           f"{mesh} (data x fsdp), {report['compute_dtype']}, batch {report['batch_size']}; HBM "
           f"{tpu_topology.CHIPS[report['chip']].hbm_bytes / tpu_topology.GIB:.0f} GiB per chip",
           f"est. = {ESTIMATE_SOURCE}"]
  header = ("function", "result", "compile s", "GB/device", "fits", "GFLOP/device", "est. ms", "est. img/s",
            "est. MFU", "comm MB/device", "est. comm share", "remat")
  rows = [header]
  for f in report["functions"]:
    if not f["ok"]:
      rows.append((f["function"], "FAILED", f"{f['compile_s']:.1f}") + ("",) * (len(header) - 3))
      continue
    est = f["estimate"] or {}
    share = est.get("communication_share")
    rows.append((
        f["function"], "OK", f"{f['compile_s']:.1f}", _gb(f["bytes_per_device"]),
        "-" if f["fits"] is None else ("yes" if f["fits"] else "NO"),
        "-" if f["cost"]["flops_per_device"] is None else f"{f['cost']['flops_per_device'] / 1e9:.1f}",
        "-" if not est else f"{est['step_s'] * 1e3:.2f}",
        "-" if not est.get("images_per_s") else f"{est['images_per_s']:.0f}",
        "-" if est.get("mfu") is None else f"{100 * est['mfu']:.1f}%",
        f"{f['collective_wire_bytes_per_device'] / 1e6:.1f}",
        "-" if share is None else f"{100 * share:.1f}%", str(f["remat_warnings"])))
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows]
  lines += [f"{f['function']}: FAILED {f['error']}" for f in report["functions"] if not f["ok"]]
  return "\n".join(lines)
