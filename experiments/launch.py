r"""Runs a console script as N processes of one JAX cluster on this host, one per core.

  encdiff-launch --processes=2 -- encdiff-train --config=quickstart --workdir=runs/quickstart
  encdiff-launch --processes=2 -- encdiff-benchmark --config=procedural_shapes --batch_sizes=32

Each process is pinned to its own core(s), runs XLA:CPU single-threaded and holds 1/N of the global batch;
the launcher adds the --config.distributed.* flags (coordinator on a free localhost port), and the run is the
one a single process with all devices would make (same batches, same results up to float rounding). For CPU hosts
(laptops, CPU servers); on TPU pods and under SLURM JAX starts the processes' cluster itself. docs/scaling.md.
"""
import sys

from absl import app, flags

from concept_diffusion.tools import launch

_PROCESSES = flags.DEFINE_integer("processes", 2, "Processes to start (one per core is the point).")
_PIN = flags.DEFINE_bool("pin", True, "Pin process i to its own share of the cores this launcher may use.")
_SINGLE_THREAD = flags.DEFINE_bool("single_thread", True, "Run XLA:CPU single-threaded in each process "
                                   "(--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1).")


def _main(argv):
  command = argv[1:]
  try:
    code = launch.launch(command, _PROCESSES.value, pin=_PIN.value, single_thread=_SINGLE_THREAD.value)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(code)


def main():
  app.run(_main)


if __name__ == "__main__":
  main()
