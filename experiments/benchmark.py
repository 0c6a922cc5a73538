r"""Measures training and inference speed on whatever devices JAX sees; prints a table, optionally writes JSON.

  encdiff-benchmark --config=procedural_shapes [--batch_sizes=8,32,128] [--steps=20] \
      [--json=out.json] [--sample_steps=10] [--profile_steps=3 --profile_dir=/tmp/prof]

Per batch size: compile time and FLOPs of the first-stage and diffusion train steps, the diffusion step's
median/p90 time, images/s, achieved FLOP/s and MFU (XLA's FLOP count of the compiled step over the device's
peak: published for TPUs/GPUs, measured by a large matmul on CPUs), XLA's memory plan and peak device memory,
DDIM time per image, encoder and input-pipeline images/s; what the diffusion step communicates on the mesh
(collective bytes per step from the compiled HLO against the minimum for the mesh, and GSPMD's "involuntary full
rematerialization" warnings; concept_diffusion/tools/collectives.py); with --profile_steps, where the step's time
goes (concept_diffusion/tools/profiling.py). docs/performance.md explains the numbers.
"""

import sys

from absl import flags, logging
import jax
from ml_collections import config_flags

from concept_diffusion import parallel
from concept_diffusion.tools import cli, launch
from concept_diffusion.tools.benchmark import format_report, run_benchmark
from concept_diffusion.workdir import write_json
from concept_diffusion.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config: a name in configs/ or a .py file.", lock_config=True)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", None, "Global batch sizes (default: the config's train.batch_size).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps per batch size (after --warmup untimed ones).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed train steps after compiling.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", None, "DDIM steps to time (default: config.sample.ddim_steps; "
                                     "0 skips sampling).")
_ENCODE_BATCHES = flags.DEFINE_integer("encode_batches", 5, "Batches of whole-dataset encoding to time (0: skip).")
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 30, "Input-pipeline batches to time (0: skip); more "
                                         "than data.prefetch_batches, so the read-ahead buffer does not flatter it.")
_FIRST_STAGE = flags.DEFINE_bool("first_stage", True, "Also compile the first-stage (autoencoder) step.")
_PROFILE_STEPS = flags.DEFINE_integer(
    "profile_steps", 0, "Also trace this many train steps with jax.profiler and print where the time goes: by op "
    "kind (convolution, dot, fused elementwise; forward/backward) with GFLOP per busy second, by JAX primitive and "
    "by model module (0: no profile).")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "Where the traces go (default /tmp/concept_diffusion_profile); "
                                   "open them in TensorBoard's profile plugin or Perfetto.")
_COUNT_REMAT = flags.DEFINE_bool(
    "count_remat_warnings", True, "Count GSPMD's involuntary-rematerialization warnings of the diffusion step; "
    "when the persistent cache served the step this compiles it once more with the cache off.")
_JSON = flags.DEFINE_string("json", None, "Write the report to this JSON file.")
_LOCAL_PROCESSES = flags.DEFINE_integer(
    "local_processes", 1, "Measure N single-threaded processes of one JAX cluster on this host, one pinned per core "
    "(encdiff-launch; the training mode docs/scaling.md describes for CPU hosts). Process 0 prints and writes.")
flags.mark_flags_as_required(["config"])


def _main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if _LOCAL_PROCESSES.value > 1:
    if config.distributed.num_processes > 1 or config.distributed.coordinator_address:
      raise UserError("--local_processes starts its own cluster; leave out --config.distributed.*.")
    # This command again as a cluster of processes, without the flag (so that they measure instead of relaunching).
    sys.exit(launch.launch(launch.relaunch_command("experiments.benchmark", sys.argv[1:], "local_processes"),
                           _LOCAL_PROCESSES.value))
  parallel.maybe_initialize_distributed(config.distributed)
  cli.enable_compilation_cache()  # docs/performance.md: compile_cache says whether a compile was served by it
  try:
    batch_sizes = [int(b) for b in _BATCH_SIZES.value] if _BATCH_SIZES.value else None
  except ValueError as e:
    raise UserError(f"--batch_sizes must be integers separated by commas, got {_BATCH_SIZES.value}.") from e
  report = run_benchmark(config, batch_sizes, steps=_STEPS.value, warmup=_WARMUP.value,
                         sample_steps=_SAMPLE_STEPS.value, encode_batches=_ENCODE_BATCHES.value,
                         pipeline_batches=_PIPELINE_BATCHES.value, with_first_stage=_FIRST_STAGE.value,
                         profile_steps=_PROFILE_STEPS.value, profile_dir=_PROFILE_DIR.value,
                         count_remat_warnings=_COUNT_REMAT.value)
  if jax.process_index() != 0:
    return
  print(format_report(report))
  if _JSON.value:
    write_json(_JSON.value, report, indent=2)
    print(f"wrote {_JSON.value}")


def main():
  cli.run(_main)


if __name__ == "__main__":
  main()
