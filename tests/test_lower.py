"""Ahead-of-time lowering for TPU and GPU on this CPU-only machine (experiments/lower.py)."""
import os
import subprocess
import sys

import jax
import pytest

from concept_diffusion import parallel
from concept_diffusion.tools import lower
from conftest import subprocess_env
from configs import smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_both_stages_encoder_and_sampler_lower_for_tpu_and_cuda_on_a_4x2_mesh(tmp_path, cache_dir):
  proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "lower.py"), "--config=smoke",
                         "--platforms=tpu,cuda", "--config.mesh.data=4", "--config.mesh.fsdp=2",
                         "--config.train.batch_size=8", "--config.first_stage.batch_size=8"],
                        cwd=tmp_path, env=subprocess_env(cache_dir, 8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "mesh {'data': 4, 'fsdp': 2} over 8 cpu device(s)" in proc.stdout
  lines = [line.split() for line in proc.stdout.splitlines() if " OK " in f"{line} "]
  done = {(words[0], words[1]) for words in lines}
  for name in ("first_stage_train_step", "diffusion_train_step", "encode", "ddim_sampler_5"):
    assert {(name, "tpu"), (name, "cuda")} <= done, proc.stdout


def test_accelerators_get_the_kernels_auto_picks_there():
  config = smoke.get_config()
  assert lower.for_platform(config, "tpu").unet.conv_impl == "xla"
  assert lower.for_platform(config, "cuda").unet.attention_impl == "xla"
  assert lower.for_platform(config, "cpu").unet.conv_impl == "auto"  # resolved by the backend, which is the CPU
  config.unet.attention_impl = "cudnn"
  assert lower.for_platform(config, "cuda").unet.attention_impl == "cudnn"  # an explicit choice is kept


def test_a_failure_is_reported_per_platform_and_an_unknown_platform_is_named(monkeypatch):
  def broken():
    raise NotImplementedError("no lowering rule for host_callback on tpu")
  monkeypatch.setattr(lower, "targets", lambda config, mesh: [
      lower.Target("fine", lambda: jax.jit(lambda x: x + 1).trace(1.0)), lower.Target("broken", broken)])
  mesh = parallel.make_mesh(smoke.get_config().mesh)
  results = lower.lower_all(smoke.get_config(), mesh, ["tpu", "cuda"])
  assert [(r.target, r.platform, r.ok) for r in results] == [
      ("fine", "tpu", True), ("fine", "cuda", True), ("broken", "tpu", False), ("broken", "cuda", False)]
  assert "NotImplementedError: no lowering rule" in results[-1].error
  assert "FAILED" in lower.format_results(results)
  with pytest.raises(ValueError, match="unknown \\['tpuv5'\\]"):
    lower.lower_all(smoke.get_config(), mesh, ["tpuv5"])
