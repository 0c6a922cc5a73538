"""Mesh construction, sharding rules, multi-host start-up and host-local -> global batches.

One code path from one CPU to a pod slice: every jitted step takes explicit `NamedSharding`s over a
("data", "fsdp") mesh. The global batch is split over both axes; parameters, EMA and optimiser state are
either replicated or (fsdp > 1) sharded along their largest dimension that the fsdp axis divides, so a
step is numerically the same program on any mesh (XLA inserts the all-gathers and reduce-scatters).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from typing import Any, Callable, Iterator, TextIO

from absl import logging
import jax
import numpy as np
from tqdm.auto import tqdm
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from concept_diffusion.errors import UserError

DATA_AXES = ("data", "fsdp")  # the batch is split over both axes


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) with one -1 resolved to the remaining devices; a clear error when they do not fit."""
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if data == -1 and fsdp == -1:
    raise UserError("mesh.data and mesh.fsdp cannot both be -1; set one of them (e.g. --config.mesh.fsdp=1).")
  for name, size in (("data", data), ("fsdp", fsdp)):
    if size != -1 and size < 1:
      raise UserError(f"mesh.{name}={size}: must be a positive number of devices or -1 (the rest).")
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if num_devices % known:
      raise UserError(f"mesh: {num_devices} devices cannot be split into groups of {known} "
                       f"(mesh.data={data}, mesh.fsdp={fsdp}).")
    data, fsdp = (num_devices // known, fsdp) if data == -1 else (data, num_devices // known)
  if data * fsdp != num_devices:
    raise UserError(f"mesh.data * mesh.fsdp = {data} * {fsdp} = {data * fsdp}, but JAX sees {num_devices} devices; "
                     "use -1 for one axis to take the rest.")
  return data, fsdp


def make_mesh(mesh_config: Any, devices: Any = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  # Auto axes: XLA propagates shardings from the step's in/out shardings and the few activation constraints the
  # model code sets with `shard_batch` (where propagation alone would shard activations like the FSDP weights).
  return jax.make_mesh(shape, ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


# --- activations ------------------------------------------------------------------------------------------------

def shard_batch(x: jax.Array) -> jax.Array:
  """`x` constrained to have its leading (batch) dimension split over ("data", "fsdp") and the rest whole, when
  traced under a mesh with those axes (`traced_on`, what the train steps use); `x` itself otherwise (eager code,
  single-device jits, a batch that does not divide over the devices, e.g. a single image).

  Why: with FSDP a weight is split along a feature dimension over "fsdp", and sharding propagation may carry that
  split into the activation the weight multiplies (features over "fsdp", batch over "data" only). Going back to
  the batch split then needs an all-to-all that XLA's SPMD partitioner cannot always do, so it replicates the
  whole activation ("involuntary full rematerialization"). Pinning the activations to the batch split makes it
  all-gather the weights instead, which is what FSDP means.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(DATA_AXES) <= set(mesh.axis_names) or mesh.size == 1:
    return x
  if not x.ndim or x.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]):
    return x
  return jax.lax.with_sharding_constraint(x, P(DATA_AXES))


@contextlib.contextmanager
def tracing_on(mesh: Mesh) -> Iterator[None]:
  """Traces inside the block see `mesh` (abstractly: nothing is placed), so `shard_batch` takes effect."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    yield


def traced_on(mesh: Mesh, fn: Callable) -> Callable:
  """fn, traced under `tracing_on(mesh)`: wrap a step before `jax.jit` so its activation constraints apply."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with tracing_on(mesh):
      return fn(*args, **kwargs)
  return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device of the mesh."""
  return NamedSharding(mesh, P(DATA_AXES))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  devices, processes = mesh.size, jax.process_count()
  if batch_size % devices:
    raise UserError(f"{what}={batch_size} does not divide over the mesh's {devices} devices "
                     f"{dict(mesh.shape)}; use a multiple of {devices}.")
  if batch_size % processes:
    raise UserError(f"{what}={batch_size} does not divide over {processes} processes; use a multiple of "
                     f"{processes}.")


def param_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """FSDP rule: shard the largest dimension divisible by the fsdp size; small or indivisible arrays replicated."""
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def fsdp_shardings(tree: Any, mesh: Mesh, min_size: int) -> Any:
  """NamedShardings for every leaf of a (concrete or abstract) pytree by the FSDP rule, `param_spec`."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, param_spec(tuple(np.shape(x)), fsdp, min_size)), tree)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry their target sharding (what Orbax restores onto)."""
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree,
                                shardings)


def process_rows(sharding: NamedSharding, global_batch: int) -> np.ndarray:
  """The global batch rows this process's devices hold, in order (what it must load)."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(global_batch)[index[0]])
  return np.array(sorted(rows), dtype=np.int64)


def global_batch_array(local: np.ndarray, sharding: NamedSharding, global_batch: int) -> jax.Array:
  """Assembles this process's rows (see `process_rows`) into the global, sharded batch."""
  shape = (global_batch,) + tuple(local.shape[1:])
  return jax.make_array_from_process_local_data(sharding, local, shape)


def fetch_to_host(tree: Any, mesh: Mesh) -> Any:
  """A numpy copy of a (possibly sharded, multi-process) pytree on every process. Collective across processes."""
  if jax.process_count() > 1:
    tree = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
  return jax.device_get(tree)


def say(message: str, stream: TextIO | None = None) -> None:
  """Prints `message` once per job (process 0), above any progress bar (tqdm.write keeps the bar intact)."""
  if jax.process_index() == 0:
    tqdm.write(message, file=stream or sys.stdout)


def on_main_host(fn: Callable[[int, Any], None], mesh: Mesh) -> Callable[[int, Any], None]:
  """A loop hook that runs fn(step, host_state) on process 0; every process takes part in gathering the state."""

  def hook(step: int, state: Any) -> None:
    host_state = fetch_to_host(state, mesh)
    if jax.process_index() == 0:
      fn(step, host_state)
  return hook


# --- multi-host -------------------------------------------------------------------------------------------------

def _env_requests_distributed() -> str | None:
  """Why the environment asks for multi-process JAX (None: it does not)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS is set"
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return f"SLURM job with {os.environ['SLURM_NTASKS']} tasks"
  if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "multi-host Cloud TPU (TPU_WORKER_HOSTNAMES)"
  return None


def maybe_initialize_distributed(dist_config: Any) -> bool:
  """Calls `jax.distributed.initialize` when the config or the environment asks for it; True if it did.

  Must run before any other JAX call. `distributed.initialize`: "auto" (the environment decides: a TPU pod,
  a SLURM job with several tasks, or JAX_COORDINATOR_ADDRESS), "yes", or "no". Explicit coordinator address,
  process count and id (for hosts JAX cannot detect) come from the config.
  """
  mode = dist_config.initialize
  if mode not in ("auto", "yes", "no"):
    raise UserError(f"distributed.initialize must be 'auto', 'yes' or 'no', got {mode!r}.")
  explicit = bool(dist_config.coordinator_address)
  reason = "the config sets distributed.coordinator_address" if explicit else _env_requests_distributed()
  if mode == "no" or (mode == "auto" and reason is None):
    return False
  kwargs = {}
  if explicit:
    if dist_config.num_processes < 1 or dist_config.process_id < 0:
      raise UserError("distributed.coordinator_address is set: also set distributed.num_processes (>= 1) and "
                       "distributed.process_id (0-based) for this process.")
    kwargs = dict(coordinator_address=dist_config.coordinator_address, num_processes=dist_config.num_processes,
                  process_id=dist_config.process_id)
  # CPU devices of different processes talk through gloo (the default CPU client has no cross-process
  # collectives); the setting only affects the CPU backend, and must precede backend start-up.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed.initialize (%s)", reason or "distributed.initialize='yes'")
  jax.distributed.initialize(**kwargs)
  return True
