"""perf.py arithmetic, the benchmark CLI, and the compile-once properties the benchmark relies on."""
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from concept_diffusion import parallel, states
from concept_diffusion.checkpoint import StageCheckpoints
from concept_diffusion.models.encdiff import EncDiff, build_model
from concept_diffusion import perf
from concept_diffusion.tools import collectives, profiling
from concept_diffusion.train import diffusion_stage
from tests.conftest import REPO_ROOT


def test_mfu_arithmetic_and_unknowns():
  assert perf.mfu(2e12, 0.5, 8e12) == pytest.approx(0.5)  # 4 TFLOP/s achieved of 8
  assert perf.mfu(None, 0.5, 8e12) is None
  assert perf.mfu(2e12, 0.5, None) is None


def test_published_peaks_and_unknown_device_kinds():
  assert perf.published_peak_flops("TPU v4", "bfloat16") == 275e12
  assert perf.published_peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert perf.published_peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12  # not the SXM number
  assert perf.published_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert perf.published_peak_flops("NVIDIA A100-SXM4-40GB", "float32") == 156e12  # TF32
  assert perf.published_peak_flops("Quantum Abacus 9000", "bfloat16") is None
  mystery = types.SimpleNamespace(platform="gpu", device_kind="Quantum Abacus 9000")
  peak, message = perf.device_peak_flops(mystery, "float32")
  assert peak is None and "no published peak" in message and "Quantum Abacus 9000" in message


def test_flops_and_memory_of_a_known_matmul():
  m, k, n = 64, 128, 32
  a, b = jnp.ones((m, k)), jnp.ones((k, n))
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  assert perf.compiled_flops(compiled) == 2 * m * n * k
  memory = perf.compiled_memory(compiled)
  assert memory["argument_bytes"] == 4 * (m * k + k * n) and memory["output_bytes"] == 4 * m * n
  assert memory["total_bytes"] >= memory["argument_bytes"] + memory["output_bytes"]


def test_conv_and_dot_flops_are_read_from_the_compiled_hlo():
  """Forward and gradient of a 3x3 SAME convolution feeding a dot: every conv/dot of the compiled module, the
  weight-gradient convolution (kernel and output roles swapped) included, adds up to the FLOPs by hand."""
  def loss(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.tanh(y.reshape(-1, 16) @ m))

  x, w, m = jnp.ones((4, 8, 8, 3)), jnp.ones((3, 3, 3, 16)), jnp.ones((16, 5))
  conv = 2 * (4 * 8 * 8 * 16) * (3 * 3 * 3)  # padded taps included: the hardware multiplies them
  dot = 2 * (4 * 8 * 8) * 16 * 5
  for fn, expected in ((loss, conv + dot), (jax.grad(loss, argnums=(0, 1, 2)), 3 * conv + 3 * dot)):
    compiled = jax.jit(fn).lower(x, w, m).compile()
    instructions = profiling.parse_hlo(compiled.as_text())
    costs = profiling.instruction_costs(instructions)
    assert sum(profiling.conv_dot_flops(i, instructions) for i in instructions.values()) == expected
    kinds = {kind for _, kind in costs.values()}
    assert {"convolution", "dot"} <= kinds
    # XLA's own count skips the padded taps, so it is lower (and includes the tanh).
    assert perf.compiled_flops(compiled) < expected


def test_op_names_map_to_modules_and_primitives():
  op_name = "jit(guarded)/transpose(jvp(UNet))/output_blocks_4_0/in_layers_2/conv_general_dilated"
  assert profiling.module_path(op_name, 2) == "output_blocks_4_0/in_layers_2"
  assert profiling.module_path(op_name, 1) == "output_blocks_4_0"
  assert profiling.primitive(op_name) == "conv_general_dilated (bwd)"
  assert profiling.primitive("jit(step)/jvp(UNet)/input_blocks_1_1/attn1/dot_general") == "dot_general"
  assert profiling.module_path("jit(step)/add", 3) == "(top level)"
  # Control flow is not a module, but a module whose name merely starts like it is.
  assert profiling.module_path("jit(f)/while/body/conditioning/cond/branch_1_fun/dense/dot_general", 3) == \
      "conditioning/dense"


def test_cpu_peak_is_measured_and_plausible():
  peak = perf.measure_matmul_peak(size=256, repeats=2)
  assert 1e8 < peak < 1e14  # a real FLOP/s figure, not a placeholder


def test_batch_must_divide_over_devices():
  perf.check_batch_divides(8, 4)
  with pytest.raises(ValueError, match="does not divide over the 4 devices"):
    perf.check_batch_divides(6, 4)


def test_summarize_median_and_p90():
  stats = perf.summarize([0.001 * i for i in range(1, 11)])
  assert stats["median_ms"] == pytest.approx(5.5) and stats["p90_ms"] == pytest.approx(9.1)


def _pixel_smoke(dtype="float32"):
  """The smoke config, smaller still: compile time (which scales with the number of layers) dominates these tests."""
  config = smoke.get_config()
  config.first_stage.kind = "none"  # pixel space: no autoencoder to compile
  config.stages = ("diffusion",)
  config.unet.channel_mult = (1,)  # one resolution, one ResBlock + SpatialTransformer per side
  config.unet.attention_resolutions = (1,)
  config.train.compute_dtype = dtype
  return config


def _model_state_step(config, mesh):
  """The model, its optimiser, a fresh state and the jitted train step, as the trainer builds them."""
  model = build_model(config)
  tx, step = diffusion_stage.step_for_config(config, model, mesh)
  state = diffusion_stage.create_sharded_state(model, tx, jax.random.PRNGKey(0), mesh, config.mesh.fsdp_min_size)
  return model, tx, state, step


def _losses(config, num_steps):
  mesh = parallel.make_mesh(config.mesh)
  _, _, state, step = _model_state_step(config, mesh)
  images = jax.random.uniform(jax.random.PRNGKey(1), (config.train.batch_size, 16, 16, 3), minval=-1, maxval=1)
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, images, None, jax.random.PRNGKey(2))
    losses.append(float(metrics["loss"]))
  return step, losses


def test_train_step_compiles_once_across_steps_and_a_resume(tmp_path):
  config = _pixel_smoke()
  mesh = parallel.make_mesh(config.mesh)
  model, tx, state, step = _model_state_step(config, mesh)
  images = jax.random.uniform(jax.random.PRNGKey(1), (config.train.batch_size, 16, 16, 3), minval=-1, maxval=1)
  for _ in range(2):
    state, metrics = step(state, images, None, jax.random.PRNGKey(2))
  # The step compiled ahead of time on its first call (jit_step.TrainStep) serves every call: jit's own cache,
  # which only a call that does not fit that executable would fill, stays empty.
  assert step.compiled is not None and step.jitted._cache_size() == 0  # pylint: disable=protected-access
  ckpts = StageCheckpoints(str(tmp_path / "diffusion"), async_save=False)
  ckpts.save(2, state)
  ckpts.wait()
  # A resume restores onto the template train.py builds: the restored arrays must hit the same executable (a
  # changed sharding, dtype or weak type would silently compile the step again on every restart).
  template = parallel.with_shardings(states.abstract_state(model, tx),
                                     states.diffusion_state_shardings(model, tx, mesh, config.mesh.fsdp_min_size))
  restored = ckpts.restore(template)
  ckpts.close()
  resumed, resumed_metrics = step(restored, images, None, jax.random.PRNGKey(2))
  continued, continued_metrics = step(state, images, None, jax.random.PRNGKey(2))
  assert step.jitted._cache_size() == 0  # pylint: disable=protected-access
  assert float(resumed_metrics["loss"]) == float(continued_metrics["loss"])
  assert int(resumed.step) == int(continued.step) == 3 and np.isfinite(float(metrics["loss"]))


_CACHE_PROBE_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from concept_diffusion.tools import cli
cli.enable_compilation_cache({cache!r})
import jax
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
from concept_diffusion import parallel
from concept_diffusion.tools import benchmark
from tests import test_benchmark
config = test_benchmark._pixel_smoke()
mesh = parallel.make_mesh(config.mesh)
_, _, state, step = test_benchmark._model_state_step(config, mesh)
images = jax.numpy.zeros((config.train.batch_size, 16, 16, 3))
print("cache:", benchmark._CacheProbe().timed_compile(lambda: step.lower(state, images, None, jax.random.PRNGKey(0)))[-1])
"""


def test_a_restarted_process_loads_the_train_step_from_the_persistent_cache(tmp_path):
  # The cache key must not depend on anything that changes between processes (paths, seeds, object ids):
  # otherwise every resume or evaluation compiles the step again.
  script = _CACHE_PROBE_SCRIPT.format(repo=str(REPO_ROOT), cache=str(tmp_path / "cache"))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.pop("JAX_ENABLE_COMPILATION_CACHE", None)
  outcomes = []
  for _ in range(2):
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes.append(proc.stdout.strip().splitlines()[-1])
  assert outcomes == ["cache: miss", "cache: hit"]


def test_the_persistent_cache_has_its_dependency_declared():
  # A plain `pip install -e .` lacked filelock, so the size bound that enable_compilation_cache sets made JAX
  # skip every cache read and write; the test above passed only where the [torch] extra had brought filelock in.
  requirements = importlib.metadata.requires("concept-diffusion") or []
  assert any(re.match(r"filelock\b", requirement) for requirement in requirements), requirements


def test_bfloat16_step_runs_and_its_loss_is_close_to_float32():
  _, fp32 = _losses(_pixel_smoke(), 3)
  _, bf16 = _losses(_pixel_smoke("bfloat16"), 3)
  np.testing.assert_allclose(bf16, fp32, rtol=0.02)  # bf16 keeps ~3 significant digits; the steps stay in step


def test_ddim_sampler_is_one_compiled_loop():
  config = _pixel_smoke()
  model = build_model(config)
  state = states.create_state(model, states.make_optimizer(config.train, states.learning_rate_schedule(config.train)),
                              jax.random.PRNGKey(0))
  tokens = jnp.zeros((2, config.encoder.num_tokens, config.encoder.token_dim))
  lower = lambda steps: EncDiff.sample_jit.lower(model, state, None, tokens, jax.random.PRNGKey(1), steps=steps,
                                                 eta=1.0).as_text()
  short, long = lower(3), lower(9)
  assert "stablehlo.while" in short  # the DDIM steps are one XLA loop ...
  assert abs(len(long) - len(short)) < 0.01 * len(short)  # ... not unrolled: 3x the steps, same program size
  cached = EncDiff.sample_jit._cache_size()  # pylint: disable=protected-access  (shared with other tests' models)
  for _ in range(2):
    model.sample_jit(state, None, tokens, jax.random.PRNGKey(1), steps=3, eta=1.0)
  assert EncDiff.sample_jit._cache_size() == cached + 1  # pylint: disable=protected-access


def _run_cli(*args, env=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false", **(env or {}))
  return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "experiments", "benchmark.py"), *args],
                        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=900, check=False)


def test_benchmark_cli_writes_the_report(tmp_path):
  out = tmp_path / "bench.json"
  proc = _run_cli("--config=configs/smoke.py", "--config.unet.channel_mult=(1,)",
                  "--config.unet.attention_resolutions=(1,)", "--batch_sizes=4", "--steps=2", "--warmup=1",
                  "--sample_steps=2", "--encode_batches=1", "--pipeline_batches=2", f"--json={out}",
                  "--profile_steps=2", f"--profile_dir={tmp_path / 'prof'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "MFU" in proc.stdout and "img/s" in proc.stdout and "by kind:" in proc.stdout
  report = json.loads(out.read_text())
  assert report["num_devices"] == 1 and report["device_kind"] and report["peak_flops"] > 0
  (result,) = report["results"]
  required = ("batch_size", "train_step_ms", "images_per_s", "flops_per_step", "mfu", "compile_s", "memory_bytes",
              "sample_ms_per_image")
  assert all(key in result for key in required), sorted(result)
  assert result["batch_size"] == 4 and result["train_step_ms"] > 0 and result["compile_s"] > 0
  assert result["images_per_s"] == pytest.approx(4e3 / result["train_step_ms"])
  assert result["flops_per_step"] > 1e6 and result["memory_bytes"] > 0 and result["sample_ms_per_image"] > 0
  assert 0 < result["mfu"] < 1.5  # a measured CPU peak can be beaten a little by a busy neighbour leaving
  assert result["first_stage_compile_s"] > 0 and result["encode_images_per_s"] > 0
  assert result["pipeline_images_per_s"] > 0 and np.isfinite(result["loss"])
  # One device: nothing to communicate (the 8-device counts: tests/test_meshes.py).
  assert result["collective_bytes_per_step"] == result["min_collective_bytes_per_step"] == 0
  assert result["remat_warnings"] == 0 and result["remat_warnings_source"] == "the compile"
  assert report["mesh"] == {"data": 1, "fsdp": 1} and "remat" in proc.stdout

  profile = result["profile"]
  assert profile["steps"] == 2 and list((tmp_path / "prof").rglob("*.xplane.pb"))
  assert profile["busy_ms_per_step"] > 0 and profile["attributed_fraction"] > 0.5
  kinds = {row["name"]: row for row in profile["by_kind"]}
  # Forward and gradient convolutions both ran and carry their FLOPs; elementwise fusions carry none.
  assert kinds["convolution"]["gflop_per_step"] > 0 and kinds["convolution (bwd)"]["gflop_per_step"] > 0
  assert kinds["fusion"]["gflop_per_step"] is None
  for table in ("by_kind", "by_primitive", "by_module"):
    assert sum(row["share"] for row in profile[table]) == pytest.approx(1.0)
    assert profile[table] == sorted(profile[table], key=lambda row: -row["ms_per_step"])
  # Convolution + dot FLOPs from the HLO shapes: the bulk of XLA's count, above it by the padded taps only.
  xla_gflop = profile["xla_gflop_per_step"]
  assert 0.8 * xla_gflop < profile["conv_dot_gflop_per_step"] < 1.5 * xla_gflop
  modules = [row["name"] for row in profile["by_module"]]
  assert any(name.startswith("input_blocks_") for name in modules), modules
  assert any("transformer_blocks_0/attn2" in name for name in modules), modules  # the concept cross-attention


def test_benchmark_cli_rejects_a_batch_that_does_not_divide_over_the_devices():
  proc = _run_cli("--config=configs/smoke.py", "--batch_sizes=3",
                  env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert proc.returncode == 2
  assert "batch size 3 does not divide over the 2 devices" in proc.stderr


# --- collectives: the HLO parser and the minimum (tools/collectives.py) -------------------------------------------

_COLLECTIVES_HLO = """HloModule jit_step, is_scheduled=true, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%x, %y)
}

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = f32[8,4]{1,0} get-tuple-element(%p), index=1
  %all-reduce.7 = f32[8,4]{1,0} all-reduce(%w), channel_id=1, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(%i, %all-reduce.7)
}

%cond (p.1: (s32[], f32[8,4])) -> pred[] {
  %p.1 = (s32[], f32[8,4]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%gather (g: f32[4,16]) -> f32[16,16] {
  %g = f32[4,16]{1,0} parameter(0)
  ROOT %all-gather = f32[16,16]{1,0} all-gather(%g), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
}

%gather.continued (g.1: f32[4,16]) -> f32[16,16] {
  %g.1 = f32[4,16]{1,0} parameter(0)
  ROOT %all-gather.1 = f32[16,16]{1,0} all-gather(%g.1), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
}

ENTRY %main (a: f32[4,16], b: bf16[16,16], s: f32[2], v: f32[3]) -> f32[16,16] {
  %a = f32[4,16]{1,0} parameter(0)
  %b = bf16[16,16]{1,0} parameter(1)
  %s = f32[2]{0} parameter(2)
  %v = f32[3]{0} parameter(3)
  %gathered = f32[16,16]{1,0} fusion(%a), kind=kCustom, calls=%gather
  %gathered.1 = f32[16,16]{1,0} fusion(%a), kind=kCustom, calls=%gather.continued
  %reduce-scatter = bf16[4,16]{1,0} reduce-scatter(%b), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([2,4]T(1,0)) {'axis_1'}, dimensions={0}, to_apply=%add
  %all-reduce = (f32[2]{0}, f32[3]{0}) all-reduce(%s, %v), channel_id=4, to_apply=%add
  %ar-start = f32[3]{0} all-reduce-start(%v), channel_id=5, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %ar-done = f32[3]{0} all-reduce-done(%ar-start)
  %cp-start = (f32[4,16]{1,0}, f32[4,16]{1,0}, u32[], u32[]) collective-permute-start(%a), source_target_pairs={{0,1}}
  %cp-done = f32[4,16]{1,0} collective-permute-done(%cp-start)
  %all-to-all = f32[4,16]{1,0} all-to-all(%a), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %init = (s32[], f32[8,4]{1,0}) tuple(%c.0, %w.0)
  %while = (s32[], f32[8,4]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[16,16]{1,0} add(%gathered, %gathered)
}
"""


def test_collective_wire_bytes_are_read_from_the_hlo_with_each_group_size():
  counted = collectives.collective_bytes(_COLLECTIVES_HLO)
  assert counted["by_kind"] == {
      # the gathered result (4 x 256 B over an iota group of 4) x 3/4, inside a called computation; its clone in
      # a second fusion (the same channel_id: the TPU compiler's async decomposition) is the same collective
      "all-gather": 3 * 1024 // 4,
      # the bf16 operand x 3/4: the mesh form's group is axis_1, 4 devices
      "reduce-scatter": 3 * 512 // 4,
      # 2(n-1)/n x S: a combined (tuple) all-reduce over all 8 devices (no groups named), an async pair over groups
      # of 4 counted once by its -start, and one over pairs in a loop run 3 times
      "all-reduce": 2 * 7 * 20 // 8 + 2 * 3 * 12 // 4 + 3 * 128,
      "collective-permute": 256,  # each device sends its buffer once
      "all-to-all": 7 * 256 // 8,
  }
  assert counted["total"] == 768 + 384 + (35 + 18 + 384) + 256 + 224
  assert counted["count_by_kind"]["all-reduce"] == 5 and counted["unknown_trip_counts"] == 0
  assert collectives.shape_bytes("(f32[2,3]{1,0}, bf16[4], pred[])") == 24 + 8 + 1
  assert collectives.count_remat_warnings("W spmd_partitioner.cc:656] [SPMD] Involuntary full rematerialization. "
                                          "The compiler cannot go ...\nok\n") == 1


def test_an_all_reduce_sends_twice_what_a_reduce_scatter_of_the_same_buffer_sends():
  for n in (2, 4, 8, 256):
    assert collectives.wire_bytes("all-reduce", 1000, n) == 2 * collectives.wire_bytes("reduce-scatter", 1000, n)
    assert collectives.wire_bytes("all-reduce", 1000, n) == pytest.approx(2 * (n - 1) / n * 1000)
  assert collectives.wire_bytes("all-gather", 1000, 1) == 0  # a group of one sends nothing


def test_minimum_wire_bytes_for_data_parallel_and_gather_once_fsdp():
  P = jax.sharding.PartitionSpec
  trainable = [jax.ShapeDtypeStruct((8, 4), jnp.float32), jax.ShapeDtypeStruct((10,), jnp.float32)]  # 128 + 40 B
  frozen = [jax.ShapeDtypeStruct((16, 16), jnp.bfloat16), jax.ShapeDtypeStruct((5,), jnp.float32)]  # 512 + 20 B
  fsdp_specs, frozen_specs = [P("fsdp", None), P()], [P(None, "fsdp"), P()]
  # Data parallel on 8: one all-reduce of every gradient, 2 x 7/8 x 168; frozen inputs replicated, nothing to gather.
  dp = collectives.min_collective_bytes(trainable, [P(), P()], (8, 1), frozen, [P(), P()])
  assert dp == {"all-reduce": 294, "all-gather": 0, "reduce-scatter": 0, "total": 294}
  # (4, 2): the sharded weight gathered once (1/2 x 128) and the frozen one (1/2 x 512), its gradient
  # reduce-scattered (1/2 x 128) and its shard all-reduced over data (2 x 3/4 x 64), the replicated gradient
  # all-reduced over all 8 (2 x 7/8 x 40).
  assert collectives.min_collective_bytes(trainable, fsdp_specs, (4, 2), frozen, frozen_specs) == {
      "all-gather": 64 + 256, "reduce-scatter": 64, "all-reduce": 96 + 70, "total": 550}
  # XLA:CPU has no reduce-scatter: the sharded gradient is all-reduced whole over all 8 (2 x 7/8 x 128) and sliced.
  assert collectives.min_collective_bytes(trainable, fsdp_specs, (4, 2), frozen, frozen_specs,
                                          has_reduce_scatter=False) == {
      "all-gather": 64 + 256, "reduce-scatter": 0, "all-reduce": 224 + 70, "total": 614}
  # (1, 8): no data axis to all-reduce the shards over.
  assert collectives.min_collective_bytes(trainable, fsdp_specs, (1, 8), frozen, frozen_specs)["total"] == (
      112 + 448 + 112 + 70)
  assert collectives.min_collective_bytes(trainable, fsdp_specs, (1, 1))["total"] == 0


def test_gather_once_bound_is_2s_plus_s_over_fsdp_as_buffers_and_tends_to_it_on_the_wire():
  """The docstring's formula: a large FSDP-sharded S on (D, F) needs (F-1)/F S + (F-1)/F S + 2(D-1)/D S/F on the
  wire, which for large D and F tends to 2S + 2S/F; gathering a second time in the backward pass would add S."""
  P = jax.sharding.PartitionSpec
  size = 1 << 20
  weight = [jax.ShapeDtypeStruct((size // 4,), jnp.float32)]
  for data, fsdp in ((4, 2), (16, 16), (1, 64)):
    bound = collectives.min_collective_bytes(weight, [P("fsdp")], (data, fsdp))["total"]
    expected = 2 * (fsdp - 1) / fsdp * size + 2 * (data - 1) / data * size / fsdp
    assert bound == pytest.approx(expected, abs=2)
    assert bound < 2 * size + 2 * size / fsdp


def test_used_leaves_finds_the_parameters_a_function_reads():
  tree = {"encoder": jnp.ones(3), "decoder": jnp.ones(4)}
  assert collectives.used_leaves(lambda t, x: t["encoder"] * x, tree, 2.0) == {"encoder": True, "decoder": False}


def test_local_processes_relaunches_the_same_command_without_the_flag():
  """encdiff-benchmark --local_processes=N runs itself again through encdiff-launch without that flag, so that the
  launched processes measure instead of launching again (tools/launch.relaunch_command)."""
  from concept_diffusion.tools import launch  # pylint: disable=g-import-not-at-top
  argv = ["--config=smoke", "--local_processes=2", "--batch_sizes=8", "--local_processes", "3", "--local_processes_x=1"]
  assert launch.relaunch_command("experiments.benchmark", argv, "local_processes") == [
      sys.executable, "-m", "experiments.benchmark", "--config=smoke", "--batch_sizes=8", "--local_processes_x=1"]
