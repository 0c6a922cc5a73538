"""Where a compiled step's time goes: a jax.profiler trace attributed to op kinds, JAX primitives and modules.

`profile_compiled(compiled, call, steps, trace_dir)` runs `call` `steps` times under `jax.profiler.trace`, then
maps every op event of the trace to the HLO instruction it ran (events are named after the instructions of the
compiled module) and, through the instruction's `op_name` metadata, to

  * the kind of work: convolution, dot, or the opcode (`fusion`: XLA's fused elementwise ops and reductions,
    `copy`: layout changes), forward or backward (`transpose(...)` in the op_name: the gradient pass);
  * the JAX primitive (`conv_general_dilated`, `dot_general`, `exp`, ...), forward or backward;
  * the Flax module path that emitted it (`output_blocks_4_0/in_layers_2`, the first `module_depth` parts).

Convolutions and dots get their FLOPs from their shapes in the HLO text (padded taps included: the hardware
multiplies them; XLA's cost analysis leaves them out, so it is a little lower), so each row can say how close
that kind of op comes to the peak, which one whole-step MFU number cannot. Instructions XLA made up without
metadata (layout copies, the weight-gradient convolutions' input transposes) are rows of their own.

Tested on XLA:CPU, whose op events are on the host plane's worker-thread lines; on GPUs the device plane's op
events are used instead when present. Op times are summed over threads. On a multi-threaded CPU large dots and
convolutions run asynchronously and their events cover little more than the launch (the report says so): per-op
rates need the single-thread mode (docs/performance.md).
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import math
import os
import re
import time
from typing import Any, Callable

import jax

from concept_diffusion.errors import UserError

# `%name = f32[2,3]{1,0} opcode(%a, %b), attr=..., calls=%comp, metadata={op_name="..."}`
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>\S+)\s+(?P<opcode>[\w\-]+)\("
                          r"(?P<operands>[^)]*)\)(?P<attrs>.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")  # headers start in column 0
_DIMS = re.compile(r"\[([\d,]*)\]")
# JAX transformations and control flow wrap the primitive's path in the op_name; they are not module names.
_TRANSFORM_PREFIXES = ("jit(", "pjit(", "jvp(", "transpose(", "vmap(", "checkpoint(", "remat(", "shard_map(",
                       "custom_jvp", "custom_vjp", "branch_")
_CONTROL_FLOW = frozenset({"while", "body", "cond", "checkpoint", "remat", "scan"})


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  dims: tuple[int, ...]
  operands: tuple[str, ...]
  calls: tuple[str, ...]
  op_name: str | None
  attrs: str
  computation: str


def _dims(shape: str) -> tuple[int, ...]:
  match = _DIMS.search(shape)
  return tuple(int(d) for d in match.group(1).split(",") if d) if match else ()


def parse_hlo(hlo_text: str) -> dict[str, Instruction]:
  """Every instruction of an HLO module's text (as `compiled.as_text()` prints it), keyed by name."""
  instructions, computation = {}, ""
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match is None:
      header = _COMPUTATION.match(line)
      if header is not None:
        computation = header.group("name")
      continue
    attrs = match.group("attrs")
    op_name = re.search(r'op_name="([^"]+)"', attrs)
    calls = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", attrs)
    operands = tuple(op.strip().lstrip("%").split(" ")[-1].lstrip("%") for op in match.group("operands").split(",")
                     if op.strip())
    instructions[match.group("name")] = Instruction(
        name=match.group("name"), opcode=match.group("opcode"), dims=_dims(match.group("shape")),
        operands=operands, calls=tuple(calls), op_name=op_name.group(1) if op_name else None, attrs=attrs,
        computation=computation)
  return instructions


def conv_dot_flops(inst: Instruction, instructions: dict[str, Instruction]) -> float:
  """Multiply-add FLOPs (2 per MAC) of a convolution or dot from its shapes; 0 for every other opcode."""
  if inst.opcode == "convolution" and len(inst.operands) == 2 and inst.operands[1] in instructions:
    kernel = instructions[inst.operands[1]].dims
    labels = re.search(r"dim_labels=\w+_(\w+)->", inst.attrs)
    if not labels or not kernel:
      return 0.0
    out_features = kernel[labels.group(1).index("o")]
    # Each output element sums over the kernel's window x input features (grouping already in the kernel shape).
    return 2.0 * math.prod(inst.dims) * math.prod(kernel) / out_features
  if inst.opcode == "dot" and inst.operands and inst.operands[0] in instructions:
    lhs = instructions[inst.operands[0]].dims
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
    dims = [int(d) for d in contracting.group(1).split(",") if d] if contracting else []
    return 2.0 * math.prod(inst.dims) * math.prod(lhs[d] for d in dims)
  return 0.0


def instruction_costs(instructions: dict[str, Instruction]) -> dict[str, tuple[float, str]]:
  """(conv + dot FLOPs, kind) of each instruction, counting what a fusion's called computations contain.

  kind: "convolution" or "dot" when the instruction is or contains one (convolutions win: a fused bias add does
  not make a convolution elementwise work), otherwise the opcode ("fusion" for fused elementwise/reductions).
  """
  by_computation: dict[str, list[Instruction]] = collections.defaultdict(list)
  for inst in instructions.values():
    by_computation[inst.computation].append(inst)
  memo: dict[str, tuple[float, set[str]]] = {}

  def computation_cost(name: str) -> tuple[float, set[str]]:
    if name not in memo:  # HLO call graphs are acyclic, so each computation is summed once
      parts = [cost(i) for i in by_computation.get(name, ())]
      memo[name] = (sum(f for f, _ in parts), set().union(*(o for _, o in parts)) if parts else set())
    return memo[name]

  def cost(inst: Instruction) -> tuple[float, set[str]]:
    flops, opcodes = conv_dot_flops(inst, instructions), {inst.opcode}
    for called in inst.calls:
      f, o = computation_cost(called)
      flops, opcodes = flops + f, opcodes | o
    return flops, opcodes

  out = {}
  for name, inst in instructions.items():
    flops, opcodes = cost(inst)
    kind = next((k for k in ("convolution", "dot") if k in opcodes), inst.opcode)
    out[name] = (flops, kind)
  return out


def module_path(op_name: str, depth: int) -> str:
  """`jit(step)/transpose(jvp(EncDiff))/UNet_0/down_1/conv/conv_general_dilated` -> `UNet_0/down_1` (depth 2)."""
  parts = [p for p in op_name.split("/")[:-1]
           if p and p not in _CONTROL_FLOW and not p.startswith(_TRANSFORM_PREFIXES)]
  return "/".join(parts[:depth]) or "(top level)"


def with_pass(name: str, op_name: str) -> str:
  """`name`, marked `(bwd)` when `op_name` belongs to the gradient pass (JAX's `transpose(...)` transform)."""
  return f"{name} (bwd)" if "transpose(" in op_name else name


def primitive(op_name: str) -> str:
  """The JAX primitive, with `(bwd)` for ops of the gradient pass."""
  return with_pass(op_name.split("/")[-1], op_name)


def _op_events(trace_dir: str, names: set[str]) -> list[tuple[str, int]]:
  """(instruction name, duration ns) of every leaf op event in the newest trace under `trace_dir`.

  An event that encloses other op events on its thread (a `while`, `call` or `conditional` running its body's
  ops) is left out: its body's events already count that time.
  """
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: the profiler wrote no trace.")
  data = jax.profiler.ProfileData.from_file(paths[-1])
  device, host = [], []
  for plane in data.planes:
    target = device if plane.name.startswith("/device:") and "CPU" not in plane.name else host
    for line in plane.lines:
      spans = sorted((event.start_ns, event.start_ns + event.duration_ns, event.name) for event in line.events
                     if event.name in names)
      for (start, end, name), following in zip(spans, spans[1:] + [None]):
        if following is None or following[0] >= end:  # events on one thread are nested or disjoint
          target.append((name, end - start))
  return device or host


def profile_compiled(compiled: Any, call: Callable[[], Any], *, steps: int, trace_dir: str,
                     module_depth: int = 3) -> dict[str, Any]:
  """Traces `steps` calls of `call` (which runs `compiled`) and attributes the time; see the module docstring.

  Returns {"steps", "trace_dir", "wall_ms_per_step" (of the traced steps), "busy_ms_per_step" (in op events,
  summed over threads), "conv_dot_gflop_per_step" (the convolutions' and dots' FLOPs from their shapes),
  "attributed_fraction" (of the busy time, to instructions with metadata), "note" (a caveat or None),
  "by_kind", "by_primitive", "by_module"}; each table's rows are sorted by time, each {"name", "ms_per_step",
  "share", "gflop_per_step", "gflop_per_busy_s"} (the last two None for rows without convolutions or dots).
  """
  if steps < 1:
    raise UserError(f"profile steps must be >= 1, got {steps}.")
  instructions = parse_hlo(compiled.as_text())
  costs = instruction_costs(instructions)
  jax.block_until_ready(call())  # anything first-call (thread pools, allocations) stays out of the trace
  with jax.profiler.trace(trace_dir):
    start = time.perf_counter()
    for _ in range(steps):
      out = call()
    jax.block_until_ready(out)
    wall_s = (time.perf_counter() - start) / steps
  events = _op_events(trace_dir, set(instructions))
  if not events:
    raise RuntimeError(f"the trace in {trace_dir} has no events named after the compiled step's instructions; "
                       "this backend's profiler names its op events differently.")
  time_ns: dict[str, int] = collections.Counter()
  for name, duration in events:
    time_ns[name] += duration
  by_module: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
  by_primitive: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
  by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
  without_metadata = 0
  for name, ns in time_ns.items():
    inst = instructions[name]
    flops, kind = costs[name]
    op_name = inst.op_name
    if op_name is None:
      without_metadata += ns
      key_module = key_primitive = f"(no metadata) {inst.opcode}"
      # XLA-made instructions without metadata: the weight-gradient convolutions among them are gradient work.
      key_kind = f"{kind} (bwd)" if kind == "convolution" else kind
    else:
      key_module, key_primitive = module_path(op_name, module_depth), primitive(op_name)
      key_kind = with_pass(kind, op_name)
    for table, key in ((by_module, key_module), (by_primitive, key_primitive), (by_kind, key_kind)):
      table[key][0] += ns / steps
      table[key][1] += flops  # per call: an op split over threads still counts its FLOPs once
  busy_ns = sum(time_ns.values()) / steps
  counted_flops = sum(costs[name][0] for name in time_ns)

  def rows(table):
    out = []
    for key, (ns, flop) in sorted(table.items(), key=lambda kv: -kv[1][0]):
      out.append({"name": key, "ms_per_step": ns / 1e6, "share": ns / busy_ns,
                  "gflop_per_step": flop / 1e9 if flop else None,
                  "gflop_per_busy_s": flop / ns if flop and ns else None})
    return out

  return {"steps": steps, "trace_dir": trace_dir, "busy_ms_per_step": busy_ns / 1e6,
          "wall_ms_per_step": wall_s * 1e3, "note": _cpu_note(), "conv_dot_gflop_per_step": counted_flops / 1e9,
          "attributed_fraction": 1.0 - without_metadata / steps / busy_ns if busy_ns else None,
          "by_kind": rows(by_kind), "by_primitive": rows(by_primitive), "by_module": rows(by_module)}


def _cpu_note() -> str | None:
  if jax.devices()[0].platform != "cpu" or "--xla_cpu_multi_thread_eigen=false" in os.environ.get("XLA_FLAGS", ""):
    return None
  return ("multi-threaded XLA:CPU runs large dots and convolutions asynchronously on its thread pool, and their "
          "events then cover little more than the launch: per-op times and GFLOP/busy-s are unreliable. For per-op "
          "rates profile one pinned thread: XLA_FLAGS='--xla_cpu_multi_thread_eigen=false "
          "intra_op_parallelism_threads=1' taskset -c 0 python experiments/benchmark.py ... (README 'Performance').")


def format_profile(profile: dict[str, Any], top: int = 20) -> str:
  """Three readable tables (by op kind, by primitive, by module), `top` rows each."""
  lines = [f"profile of {profile['steps']} step(s): {profile['wall_ms_per_step']:.1f} ms per traced step, "
           f"{profile['busy_ms_per_step']:.1f} ms in op events (summed over threads), "
           f"{profile['conv_dot_gflop_per_step']:.2f} GFLOP in convolutions and dots; trace in {profile['trace_dir']}"]
  if profile.get("note"):
    lines.append("note: " + profile["note"])
  for title in ("by_kind", "by_primitive", "by_module"):
    lines.append(f"{title.replace('_', ' ')}:" + " " * 40 + "ms/step  share  GFLOP  GFLOP/busy-s")
    for row in profile[title][:top]:
      gflop = "" if row["gflop_per_step"] is None else f"{row['gflop_per_step']:7.2f}"
      rate = "" if row["gflop_per_busy_s"] is None else f"{row['gflop_per_busy_s']:9.1f}"
      lines.append(f"  {row['name'][:48]:48} {row['ms_per_step']:8.1f} {100 * row['share']:5.1f}% {gflop:>7} {rate:>9}")
  return "\n".join(lines)
