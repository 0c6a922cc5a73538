"""experiments/official_step.py: it composes the official step from the official modules' interfaces, and refuses a
path that is not the official code with one clear error. The official code itself is not on this machine: a fake
`ldm` package with the same constructors and call signatures stands in, and checks what it is called with."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "experiments", "official_step.py")

FAKE_MODULES = {
    "ldm/__init__.py": "",
    "ldm/modules/__init__.py": "",
    "ldm/modules/diffusionmodules/__init__.py": "",
    "ldm/modules/diffusionmodules/openaimodel_enc.py": """
        import torch
        from torch import nn

        class UNetModel(nn.Module):
          def __init__(self, context_dim, latent_unit, in_channels, out_channels, **kwargs):
            super().__init__()
            self.context_dim, self.latent_unit = context_dim, latent_unit
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            self.mix = nn.Linear(latent_unit * context_dim, out_channels)

          def forward(self, x, timesteps=None, context=None):
            # the official UNet reads context[0] (DiffusionWrapper passes c_crossattn, a list)
            assert isinstance(context, list) and len(context) == 1, type(context)
            assert context[0].shape == (x.shape[0], self.latent_unit * self.context_dim), context[0].shape
            assert x.shape[1:] == (3, 16, 16), x.shape  # the VQ latents of 64x64 images, f=4
            assert timesteps.dtype == torch.int64 and 0 <= int(timesteps.min()) and int(timesteps.max()) < 1000
            return self.conv(x) + self.mix(context[0])[:, :, None, None]

        class Encoder4(nn.Module):
          def __init__(self, d, context_dim, latent_unit):
            super().__init__()
            self.net = nn.Linear(3 * 64 * 64, latent_unit * context_dim)

          def forward(self, x):
            assert x.shape[1:] == (3, 64, 64) and float(x.min()) >= -1 and float(x.max()) <= 1
            return self.net(x.flatten(1))
        """,
    "ldm/modules/diffusionmodules/model.py": """
        from torch import nn

        class Encoder(nn.Module):
          def __init__(self, z_channels, in_channels, **kwargs):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, z_channels, 4, stride=4)

          def forward(self, x):
            return self.conv(x)
        """,
    "ldm/modules/diffusionmodules/util.py": """
        import numpy as np

        def make_beta_schedule(schedule, n_timestep, linear_start, linear_end):
          assert schedule == "linear"
          return np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep) ** 2
        """,
    "ldm/modules/ema.py": """
        import torch
        from torch import nn

        class LitEma(nn.Module):
          def __init__(self, model, decay):
            super().__init__()
            self.updates = 0

          def forward(self, model):
            self.updates += 1
        """,
}


def _run(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


def test_a_path_that_is_not_the_official_code_is_refused_by_name(tmp_path):
  proc = _run(f"--official_repo={tmp_path}")
  assert proc.returncode != 0
  assert "is not a copy of the official EncDiff code" in proc.stderr and "ThomasMrY/EncDiff" in proc.stderr


def test_times_both_steps_of_the_official_interfaces(tmp_path):
  pytest.importorskip("torch")
  for path, source in FAKE_MODULES.items():
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text(textwrap.dedent(source))
  out = tmp_path / "official.json"
  proc = _run(f"--official_repo={tmp_path}", "--batch_size=4", "--steps=3", "--warmup=1", "--threads=1",
              f"--json={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["batch_size"] == 4 and result["torch_threads"] == 1
  assert result["unet_params"] == 3 * 3 * 3 * 3 + 3 + 320 * 3 + 3  # the fake's conv + linear
  for name in ("step", "bare_step"):
    assert len(result[name]["times_ms"]) == 3 and result[name]["median_ms"] > 0
    assert result[name]["images_per_s"] == pytest.approx(4 / result[name]["median_ms"] * 1000)
