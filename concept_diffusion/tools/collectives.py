"""What a compiled SPMD step communicates, read from its HLO, and the least any partitioning of it could.

`collective_bytes(compiled.as_text())` sums, per collective kind (all-reduce, all-gather, reduce-scatter,
all-to-all, collective-permute), the bytes of every collective instruction the step executes.

Byte convention (the same for the measurement and for the minimum, so their ratio means something): each
collective instruction counts the bytes of the largest buffer it touches on one device, i.e. the array whose
pieces the devices of its group combine or exchange:

  * all-reduce: its operand (= its result);
  * all-gather: its result (the gathered array); reduce-scatter: its operand (the array before scattering);
  * all-to-all, collective-permute: their operand (= their result).

Tuple-shaped (combined) collectives count every element of the tuple. Asynchronous pairs count once (the
`*-done` instruction's result, the `*-start` not at all); collectives inside a computation that runs several
times count that many times: a `while` body times its trip count (XLA's `known_trip_count`; a loop without one
counts once and is reported in `unknown_trip_counts`), a called computation as often as its callers run. These
are bytes per device per step, not bytes on the wire: a ring all-reduce over n devices sends 2(n-1)/n of its
buffer, an all-gather or reduce-scatter (n-1)/n, so an all-reduce of a buffer costs what a reduce-scatter plus an
all-gather of it cost, and all-reduce + slice (what XLA:CPU emits for a reduce-scatter) counts as one
reduce-scatter would.

`min_collective_bytes(...)` is the same count for the least a step of data-parallel / FSDP training must
communicate on a (data, fsdp) mesh with the batch split over both axes:

  * replicated trainable parameters (all of them when fsdp = 1): one all-reduce of their gradients (its bytes:
    the parameters' bytes);
  * fsdp-sharded trainable parameters: an all-gather of the parameters in the forward pass and another in the
    backward pass (each: the full parameters' bytes), a reduce-scatter of the gradients over the fsdp axis (the
    full gradients' bytes) and, with data > 1, an all-reduce of the gradient shards over the data axis (the
    shards' bytes, full / fsdp);
  * fsdp-sharded frozen inputs the step reads (the first stage's encoder): one all-gather in the forward pass.

Scalars (loss, gradient norm) and BatchNorm statistics are left out of the minimum: they are bytes, not
megabytes. A compiler may do better than the minimum (e.g. keep the forward all-gather's result for the backward
pass: 2/3 of the FSDP bytes), never much worse without waste.
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


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape: `f32[32,64]{1,0}`, a tuple `(f32[2]{0}, s32[])`, `f32[]` (a scalar)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _BYTES_PER_ELEMENT:
      total += _BYTES_PER_ELEMENT[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


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
  """The collective kind an opcode executes (async `-done` counts; `-start`, `-update` do not)."""
  if opcode in KINDS:
    return opcode
  if opcode.endswith("-done") and opcode[:-len("-done")] in KINDS:
    return opcode[:-len("-done")]
  return None


def collective_bytes(hlo_text: str) -> dict[str, Any]:
  """{"total": bytes per device per step, "by_kind": {kind: bytes}, "count_by_kind": {kind: instructions run},
  "unknown_trip_counts": loops counted once}, by the module docstring's convention."""
  shapes: dict[str, str] = {}
  # computation -> [(kind, shape, operands: none for a `-done`)], computation -> [(callee, times per call)]
  found: dict[str, list[tuple[str, str, list[str]]]] = collections.defaultdict(list)
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
      found[computation].append((kind, shape, [] if opcode.endswith("-done") else _operand_names(rest)))
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

  by_kind = {kind: 0 for kind in KINDS}
  count = {kind: 0 for kind in KINDS}
  for comp, instructions in found.items():
    for kind, shape, operands in instructions:
      result = shape_bytes(shape)
      operand = sum(shape_bytes(shapes.get(op, "")) for op in operands)
      if kind == "all-gather" or not operands:  # an async `-done`: its result is the collective's output
        size = result
      elif kind == "reduce-scatter":
        size = operand
      else:
        size = max(result, operand)
      by_kind[kind] += size * times[comp]
      count[kind] += times[comp]
  return {"total": sum(by_kind.values()), "by_kind": by_kind, "count_by_kind": count,
          "unknown_trip_counts": unknown_loops}


def _nbytes(x: Any) -> int:
  return int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize


def min_collective_bytes(trainable: Any, trainable_specs: Any, mesh_shape: tuple[int, int], frozen: Any = None,
                         frozen_specs: Any = None) -> dict[str, int]:
  """The least bytes per device per step (module docstring) for trainable parameters and frozen inputs (pytrees
  of arrays or ShapeDtypeStructs) with their PartitionSpecs (a spec naming "fsdp" is sharded), on a (data, fsdp)
  mesh. Returns {"total", "all-reduce", "all-gather", "reduce-scatter"}."""
  data, fsdp = mesh_shape
  out = {"all-reduce": 0, "all-gather": 0, "reduce-scatter": 0}
  if data * fsdp == 1:
    return dict(out, total=0)
  import jax  # pylint: disable=g-import-not-at-top  (the HLO parser above needs no JAX)
  is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)

  def sharded(spec) -> bool:
    return fsdp > 1 and any(a == "fsdp" or (isinstance(a, tuple) and "fsdp" in a) for a in spec)

  for leaf, spec in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(trainable_specs,
                                                                                       is_leaf=is_spec)):
    size = _nbytes(leaf)
    if sharded(spec):
      out["all-gather"] += 2 * size  # forward and backward
      out["reduce-scatter"] += size
      if data > 1:
        out["all-reduce"] += size // fsdp
    else:
      out["all-reduce"] += size
  if frozen is not None:
    for leaf, spec in zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(frozen_specs,
                                                                                     is_leaf=is_spec)):
      if sharded(spec):
        out["all-gather"] += _nbytes(leaf)
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
