r"""Compiles a config's train steps, encoder pass and DDIM sampler for a TPU slice on this host, without a TPU.

  encdiff-compile --config=procedural_shapes --topology=v5e:2x4 [--mesh=4,2] [--batch_size=256] [--json=out.json]
  encdiff-compile --config=procedural_shapes --topology=v5e:2x4,v6e:2x4 --batch_size=128,256,1024 \
      --functions=diffusion_train_step --config.train.compute_dtype=float32

Needs libtpu (the [tpu] extra). Per function: OK or the compiler's error, compile seconds, memory per device
against the chip's HBM, FLOPs, the collectives of the compiled program, remat warnings, and estimated step time,
images/s, MFU and communication share (the compiler's cost model, not a measurement). Exits 1 if any function
failed to compile. concept_diffusion/tools/aot_compile.py says how each number is made.
"""
import os

# Compiling for a topology needs no accelerator; without this JAX would also try to start libtpu as this host's
# backend (and find no TPU).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from concept_diffusion.tools import aot_compile, cli, tpu_estimates, tpu_topology  # noqa: E402
from concept_diffusion.workdir import write_json  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config: a name in configs/ or a .py file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_list("topology", ["v5e:2x4"], "TPU topologies, <chip>:<shape>: v4:2x2x1, v5e:2x4, "
                              "v5p:2x2x1, v6e:2x4, v5e:16x16, ...")
_MESH = flags.DEFINE_string("mesh", None, "data,fsdp (one may be -1: the rest of the chips); default the config's.")
_BATCH_SIZE = flags.DEFINE_list("batch_size", None, "Global batch size(s) of the diffusion step; default the "
                                "config's train.batch_size.")
_FUNCTIONS = flags.DEFINE_list("functions", None, "Only these functions (first_stage_train_step, "
                               "diffusion_train_step, encode, ddim_sampler_<steps>); default all.")
_JSON = flags.DEFINE_string("json", None, "Also write the reports to this JSON file.")
_SAVE_ESTIMATES = flags.DEFINE_string(
    "save_estimates", None, "Merge one row per function into this estimates file (the packaged one, "
    "concept_diffusion/tools/tpu_estimates.json, is what encdiff-device-check plans and compares with).")
# The command as typed, for the estimates file (cli.run resolves --config names to paths), less the flags that
# only say where the output goes.
_COMMAND = " ".join(["encdiff-compile"] + [a for a in sys.argv[1:]
                                           if not a.startswith(("--json=", "--save_estimates="))])
_REESTIMATE = flags.DEFINE_string("reestimate", None, "Instead of compiling, make the estimates of a --json report "
                                  "again (e.g. after a change of the chip table) and print / save them.")


def _ints(name: str, values: list[str], what: str) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError as e:
    raise ValueError(f"--{name} must be {what}, got {','.join(values)}.") from e


def _main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _REESTIMATE.value:
    with open(_REESTIMATE.value, encoding="utf-8") as f:
      reports = [aot_compile.reestimate(r) for r in json.load(f)["reports"]]
    _write(reports)
    return
  if _CONFIG.value is None:
    raise ValueError("--config is required (a name in configs/ or a .py file).")
  if not tpu_topology.libtpu_installed():
    print(f"error: {tpu_topology.LIBTPU_MISSING}", file=sys.stderr)
    sys.exit(2)
  mesh_shape = None
  if _MESH.value:
    mesh_shape = tuple(_ints("mesh", _MESH.value.split(","), "two integers, data,fsdp"))
    if len(mesh_shape) != 2:
      raise ValueError(f"--mesh must be two integers, data,fsdp (e.g. 4,2), got {_MESH.value}.")
  batch_sizes = _ints("batch_size", _BATCH_SIZE.value, "integers separated by commas") if _BATCH_SIZE.value else [None]
  reports = []
  for topology in _TOPOLOGY.value:
    for batch_size in batch_sizes:
      report = aot_compile.compile_for_topology(_CONFIG.value, topology, mesh_shape=mesh_shape,
                                                batch_size=batch_size, functions=_FUNCTIONS.value)
      report["command"] = _COMMAND
      print(aot_compile.format_report(report), flush=True)
      reports.append(report)
  _write(reports)
  failed = [f"{r['topology']} batch {r['batch_size']}: {f['function']}" for r in reports for f in r["functions"]
            if not f["ok"]]
  if failed:
    print(f"{len(failed)} function(s) failed to compile: {'; '.join(failed)}", file=sys.stderr)
    sys.exit(1)


def _write(reports: list[dict]) -> None:
  """The reports to --json and, as rows, into --save_estimates (each row with the command that compiled it)."""
  if _REESTIMATE.value:
    for report in reports:
      print(aot_compile.format_report(report), flush=True)
  if _JSON.value:
    write_json(_JSON.value, {"reports": reports}, indent=2)
    print(f"wrote {_JSON.value}")
  if _SAVE_ESTIMATES.value:
    rows = tpu_estimates.rows_from_reports(reports, datetime.date.today().isoformat())
    tpu_estimates.merge(_SAVE_ESTIMATES.value, rows)
    print(f"merged {len(rows)} row(s) into {_SAVE_ESTIMATES.value}")


def main():
  cli.run(_main)


if __name__ == "__main__":
  main()
