r"""Measures the accelerator JAX sees in one call: lowering, a smoke training, the official-size benchmark at three
batch sizes in float32 and bfloat16, and DDIM sampling; writes one JSON and one Markdown table.

  encdiff-device-check [--out=device_check] [--batch_sizes=32,128,256] [--dtypes=float32,bfloat16] \
      [--train_steps=50] [--sample_steps=200]
  encdiff-device-check --plan [--plan_topology=v5e:2x4]   # what it will do, with the compile estimates; runs nothing

Sized to finish in under 8 minutes on one GPU (the compiles dominate; the persistent compilation cache makes a
second call quicker). Exits 1 if any check failed; the report says which and why. On a CPU-only host it runs the
same checks (slowly: pass --batch_sizes=32 --dtypes=float32 --sample_steps=10). concept_diffusion/tools/
device_check.py lists the checks.
"""
import math
import os
import sys

from absl import flags, logging
import jax

from concept_diffusion.tools import cli, device_check, tpu_estimates, tpu_topology
from concept_diffusion.workdir import atomic_path, write_json
from configs import procedural_shapes, smoke

_OUT = flags.DEFINE_string("out", "device_check", "Folder for device_check.json and device_check.md.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["32", "128", "256"], "Global batch sizes of the benchmark.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes of the benchmark.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 50, "Steps of the smoke training.")
_BENCH_STEPS = flags.DEFINE_integer("bench_steps", 10, "Timed train steps per batch size and dtype.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 200, "DDIM steps timed at the first batch size (0: skip).")
_PLAN = flags.DEFINE_bool("plan", False, "Print what would be compiled and run, with the packaged compile estimates "
                          "(concept_diffusion/tools/tpu_estimates.json), and exit.")
_PLAN_TOPOLOGY = flags.DEFINE_string("plan_topology", None, "With --plan on a host that is not the TPU: the slice "
                                     "to plan for, <chip>:<shape> (e.g. v5e:2x4); default the devices JAX sees.")


def _main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cli.enable_compilation_cache()
  try:
    batch_sizes = [int(b) for b in _BATCH_SIZES.value]
  except ValueError as e:
    raise ValueError(f"--batch_sizes must be integers separated by commas, got {_BATCH_SIZES.value}.") from e
  if _PLAN.value:
    print(_plan(batch_sizes))
    return
  report = device_check.run_device_check(
      procedural_shapes.get_config(), smoke.get_config(), batch_sizes=batch_sizes, dtypes=_DTYPES.value,
      train_steps=_TRAIN_STEPS.value, bench_steps=_BENCH_STEPS.value, sample_steps=_SAMPLE_STEPS.value)
  markdown = device_check.format_markdown(report)
  print(markdown)
  write_json(os.path.join(_OUT.value, "device_check.json"), report, indent=2)
  with atomic_path(os.path.join(_OUT.value, "device_check.md")) as path:
    with open(path, "w", encoding="utf-8") as f:
      f.write(markdown)
  print(f"wrote {_OUT.value}/device_check.json and device_check.md")
  if not report["ok"]:
    sys.exit(1)


def _plan(batch_sizes: list[int]) -> str:
  if _PLAN_TOPOLOGY.value:
    chip = tpu_topology.chip_of(_PLAN_TOPOLOGY.value).name
    num_devices = math.prod(int(n) for n in _PLAN_TOPOLOGY.value.split(":", 1)[1].split("x"))
    platform = "tpu"
  else:
    device = jax.devices()[0]
    chip, num_devices = tpu_estimates.chip_of_device_kind(device.device_kind), jax.device_count()
    platform = "cuda" if device.platform == "gpu" else device.platform
  return device_check.plan(
      procedural_shapes.get_config(), chip=chip if platform == "tpu" else None, num_devices=num_devices,
      platform=platform, batch_sizes=batch_sizes, dtypes=_DTYPES.value, train_steps=_TRAIN_STEPS.value,
      sample_steps=_SAMPLE_STEPS.value, estimates=tpu_estimates.load(),
      cache_dir=jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None)


def main():
  cli.run(_main)


if __name__ == "__main__":
  main()
