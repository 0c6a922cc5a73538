"""Compiling for a TPU slice on this CPU-only machine with libtpu (experiments/compile.py, tools/aot_compile.py).

CI installs the [tpu] extra (.ci/run), so there these tests run; without libtpu the compile test is skipped with
the reason, and the missing-libtpu message is still checked.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from concept_diffusion.tools import aot_compile, tpu_topology
from configs import smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "compile.py")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]'; CI installs it)")


@pytest.fixture(scope="module")
def smoke_on_v5e_2x2(tmp_path_factory):
  """Both train steps of the smoke config compiled for 4 v5e chips on a (2, 2) data x fsdp mesh."""
  out = tmp_path_factory.mktemp("compile") / "smoke.json"
  proc = subprocess.run([sys.executable, SCRIPT, "--config=smoke", "--topology=v5e:2x2", "--mesh=2,2",
                         "--batch_size=8", "--config.first_stage.batch_size=8", "--config.train.compute_dtype=auto", "--config.mesh.fsdp_min_size=64",
                         "--functions=first_stage_train_step,diffusion_train_step", f"--json={out}"],
                        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        timeout=1200)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  with open(out, encoding="utf-8") as f:
    reports = json.load(f)["reports"]
  assert len(reports) == 1
  return reports[0], proc.stdout


@needs_libtpu
def test_the_smoke_config_compiles_for_v5e_with_memory_cost_and_collectives(smoke_on_v5e_2x2):
  report, stdout = smoke_on_v5e_2x2
  assert (report["device_kind"], report["num_devices"], report["mesh"]) == ("TPU v5 lite", 4,
                                                                            {"data": 2, "fsdp": 2})
  assert report["compute_dtype"] == "bfloat16"  # compute_dtype=auto as a TPU resolves it
  assert report["estimate_source"] == aot_compile.ESTIMATE_SOURCE == "compiler cost model, not a measurement"
  assert aot_compile.ESTIMATE_SOURCE in stdout
  functions = {f["function"]: f for f in report["functions"]}
  assert sorted(functions) == ["diffusion_train_step", "first_stage_train_step"]
  for f in functions.values():
    assert f["ok"] and f["error"] == "" and f["compile_s"] > 0
    memory = f["memory"]
    assert memory["argument_bytes"] > 0 and memory["output_bytes"] > 0
    assert memory["alias_bytes"] > 0  # the donated train state is updated in place
    assert f["bytes_per_device"] >= memory["argument_bytes"]
    assert f["hbm_bytes"] == 16 * 1024 ** 3 and f["fits"] is True
    cost = f["cost"]
    assert cost["flops_per_device"] > 0 and cost["bytes_accessed_per_device"] > 0
    est = f["estimate"]
    assert est["compute_model"] in ("optimal_seconds", "roofline")
    assert est["source"] == aot_compile.ESTIMATE_SOURCE
    assert est["step_s"] == pytest.approx(est["compute_s"] + est["communication_s"])
    assert est["images_per_s"] == pytest.approx(8 / est["step_s"])
    assert est["mfu"] == pytest.approx(cost["flops_per_device"] / est["step_s"] / 197e12)
    assert 0 < est["mfu"] < 1 and 0 <= est["communication_share"] < 1
    assert f["remat_warnings"] == 0
  diffusion = functions["diffusion_train_step"]
  # FSDP over 2 chips: the weights are gathered and the gradients reduced, by the TPU compiler's own collectives.
  by_kind = diffusion["collective_wire_bytes_by_kind"]
  assert by_kind["all-gather"] > 0 and by_kind["all-reduce"] + by_kind["reduce-scatter"] > 0
  assert diffusion["estimate"]["communication_s"] == pytest.approx(
      diffusion["collective_wire_bytes_per_device"] / tpu_topology.CHIPS["v5e"].ici_bytes_per_s)
  # The TPU-compiled step sends at most 1.2x the gather-once minimum (tools/collectives.py).
  assert diffusion["min_collective_wire_bytes_per_device"] > 0
  assert 0 < diffusion["collective_ratio"] <= 1.2, diffusion["collective_ratio"]


def test_without_libtpu_the_command_says_so_in_one_line():
  """A host without the [tpu] extra gets one line naming the extra, exit 2, whether or not libtpu is here."""
  hide_libtpu = ("import importlib.util as u, runpy, sys; find = u.find_spec; "
                 "u.find_spec = lambda name, *a, **k: None if name == 'libtpu' else find(name, *a, **k); "
                 f"sys.argv = [{SCRIPT!r}, '--config=smoke']; runpy.run_path({SCRIPT!r}, run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", hide_libtpu], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [f"error: {tpu_topology.LIBTPU_MISSING}"]


def test_topology_names_resolve_to_their_chip_and_a_bad_one_is_named():
  assert tpu_topology.chip_of("v5e:2x4").hbm_bytes == 16 * 1024 ** 3
  assert tpu_topology.chip_of("v5p:2x2x1").megacore and not tpu_topology.chip_of("v6e:2x4").megacore
  with pytest.raises(ValueError, match="v5e-8: expected <chip>:<shape>"):
    tpu_topology.chip_of("v5e-8")


def test_the_estimate_adds_communication_to_the_cost_model_time():
  chip = tpu_topology.CHIPS["v5e"]
  cost = {"flops_per_device": 2e12, "bytes_accessed_per_device": 1e9, "optimal_seconds": 0.02}
  est = aot_compile.estimate(cost, wire_bytes=int(2e9), chip=chip, peak_flops=197e12, images=256)
  assert est["compute_model"] == "optimal_seconds"
  assert est["communication_s"] == pytest.approx(2e9 / 200e9)  # 10 ms at 200 GB/s one way
  assert est["step_s"] == pytest.approx(0.03) and est["communication_share"] == pytest.approx(1 / 3)
  assert est["images_per_s"] == pytest.approx(256 / 0.03) and est["mfu"] == pytest.approx(2e12 / 0.03 / 197e12)
  v4 = aot_compile.estimate(cost, int(2e9), tpu_topology.CHIPS["v4"], 275e12, 256)
  assert v4["communication_s"] is None and v4["communication_share"] is None and v4["step_s"] == 0.02


def test_without_a_cost_model_time_the_estimate_is_the_roofline_of_flops_and_bytes():
  """The TPU cost model returns a negative optimal_seconds for the official-size step."""
  chip = tpu_topology.CHIPS["v5e"]
  memory_bound = {"flops_per_device": 2e11, "bytes_accessed_per_device": 8.19e9, "optimal_seconds": -403.9}
  est = aot_compile.estimate(memory_bound, 0, chip, 197e12, 32)
  assert est["compute_model"] == "roofline" and est["compute_s"] == pytest.approx(8.19e9 / 819e9)
  compute_bound = dict(memory_bound, bytes_accessed_per_device=1e6)
  assert aot_compile.estimate(compute_bound, 0, chip, 197e12, 32)["compute_s"] == pytest.approx(2e11 / 197e12)
  assert aot_compile.estimate({"optimal_seconds": None}, 0, chip, 197e12, 32) is None


def test_the_config_is_compiled_as_a_tpu_runs_it():
  config = smoke.get_config()
  config.train.compute_dtype = "auto"
  config = aot_compile.config_for_slice(config, (2, 2), 16)
  assert config.train.compute_dtype == "bfloat16"  # "auto" as a TPU resolves it
  assert (config.mesh.data, config.mesh.fsdp, config.train.batch_size) == (2, 2, 16)
  assert config.unet.conv_impl == "xla"


def test_a_saved_report_is_estimated_again_from_its_compiled_numbers():
  compiled = {"function": "diffusion_train_step", "ok": True, "images_per_call": 256, "estimate": None,
              "cost": {"flops_per_device": 2.34e11, "bytes_accessed_per_device": 1.819e10, "optimal_seconds": -403.9},
              "collective_wire_bytes_per_device": 113_000_000}
  failed = {"function": "encode", "ok": False, "error": "XlaRuntimeError: ..."}
  report = {"chip": "v5e", "peak_flops_per_chip": 197e12, "functions": [compiled, failed]}
  again = aot_compile.reestimate(report)
  est = again["functions"][0]["estimate"]
  assert est["compute_model"] == "roofline" and est["compute_s"] == pytest.approx(1.819e10 / 819e9)
  assert est["communication_s"] == pytest.approx(113e6 / 200e9)
  assert again["functions"][1] == failed and report["functions"][0]["estimate"] is None  # the input is left as it was
