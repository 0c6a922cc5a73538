"""Ahead-of-time lowering for accelerators this machine does not have (experiments/lower.py).

Traces the functions a run compiles (both stages' train steps, the encoder pass, the DDIM sampler) from abstract
shapes on the current mesh, and lowers them for each requested platform (`jax.jit(...).trace(...).lower(
lowering_platforms=...)`): a CPU-only construct, a host callback inside a step or a sharding that only works on
fake CPU devices fails here, on a laptop, instead of on the first TPU or GPU bill. Lowering is not compiling: a
kernel the platform's compiler rejects, or memory it lacks, still shows only on the device; and
`unet.attention_impl=cudnn` cannot be checked at all (JAX asks the cuDNN library for its version while tracing).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from concept_diffusion import parallel, states
from concept_diffusion.checkpoint import first_line
from concept_diffusion.models.encdiff import EncDiff, EncDiffVariables, build_model, compute_dtype_name
from concept_diffusion.tools import benchmark
from concept_diffusion.train import diffusion_stage, first_stage
from concept_diffusion.errors import UserError

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  trace: Callable[[], Any]  # -> a jax.stages.Traced
  images: int = 0  # images one call processes (a train step's batch, an encoder call, the sampled images)
  # compiled -> what the compiled step communicates against the least it must (benchmark.communication); train
  # steps of the diffusion stage only.
  communication: Callable[[Any], dict[str, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class Result:
  target: str
  platform: str
  ok: bool
  seconds: float
  error: str = ""


def _key() -> jax.ShapeDtypeStruct:
  return jax.eval_shape(lambda: jax.random.PRNGKey(0))


def targets(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> list[Target]:
  """What a training run and its evaluation compile, as abstract calls on `mesh`."""
  model: EncDiff = build_model(config)
  image = lambda batch: jax.ShapeDtypeStruct((batch,) + model.image_shape, jnp.float32)  # noqa: E731
  out = []
  ae_params = model.abstract_ae_params()
  if model.first_stage is not None and "first_stage" in config.stages:
    fs_state = parallel.with_shardings(states.abstract_first_stage_state(config),
                                       states.first_stage_state_shardings(config, mesh))
    fs_step = first_stage.make_train_step(config, mesh)
    out.append(Target("first_stage_train_step",
                      lambda: fs_step.trace(fs_state, image(config.first_stage.batch_size), _key()),
                      images=config.first_stage.batch_size))
  if "diffusion" in config.stages:
    tx, step = diffusion_stage.step_for_config(config, model, mesh)
    state = parallel.with_shardings(states.abstract_state(model, tx),
                                    states.diffusion_state_shardings(model, tx, mesh, config.mesh.fsdp_min_size))
    sharded_ae = None if ae_params is None else parallel.with_shardings(
        ae_params, parallel.fsdp_shardings(ae_params, mesh, config.mesh.fsdp_min_size))
    out.append(Target("diffusion_train_step",
                      lambda: step.trace(state, image(config.train.batch_size), ae_params, _key()),
                      images=config.train.batch_size,
                      communication=lambda compiled: benchmark.communication(
                          compiled, model, state, sharded_ae, image(config.train.batch_size), mesh)))
    v = EncDiffVariables(state.params, state.batch_stats, state.ema_unet, state.scale_factor)
    out.append(Target("encode", lambda: jax.jit(model.encode).trace(v, image(config.eval.batch_size)),
                      images=config.eval.batch_size))
    tokens = jax.ShapeDtypeStruct((config.sample.num_images, model.num_tokens, model.token_dim), jnp.float32)
    out.append(Target(f"ddim_sampler_{config.sample.ddim_steps}", lambda: EncDiff.sample_jit.trace(
        model, v, ae_params, tokens, _key(), steps=config.sample.ddim_steps, eta=config.sample.eta),
        images=config.sample.num_images))
  return out


def for_platform(config: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
  """The config as that platform would run it: the "auto" kernels resolve by the backend at trace time, which here
  is the CPU, so for an accelerator they are set to what "auto" picks there (XLA's convolution and attention), and
  train.compute_dtype="auto" to that platform's dtype."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.compute_dtype = compute_dtype_name(config, platform)
  if platform != "cpu":
    for field in ("conv_impl", "attention_impl"):
      if config.unet[field] == "auto":
        config.unet[field] = "xla"
  return config


def lower_all(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
              platforms: Sequence[str]) -> list[Result]:
  """One Result per (target, platform); a failure is recorded with its first error line, never raised."""
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown:
    raise UserError(f"--platforms: unknown {unknown}; known: {', '.join(PLATFORMS)}.")
  results = []
  for group in ([p for p in platforms if p == "cpu"], [p for p in platforms if p != "cpu"]):
    if not group:
      continue
    try:
      group_targets = targets(for_platform(config, group[0]), mesh)
    except Exception as e:  # pylint: disable=broad-except  (e.g. cuDNN attention cannot be traced without cuDNN)
      results += [Result("model", p, False, 0.0, f"build: {first_line(e)}") for p in group]
      continue
    for target in group_targets:
      try:
        traced = target.trace()
      except Exception as e:  # pylint: disable=broad-except  (a trace error is a result to report)
        results += [Result(target.name, p, False, 0.0, f"trace: {first_line(e)}") for p in group]
        continue
      for platform in group:
        start = time.perf_counter()
        try:
          traced.lower(lowering_platforms=(platform,))
          results.append(Result(target.name, platform, True, time.perf_counter() - start))
        except Exception as e:  # pylint: disable=broad-except
          results.append(Result(target.name, platform, False, time.perf_counter() - start, first_line(e)))
  return results


def format_results(results: Sequence[Result]) -> str:
  width = max(len(r.target) for r in results) if results else 0
  return "\n".join(f"{r.target:<{width}}  {r.platform:<5}  " + (f"OK  ({r.seconds:.1f} s)" if r.ok else
                                                                   f"FAILED  {r.error}") for r in results)
