"""What a compiled SPMD step communicates, read from its HLO, and the least any partitioning of it could.

`collective_bytes(compiled.as_text())` sums, per collective kind (all-reduce, all-gather, reduce-scatter,
all-to-all, collective-permute), the bytes each device sends over the interconnect per step for every collective
instruction the step executes ("wire bytes"), as a bandwidth-optimal ring over the instruction's group of n
devices sends them, for a buffer of S bytes (the whole array the group combines or exchanges, on one device):

  * all-reduce: 2(n-1)/n x S (a reduce-scatter then an all-gather), S its operand;
  * all-gather: (n-1)/n x S, S the gathered result; reduce-scatter: (n-1)/n x S, S the operand before scattering;
  * all-to-all: (n-1)/n x S, S its operand; collective-permute: S (each device sends its buffer once).

n is read from the instruction's `replica_groups` (an explicit list, the iota form `[groups,n]<=[...]`, or the
mesh form `mesh[...] {'axis_i',...}` of newer XLA); none, or `{}`, is every device of the module
(`num_partitions`). Tuple-shaped (combined) collectives count every operand. Asynchronous pairs count once (the
`*-start`, which carries the operands and groups; the `*-done` not at all), and so do the clones of one
collective that share its `channel_id` (the TPU compiler repeats an asynchronous collective in each fusion of its
decomposition); a collective inside a computation
that runs several times counts that many times: a `while` body times its trip count (XLA's `known_trip_count`; a
loop without one counts once and is reported in `unknown_trip_counts`), a called computation (a fusion, the TPU
compiler's async collective wrappers) as often as its callers run. XLA:CPU has no reduce-scatter and emits an
all-reduce followed by a slice: on the wire that costs what an all-reduce costs, twice a reduce-scatter, so its
programs are held to the bound of a backend without one (`has_reduce_scatter=False`) and the TPU compiler's to the
full bound.

`min_collective_bytes(...)` is the least a step of data-parallel / FSDP training must send on a (data, fsdp) mesh
of D x F devices with the batch split over both axes, in the same wire bytes. For trainable parameters of S bytes:

  * replicated (all of them when F = 1): one all-reduce of their gradients over all N = D F devices,
    2(N-1)/N x S;
  * FSDP-sharded, gathered once ("gather-once minimum"): an all-gather of the parameters over the fsdp axis in the
    forward pass whose result is kept for the backward pass, a reduce-scatter of the gradients over the fsdp axis
    and, with D > 1, an all-reduce of the gradient shards (S/F) over the data axis:
        (F-1)/F x S + (F-1)/F x S + 2(D-1)/D x S/F.
    Counted as buffers (each collective its S, as the accounting before the wire convention did) this is the
    familiar 2S + S/F; on the wire it tends to 2S + 2S/F on large meshes;
  * FSDP-sharded frozen inputs the step reads (the first stage's encoder): one all-gather, (F-1)/F x S.

Gathering once is a choice with a memory price: the full (unsharded) parameters of every layer stay resident from
the forward pass to the backward pass, so the step's peak holds S per device on top of the F-fold sharded state
(what FSDP saves is the optimiser state and the gradients, not the live parameters). A step that gathers again in
the backward pass instead sends (F-1)/F x S more, the bound before it was corrected (3S + S/F as buffers). Scalars
(loss, gradient norm) and BatchNorm statistics are left out of the minimum: they are bytes, not megabytes. A step
computed in bfloat16 may gather its weights in bfloat16 (the TPU compiler does) and so go below the bound, which
counts the parameters in their stored dtype.
"""
from __future__ import annotations

import collections
import contextlib
import math
import os
import re
import tempfile
from typing import Any, Callable, Iterator

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# What GSPMD logs when it cannot reshard an array between two shardings and replicates it in full instead.
# (spmd_partitioner.cc: "[SPMD] Involuntary full rematerialization. The compiler cannot go from sharding ...").
REMAT_WARNING = "involuntary full rematerialization"

_BYTES_PER_ELEMENT = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
    "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
# `  [ROOT] %name = <shape> opcode(operands), attrs` (operands are names only in compiled HLO text).
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s+(?P<opcode>[a-z][\w\-]*)\("
                          r"(?P<rest>.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|true_computation|false_computation)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_NUM_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
# The three spellings of replica_groups: {{0,1},{2,3}}; iota [groups,size]<=[...]; mesh['a'=2,'b'=4]... {'b'}.
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,\s]*\}(?:\s*,\s*\{[\d,\s]*\})*)?\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\][^{]*\{(?P<used>[^}]*)\}")
_MESH_AXIS = re.compile(r"'([^']+)'=(\d+)")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape: `f32[32,64]{1,0}`, a tuple `(f32[2]{0}, s32[])`, `f32[]` (a scalar)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _BYTES_PER_ELEMENT:
      total += _BYTES_PER_ELEMENT[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


def group_size(attributes: str, num_devices: int) -> int:
  """How many devices take part in each group of a collective, from its `replica_groups` attribute (module
  docstring); `num_devices` when it names none."""
  mesh = _GROUPS_MESH.search(attributes)
  if mesh:
    sizes = dict((name, int(size)) for name, size in _MESH_AXIS.findall(mesh.group("axes")))
    return math.prod(sizes[name.strip().strip("'")] for name in mesh.group("used").split(",") if name.strip())
  iota = _GROUPS_IOTA.search(attributes)
  if iota:
    return int(iota.group(2))
  listed = _GROUPS_LIST.search(attributes)
  if listed and listed.group(1):
    return len(re.findall(r"\d+", listed.group(1).split("}")[0]))
  return num_devices


def wire_bytes(kind: str, buffer_bytes: float, n: int) -> float:
  """Bytes one device sends for a collective of `kind` over a group of n on a buffer of `buffer_bytes` (module
  docstring)."""
  if kind == "collective-permute":
    return buffer_bytes
  if n <= 1:
    return 0.0
  return (2.0 if kind == "all-reduce" else 1.0) * (n - 1) / n * buffer_bytes


def _operand_names(rest: str) -> list[str]:
  """The operand names of an instruction from the text after its opening parenthesis."""
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      end = i
      break
  return [op.strip().split(" ")[-1].lstrip("%") for op in rest[:end].split(",") if op.strip()]


def _kind(opcode: str) -> str | None:
  """The collective kind an opcode executes (a synchronous one or an async `-start`; `-done`, `-update` not)."""
  if opcode in KINDS:
    return opcode
  if opcode.endswith("-start") and opcode[:-len("-start")] in KINDS:
    return opcode[:-len("-start")]
  return None


def collective_bytes(hlo_text: str) -> dict[str, Any]:
  """{"total": wire bytes per device per step, "by_kind": {kind: wire bytes}, "count_by_kind": {kind:
  instructions run}, "unknown_trip_counts": loops counted once}, by the module docstring's convention."""
  partitions = _NUM_PARTITIONS.search(hlo_text)
  num_devices = int(partitions.group(1)) if partitions else 1
  shapes: dict[str, str] = {}
  # computation -> [(kind, operand names, group size, channel id)], computation -> [(callee, times per call)]
  found: dict[str, list[tuple[str, list[str], int, str | None]]] = collections.defaultdict(list)
  calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
  entry, computation, unknown_loops = None, None, 0
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and not line[:1].isspace():
      computation = header.group("name")
      if line.startswith("ENTRY"):
        entry = computation
      continue
    match = _INSTRUCTION.match(line)
    if match is None or computation is None:
      continue
    name, shape, opcode, rest = match.group("name", "shape", "opcode", "rest")
    shapes[name] = shape
    kind = _kind(opcode)
    if kind is not None:
      channel = _CHANNEL.search(rest)
      found[computation].append((kind, _operand_names(rest), group_size(rest, num_devices),
                                 channel.group(1) if channel else None))
    if opcode in ("async-done", "async-update"):
      continue  # the wrapped computation runs once, counted from its async-start
    trip = 1
    if opcode == "while":
      count = _TRIP_COUNT.search(rest)
      trip = int(count.group(1)) if count else 1
      unknown_loops += count is None
    for attr, value in _CALLED.findall(rest):
      for callee in re.findall(r"%?([\w.\-]+)", value):
        calls[computation].append((callee, trip if attr in ("body", "condition") else 1))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text (pass compiled.as_text()).")

  times: dict[str, int] = collections.Counter()
  def visit(comp: str, n: int) -> None:  # HLO call graphs are acyclic
    times[comp] += n
    for callee, k in calls.get(comp, ()):
      visit(callee, n * k)
  visit(entry, 1)

  # One collective per channel: the TPU compiler clones an asynchronous collective into each fusion of its
  # decomposition (start, continuations), every clone with the whole operation and the same channel_id.
  collectives: dict[Any, tuple[str, float, int]] = {}
  for comp, instructions in found.items():
    for i, (kind, operands, n, channel) in enumerate(instructions):
      operand = sum(shape_bytes(shapes.get(op, "")) for op in operands)
      buffer = operand * n if kind == "all-gather" else operand  # an all-gather's buffer is its gathered result
      key = channel if channel is not None else (comp, i)
      runs = max(times[comp], collectives[key][2] if key in collectives else 0)
      collectives[key] = (kind, wire_bytes(kind, buffer, n), runs)
  by_kind = {kind: 0.0 for kind in KINDS}
  count = {kind: 0 for kind in KINDS}
  for kind, wire, runs in collectives.values():
    by_kind[kind] += wire * runs
    count[kind] += runs
  by_kind = {kind: int(round(b)) for kind, b in by_kind.items()}
  return {"total": sum(by_kind.values()), "by_kind": by_kind, "count_by_kind": count,
          "unknown_trip_counts": unknown_loops}


def _nbytes(x: Any) -> int:
  return int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize


def min_collective_bytes(trainable: Any, trainable_specs: Any, mesh_shape: tuple[int, int], frozen: Any = None,
                         frozen_specs: Any = None, *, has_reduce_scatter: bool = True) -> dict[str, int]:
  """The least wire bytes per device per step (module docstring: the gather-once minimum) for trainable parameters
  and frozen inputs (pytrees of arrays or ShapeDtypeStructs) with their PartitionSpecs (a spec naming "fsdp" is
  sharded), on a (data, fsdp) mesh. Returns {"total", "all-reduce", "all-gather", "reduce-scatter"}.

  `has_reduce_scatter=False` is the least for a backend without a reduce-scatter (XLA:CPU): a sharded gradient is
  all-reduced whole over all devices and sliced, 2(N-1)/N x S in place of (F-1)/F x S + 2(D-1)/D x S/F."""
  data, fsdp = mesh_shape
  out = {"all-reduce": 0.0, "all-gather": 0.0, "reduce-scatter": 0.0}
  import jax  # pylint: disable=g-import-not-at-top  (the HLO parser above needs no JAX)
  is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)

  def sharded(spec) -> bool:
    return fsdp > 1 and any(a == "fsdp" or (isinstance(a, tuple) and "fsdp" in a) for a in spec)

  for leaf, spec in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(trainable_specs,
                                                                                       is_leaf=is_spec)):
    size = _nbytes(leaf)
    if sharded(spec):
      out["all-gather"] += wire_bytes("all-gather", size, fsdp)  # once: kept for the backward pass
      if has_reduce_scatter:
        out["reduce-scatter"] += wire_bytes("reduce-scatter", size, fsdp)
        out["all-reduce"] += wire_bytes("all-reduce", size / fsdp, data)
      else:
        out["all-reduce"] += wire_bytes("all-reduce", size, data * fsdp)
    else:
      out["all-reduce"] += wire_bytes("all-reduce", size, data * fsdp)
  if frozen is not None:
    for leaf, spec in zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(frozen_specs,
                                                                                     is_leaf=is_spec)):
      if sharded(spec):
        out["all-gather"] += wire_bytes("all-gather", _nbytes(leaf), fsdp)
  out = {kind: int(round(b)) for kind, b in out.items()}
  return dict(out, total=sum(out.values()))


def used_leaves(fn: Callable, tree: Any, *args: Any) -> Any:
  """A pytree of bools like `tree`: whether `fn(tree, *args)` reads each leaf (traced, nothing is computed)."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  closed = jax.make_jaxpr(lambda leaves_, *a: fn(jax.tree_util.tree_unflatten(treedef, leaves_), *a))(leaves, *args)
  jaxpr = closed.jaxpr
  read = set()
  for eqn in jaxpr.eqns:
    read.update(id(v) for v in eqn.invars)
  read.update(id(v) for v in jaxpr.outvars)
  return jax.tree_util.tree_unflatten(treedef, [id(v) in read for v in jaxpr.invars[:len(leaves)]])


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
  """Captures what C++ code (XLA's logging) writes to file descriptor 2; the text is in the yielded list after
  the block. Python's sys.stderr goes to the same descriptor, so it is captured too."""
  import sys  # pylint: disable=g-import-not-at-top
  out: list[str] = []
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(tmp.fileno(), 2)
    try:
      yield out
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      out.append(tmp.read().decode("utf-8", "replace"))


def count_remat_warnings(log: str) -> int:
  """How many times GSPMD's warning appears in a captured compile log (any capitalisation)."""
  return log.lower().count(REMAT_WARNING)
