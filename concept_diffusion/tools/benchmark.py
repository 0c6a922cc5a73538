"""What experiments/benchmark.py measures: the train steps, DDIM sampling, encoding and the input pipeline.

`run_benchmark(config, batch_sizes)` returns one JSON-able report: per batch size the compile time and FLOPs of
both stages' steps, the diffusion step's time (median and p90 after warm-up), throughput, MFU and memory, and
the time of the other loops a run spends its time in. Random (untrained) parameters: speed does not depend on
the values, and no workdir is needed.

For the diffusion step on the current mesh it also reports what the step communicates, from the compiled HLO
(tools/collectives.py states the byte convention): `collective_bytes_per_step` (per device, all kinds) and
`collective_bytes_by_kind`, `min_collective_bytes_per_step` (the least a data-parallel / FSDP step on this mesh
must move, in the same convention) and `remat_warnings`, how many times GSPMD logged an "involuntary full
rematerialization" (an activation it could not reshard and replicated in full) while compiling the step. The
warnings are only printed by a real compile: when the persistent cache served the step, it is compiled once more
with the cache off to count them (`remat_warnings_source`).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from concept_diffusion import data as data_lib
from concept_diffusion import parallel, states
from concept_diffusion.config import validate_config
from concept_diffusion.evaluation.encode import make_encode_step
from concept_diffusion.models.encdiff import EncDiff, EncDiffVariables, build_model, compute_dtype_name
from concept_diffusion import hardware, perf
from concept_diffusion.tools import collectives, profiling
from concept_diffusion.train import diffusion_stage, first_stage, stage, trainer
from concept_diffusion.errors import UserError


def make_batches(config, dataset, batch_size: int, mesh) -> Any:
  """The training input pipeline (an iterator of global batches), as train/trainer.py builds it."""
  return stage.make_pipeline(config, dataset, batch_size, config.seed + 1, mesh, "benchmark batch size")


class _CacheProbe:
  """Whether a compile was served by the persistent compilation cache, from JAX's own monitoring events (a
  directory listing would call a failed cache write, e.g. two processes racing on one entry, a hit)."""

  _EVENTS = {"/jax/compilation_cache/cache_hits": "hit", "/jax/compilation_cache/cache_misses": "miss"}

  def __init__(self):
    self.path = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None

  def timed_compile(self, lower) -> tuple[Any, float, float, str]:
    """(compiled, seconds tracing + lowering, seconds compiling or loading from the cache, cache outcome)."""
    seen = []
    listener = lambda event, **kwargs: seen.append(self._EVENTS[event]) if event in self._EVENTS else None
    jax.monitoring.register_event_listener(listener)
    try:
      start = time.perf_counter()
      lowered = lower()
      lowered_at = time.perf_counter()
      compiled = lowered.compile()
      lower_s, compile_s = lowered_at - start, time.perf_counter() - lowered_at
    finally:
      jax.monitoring.unregister_event_listener(listener)
    if not self.path:
      return compiled, lower_s, compile_s, "off"
    # Neither event: not looked up (quicker than jax_persistent_cache_min_compile_time_secs to compile).
    return compiled, lower_s, compile_s, seen[-1] if seen else "uncached"


@contextlib.contextmanager
def _persistent_cache_off():
  """Compiles inside the block neither read nor write the persistent compilation cache."""
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top  (JAX has no public switch)
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # JAX decides once per process whether the cache is used; decide again
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def _compile_counting_remat(probe: _CacheProbe, lower, count: bool) -> tuple[Any, float, float, str, int | None, str]:
  """`probe.timed_compile(lower)` with XLA's log captured: (..., remat warnings, where the count comes from). The
  captured log is written back to stderr, so a user still sees the warnings."""
  with collectives.captured_stderr() as log:
    compiled, lower_s, xla_s, cache = probe.timed_compile(lower)
  sys.stderr.write(log[0])
  if not count:
    return compiled, lower_s, xla_s, cache, None, "not counted"
  if cache != "hit":
    return compiled, lower_s, xla_s, cache, collectives.count_remat_warnings(log[0]), "the compile"
  with _persistent_cache_off(), collectives.captured_stderr() as log:
    # An option at its default value changes nothing in the program, but keys JAX's in-memory compilation caches
    # (the lowering's memoised executable, pxla's cached compilation) apart: XLA really compiles again.
    lower().compile(compiler_options={"xla_embed_ir_in_executable": False})
  sys.stderr.write(log[0])
  return (compiled, lower_s, xla_s, cache, collectives.count_remat_warnings(log[0]),
          "recompiled without the persistent cache")


def _specs(tree: Any) -> list:
  return [leaf.sharding.spec for leaf in jax.tree_util.tree_leaves(tree)]


def communication(compiled, model: EncDiff, state, ae_params, images, mesh) -> dict[str, Any]:
  """Collective bytes of the compiled diffusion step against the minimum for the mesh (tools/collectives.py)."""
  measured = collectives.collective_bytes(compiled.as_text())
  frozen, frozen_specs = [], []
  if ae_params is not None:  # the first stage's parameters the step reads (its encoder), not the decoder's
    used = jax.tree_util.tree_leaves(collectives.used_leaves(model.latents, ae_params, images))
    for leaf, spec, read in zip(jax.tree_util.tree_leaves(ae_params), _specs(ae_params), used):
      if read:
        frozen.append(leaf)
        frozen_specs.append(spec)
  minimum = collectives.min_collective_bytes(
      jax.tree_util.tree_leaves(state.params), _specs(state.params), (mesh.shape["data"], mesh.shape["fsdp"]), frozen,
      frozen_specs, has_reduce_scatter=mesh.devices.flat[0].platform != "cpu")
  return {"collective_bytes_per_step": measured["total"], "collective_bytes_by_kind": measured["by_kind"],
          "collectives_by_kind": measured["count_by_kind"],
          "min_collective_bytes_per_step": minimum["total"],
          "min_collective_bytes_by_kind": {k: v for k, v in minimum.items() if k != "total"},
          "collective_ratio": measured["total"] / minimum["total"] if minimum["total"] else None}


def random_ae_params(model: EncDiff, mesh, fsdp_min_size: int) -> Any:
  """Freshly initialised first-stage parameters in their shardings (None in pixel space)."""
  if model.first_stage is None:
    return None
  shardings = parallel.fsdp_shardings(model.abstract_ae_params(), mesh, fsdp_min_size)
  x = jnp.zeros((1,) + model.image_shape, jnp.float32)
  return jax.jit(lambda key: model.first_stage.init(key, x)["params"], out_shardings=shardings)(jax.random.PRNGKey(1))


def _first_stage_compile(config, mesh, images, key, probe: _CacheProbe) -> dict[str, Any]:
  if config.first_stage.kind == "none":
    return {"first_stage_compile_s": None, "first_stage_flops_per_step": None}
  abstract = parallel.with_shardings(states.abstract_first_stage_state(config),
                                     states.first_stage_state_shardings(config, mesh))
  step = first_stage.make_train_step(config, mesh)
  compiled, lower_s, compile_s, _ = probe.timed_compile(lambda: step.lower(abstract, images, key))
  flops = perf.compiled_flops(compiled)
  return {"first_stage_compile_s": lower_s + compile_s,
          "first_stage_flops_per_step": None if flops is None else flops * mesh.size}


def _sampling(config, model: EncDiff, state, ae_params, images, key, steps: int,
              probe: _CacheProbe) -> dict[str, Any]:
  if steps <= 0:
    return {"sample_steps": 0, "sample_compile_s": None, "sample_ms_per_image": None}
  tokens = jax.jit(model.encode_with_tokens)(state, images)[1]
  eta = float(config.sample.eta)
  compiled, lower_s, compile_s, _ = probe.timed_compile(
      lambda: EncDiff.sample_jit.lower(model, state, ae_params, tokens, key, steps=steps, eta=eta))
  call = lambda: compiled(state, ae_params, tokens, key)
  jax.block_until_ready(call())  # first call: buffers, thread pools
  batch_s = min(perf.time_calls(call, 2))  # other processes only ever slow a call down
  return {"sample_steps": steps, "sample_compile_s": lower_s + compile_s,
          "sample_ms_per_image": 1e3 * batch_s / len(images)}


def _encoder_throughput(model: EncDiff, state, dataset, batch_size: int, num_batches: int) -> float | None:
  """Images/s of whole-dataset evaluation's batch step (render + encode + copy to host), after warm-up."""
  if num_batches <= 0:
    return None
  step, fetch = make_encode_step(model.encode, dataset)
  # What evaluation passes: the encoder's part only.
  params = EncDiffVariables(state.params, state.batch_stats, None, state.scale_factor)
  batches = [np.arange(i * batch_size, (i + 1) * batch_size) % dataset.num_images for i in range(num_batches + 1)]
  np.asarray(step(params, fetch(batches[0])))
  start = time.perf_counter()
  for idx in batches[1:]:
    np.asarray(step(params, fetch(idx)))
  return num_batches * batch_size / (time.perf_counter() - start)


def _pipeline_throughput(config, dataset, batch_size: int, mesh, num_batches: int) -> float | None:
  if num_batches <= 0:
    return None
  batches = make_batches(config, dataset, batch_size, mesh)
  jax.block_until_ready(next(batches))  # compiles the renderer, fills the prefetch buffer
  start = time.perf_counter()
  for _ in range(num_batches):
    jax.block_until_ready(next(batches))
  return num_batches * batch_size / (time.perf_counter() - start)


def benchmark_batch(config, batch_size: int, *, mesh, dataset, steps: int, warmup: int, sample_steps: int,
                    encode_batches: int, pipeline_batches: int, with_first_stage: bool,
                    probe: _CacheProbe, profile_steps: int = 0, profile_dir: str | None = None,
                    count_remat_warnings: bool = True) -> dict[str, Any]:
  """Every measurement at one global batch size (MFU is filled in by `run_benchmark`, which knows the peak)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.batch_size = config.first_stage.batch_size = config.eval.batch_size = batch_size
  model = build_model(config)
  key = jax.device_put(jax.random.PRNGKey(0), parallel.replicated(mesh))
  batches = make_batches(config, dataset, batch_size, mesh)
  images = batches.batch_at(0)
  result: dict[str, Any] = {"batch_size": batch_size}
  if with_first_stage:
    result.update(_first_stage_compile(config, mesh, images, key, probe))

  ae_params = random_ae_params(model, mesh, config.mesh.fsdp_min_size)
  tx, step = diffusion_stage.step_for_config(config, model, mesh)
  state = diffusion_stage.create_sharded_state(model, tx, jax.random.PRNGKey(0), mesh, config.mesh.fsdp_min_size)
  compiled, lower_s, xla_s, cache, remat, remat_source = _compile_counting_remat(
      probe, lambda: step.lower(state, images, ae_params, key), count_remat_warnings)
  result.update(communication(compiled, model, state, ae_params, images, mesh), remat_warnings=remat,
                remat_warnings_source=remat_source)
  call = lambda s: compiled(s, images, ae_params, key)
  for _ in range(warmup):
    state, metrics = call(state)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = call(state)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  timing = perf.summarize(times)
  per_device = perf.compiled_flops(compiled)
  flops = None if per_device is None else per_device * mesh.size  # SPMD: the compiled program is one device's
  memory = perf.compiled_memory(compiled)
  step_s = timing["median_ms"] / 1e3
  result.update(
      train_step_ms=timing["median_ms"], train_step_p90_ms=timing["p90_ms"], timed_steps=steps,
      images_per_s=batch_size / step_s, flops_per_step=flops,
      achieved_flops_per_s=None if flops is None else flops / step_s,
      # compile_s is what a run waits for: tracing + lowering (lower_s) plus XLA's compile or cache load.
      mfu=None, compile_s=lower_s + xla_s, lower_s=lower_s, compile_cache=cache,
      loss=float(metrics["loss"]),
      memory_bytes=None if memory is None else memory["total_bytes"], memory=memory,
      peak_device_memory_bytes=perf.peak_device_memory(mesh.devices.flat))
  if profile_steps > 0:
    holder = [state]

    def profiled_step():
      holder[0], step_metrics = call(holder[0])
      return step_metrics

    result["profile"] = profiling.profile_compiled(
        compiled, profiled_step, steps=profile_steps,
        trace_dir=os.path.join(profile_dir or "/tmp/concept_diffusion_profile", f"batch_{batch_size}"))
    result["profile"]["xla_gflop_per_step"] = None if per_device is None else per_device / 1e9
    state = holder[0]
  result.update(_sampling(config, model, state, ae_params, images, key, sample_steps, probe))
  result["encode_images_per_s"] = _encoder_throughput(model, state, dataset, batch_size, encode_batches)
  result["pipeline_images_per_s"] = _pipeline_throughput(config, dataset, batch_size, mesh, pipeline_batches)
  return result


def run_benchmark(config, batch_sizes: Sequence[int] | None = None, *, steps: int = 20, warmup: int = 2,
                  sample_steps: int | None = None, encode_batches: int = 5, pipeline_batches: int = 30,
                  with_first_stage: bool = True, profile_steps: int = 0,
                  profile_dir: str | None = None, count_remat_warnings: bool = True) -> dict[str, Any]:
  """The report: devices, peak FLOP/s and one result per batch size (see the module docstring)."""
  validate_config(config)
  batch_sizes = list(batch_sizes or [config.train.batch_size])
  devices = jax.devices()
  for batch_size in batch_sizes:  # all checked before the first (slow) measurement
    perf.check_batch_divides(batch_size, len(devices))
  if steps < 1 or warmup < 0:
    raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}.")
  dtype = compute_dtype_name(config)  # "auto" resolved for these devices
  peak, peak_source = perf.device_peak_flops(devices[0], dtype)
  peaks = [peak]
  mesh = parallel.make_mesh(config.mesh)
  dataset = data_lib.get_dataset(config.data)
  probe = _CacheProbe()
  report = {
      "config": config.name, "device_kind": devices[0].device_kind, "platform": devices[0].platform,
      "cpu_bf16_flags": hardware.cpu_bf16_flags(), "processes": jax.process_count(),
      "num_devices": len(devices), "compute_dtype": dtype, "peak_source": peak_source,
      "jax_version": jax.__version__, "mesh": dict(mesh.shape),
      "compilation_cache_dir": probe.path, "load_average_start": _load_average(), "results": [],
  }
  for batch_size in batch_sizes:
    report["results"].append(benchmark_batch(
        config, batch_size, mesh=mesh, dataset=dataset, steps=steps, warmup=warmup,
        sample_steps=config.sample.ddim_steps if sample_steps is None else sample_steps,
        encode_batches=encode_batches, pipeline_batches=pipeline_batches, with_first_stage=with_first_stage,
        probe=probe, profile_steps=profile_steps, profile_dir=profile_dir,
        count_remat_warnings=count_remat_warnings))
    if devices[0].platform == "cpu":  # a measured peak: the machine's other users lower it while they run
      peaks.append(perf.device_peak_flops(devices[0], dtype)[0])
  # The best peak seen over the run: other processes only ever slow the matmul down, and an MFU against a
  # momentarily depressed peak would flatter the step (and could exceed 100%).
  peak = None if peaks[0] is None else max(peaks)
  total_peak = perf.run_peak_flops(peak, devices[0].platform)
  report.update(peak_flops=total_peak, peak_flops_per_device=peak,
                peak_flops_samples=[p for p in peaks if p is not None], load_average_end=_load_average())
  for result in report["results"]:
    step_s = result["train_step_ms"] / 1e3
    result["mfu"] = perf.mfu(result["flops_per_step"], step_s, total_peak)
  return report


def _load_average() -> list[float] | None:
  # Shared machines: other processes slow every number here down; the report says how busy it was.
  return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def format_number(value: Any, scale: float = 1.0, digits: int = 1) -> str:
  return "-" if value is None else f"{value / scale:.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
  """A readable table of the report."""
  peak = report["peak_flops"]
  mesh = "x".join(str(n) for n in report["mesh"].values()) if report.get("mesh") else "?"
  lines = [f"{report['config']} on {report['num_devices']} x {report['device_kind']} ({report['platform']}), "
           f"mesh {mesh} (data x fsdp), "
           f"{report['compute_dtype']}; peak {format_number(peak, 1e12, 3)} TFLOP/s ({report['peak_source']})"]
  header = ("batch", "step ms", "p90 ms", "img/s", "GFLOP/step", "TFLOP/s", "MFU", "compile s", "mem GB",
            "sample ms/img", "encode img/s", "input img/s", "comm MB (min)", "remat")
  rows = [header]
  for r in report["results"]:
    rows.append((str(r["batch_size"]), format_number(r["train_step_ms"]), format_number(r["train_step_p90_ms"]),
                 format_number(r["images_per_s"]), format_number(r["flops_per_step"], 1e9), format_number(r["achieved_flops_per_s"], 1e12, 3),
                 "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                 f"{r['compile_s']:.1f} ({r['compile_cache']})", format_number(r["memory_bytes"], 1e9, 2),
                 format_number(r["sample_ms_per_image"]), format_number(r["encode_images_per_s"], 1, 0),
                 format_number(r["pipeline_images_per_s"], 1, 0),
                 f"{format_number(r['collective_bytes_per_step'], 1e6)} ({format_number(r['min_collective_bytes_per_step'], 1e6)})",
                 "-" if r["remat_warnings"] is None else str(r["remat_warnings"])))
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
  for r in report["results"]:
    if r.get("first_stage_compile_s") is not None:
      lines.append(f"batch {r['batch_size']}: first-stage step compiles in {r['first_stage_compile_s']:.1f} s, "
                   f"{format_number(r['first_stage_flops_per_step'], 1e9)} GFLOP/step; DDIM {r['sample_steps']} steps "
                   f"(compile {format_number(r['sample_compile_s'])} s)")
  for r in report["results"]:
    if r.get("profile"):
      lines.append(f"batch {r['batch_size']}: " + profiling.format_profile(r["profile"]))
  if peak is None:
    lines.append(f"MFU not reported: {report['peak_source']}")
  return "\n".join(lines)
