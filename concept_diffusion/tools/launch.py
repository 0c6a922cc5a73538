"""Several JAX processes on one CPU host, one per core (experiments/launch.py).

XLA:CPU gains only 1.2-1.4x from a second core when it threads one step (docs/performance.md); N single-threaded
processes, each pinned to its own core and holding 1/N of the batch, keep every core on its own work and exchange
only the gradients (gloo all-reduce over localhost). The processes form one JAX cluster through the multi-process
path a pod uses (config.distributed): process 0 runs the coordinator on a free localhost port, and the results are
those of one process holding all the devices. Whether it is faster depends on the host: on the 2-core development
VM it was slower than XLA's threads (docs/performance.md, "bf16 and processes on a CPU"); measure with
`encdiff-benchmark --local_processes=N`.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

from concept_diffusion.errors import UserError

# One thread per process: XLA:CPU's Eigen pool and its intra-op parallelism off, so that a process stays on its core.
SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def distributed_flags(port: int, num_processes: int, process_id: int) -> list[str]:
  return [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          f"--config.distributed.num_processes={num_processes}", f"--config.distributed.process_id={process_id}"]


def process_env(base: dict[str, str], single_thread: bool) -> dict[str, str]:
  env = dict(base)
  if single_thread:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {SINGLE_THREAD_XLA_FLAGS}".strip()
    env.setdefault("OMP_NUM_THREADS", "1")  # else each process starts a BLAS/OpenMP thread per core of the host
  return env


def relaunch_command(module: str, argv: list[str], drop_flag: str) -> list[str]:
  """`python -m module argv...` without the flag `drop_flag` (e.g. the one that asked for the relaunch, so that the
  launched processes run the command instead of launching again)."""
  kept, skip_value = [], False
  for arg in argv:
    if skip_value:
      skip_value = False
    elif arg.startswith("-") and arg.lstrip("-").split("=", 1)[0] == drop_flag:
      skip_value = "=" not in arg  # `--flag value`: the value goes too
    else:
      kept.append(arg)
  return [sys.executable, "-m", module, *kept]


def core_sets(num_processes: int, available: Sequence[int]) -> list[set[int]]:
  """The cores each process is pinned to: the available cores dealt out in order, as evenly as they go (with more
  processes than cores, processes share cores round-robin)."""
  cores = sorted(available)
  if num_processes >= len(cores):
    return [{cores[i % len(cores)]} for i in range(num_processes)]
  per, extra = divmod(len(cores), num_processes)
  out, start = [], 0
  for i in range(num_processes):
    size = per + (1 if i < extra else 0)
    out.append(set(cores[start:start + size]))
    start += size
  return out


def launch(command: Sequence[str], num_processes: int, *, pin: bool = True, single_thread: bool = True,
           env: dict[str, str] | None = None, poll_s: float = 0.2, grace_s: float = 30.0) -> int:
  """Runs `command` (a console script and its flags) as `num_processes` processes of one JAX cluster; returns the
  first non-zero exit code, or 0. When one process fails the others are stopped (they would otherwise wait in a
  collective for it forever); SIGTERM to the launcher reaches every process (each saves at the same step)."""
  if num_processes < 1:
    raise UserError(f"--processes must be >= 1, got {num_processes}.")
  if not command:
    raise UserError("nothing to launch: give the command after --, e.g. "
                     "encdiff-launch --processes=2 -- encdiff-train --config=quickstart --workdir=runs/q")
  port = free_port()
  child_env = process_env(os.environ if env is None else env, single_thread)
  pins = core_sets(num_processes, sorted(os.sched_getaffinity(0))) if pin and hasattr(os, "sched_setaffinity") \
      else [None] * num_processes
  procs = []
  for i in range(num_processes):
    cores = pins[i]
    procs.append(subprocess.Popen(  # pylint: disable=consider-using-with
        list(command) + distributed_flags(port, num_processes, i), env=child_env,
        preexec_fn=(lambda c=cores: os.sched_setaffinity(0, c)) if cores else None))

  def forward(signum, frame):  # pylint: disable=unused-argument
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  # Set only now: a Python handler (unlike SIG_IGN) is not inherited. Ctrl-C reaches the processes through the
  # terminal's process group already; the launcher waits for them instead of dying first.
  previous = signal.signal(signal.SIGTERM, forward), signal.signal(signal.SIGINT, lambda signum, frame: None)
  try:
    code = 0
    while [p.poll() for p in procs].count(None):  # every process polled, not only up to the first running one
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed and code == 0:
        code = failed[0]
        print(f"encdiff-launch: a process exited with {code}; stopping the other {num_processes - 1}.",
              file=sys.stderr, flush=True)
        forward(signal.SIGTERM, None)
        deadline = time.monotonic() + grace_s
        while [p.poll() for p in procs].count(None) and time.monotonic() < deadline:
          time.sleep(poll_s)
        for p in procs:
          if p.poll() is None:
            p.kill()
      time.sleep(poll_s)
    if code == 0:
      code = next((p.returncode for p in procs if p.returncode != 0), 0)
    return code
  finally:
    signal.signal(signal.SIGTERM, previous[0])
    signal.signal(signal.SIGINT, previous[1])
    for p in procs:
      if p.poll() is None:
        p.kill()
