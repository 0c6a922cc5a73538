"""Official-checkpoint interop: key mapping, layouts, validation, files, the import CLI, numerical parity.

Parity: the official modules are not available here, so each block's PyTorch forward is written below in
torch.nn.functional from the reference notes (§1, §7) and fed the *same* official-layout state dict that our modules
receive through the importer's conversion. Those tests need torch (`pip install '.[torch]'`); everything else,
including numpy references for the conv / linear / token-MLP layouts, runs without it.
"""
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion import config as config_lib
from concept_diffusion.diffusion.schedule import make_beta_schedule
from concept_diffusion.interop import official
from configs import smoke

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TSV_CANDIDATES = (REPO_ROOT.parent / "shared" / "reference" / "official_state_dict.tsv",
                  REPO_ROOT / "shared" / "reference" / "official_state_dict.tsv")
STEP = 7


def _random_state_dict(layout: official.CheckpointLayout, config, seed: int = 0) -> dict:
  """Exactly the official keys, shapes and dtypes; bookkeeping buffers hold what export writes for STEP."""
  rng = np.random.default_rng(seed)
  buffers = official.diffusion_buffers(config.diffusion)
  sd = {}
  for key, (shape, dtype) in layout.official_keys().items():
    if key in buffers:
      sd[key] = buffers[key]
    elif dtype == "float32":
      sd[key] = rng.standard_normal(shape, dtype=np.float32)
    else:
      sd[key] = np.asarray(STEP, dtype)
  sd[official.EMA_DECAY_KEY] = np.asarray(config.train.ema_decay, np.float32)
  sd[official.SCALE_FACTOR_KEY] = np.asarray(0.8, np.float32)
  return sd


def _export(config, weights, step=STEP):
  return official.export_state_dict(config, params=weights.params, batch_stats=weights.batch_stats,
                                    ema_unet=weights.ema_unet, scale_factor=weights.scale_factor, step=step,
                                    ae_params=weights.ae_params)


def _assert_same_state_dict(got: dict, want: dict):
  assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
  differing = [k for k in want if got[k].dtype != want[k].dtype or got[k].shape != want[k].shape
               or not np.array_equal(got[k], want[k])]
  assert not differing, differing[:10]


@pytest.fixture(scope="module")
def official_setup():
  config = config_lib.get_base_config()
  layout = official.checkpoint_layout(config)
  return config, layout, _random_state_dict(layout, config)


@pytest.fixture(scope="module")
def smoke_setup():
  config = smoke.get_config()
  layout = official.checkpoint_layout(config)
  return config, layout, _random_state_dict(layout, config, seed=1)


# ----------------------------------------------------------------------------------------------------------------
# The key list and the round trip.

def test_generated_keys_match_reference_tsv(official_setup):
  config, layout, _ = official_setup
  keys = layout.official_keys()
  # The parts of the layout the reference list documents, and our counts from the notes.
  n = lambda prefix: sum(math.prod(s) for k, (s, _) in keys.items() if k.startswith(prefix))
  assert n("model.diffusion_model.") == 37_469_635
  assert n("model_ema.diffusion_model") == 37_469_635
  assert n("first_stage_model.") == 3_478_078
  assert n("cond_stage_model.net.") == 210_240
  assert "model_ema.diffusion_modeltime_embed0weight" in keys
  assert keys["cond_stage_model.encoder.16.weight"] == ((20, 2048), "float32")
  tsv = next((p for p in TSV_CANDIDATES if p.exists()), None)
  if tsv is None:
    pytest.skip("official_state_dict.tsv not found next to the repository; generated list checked on its own")
  reference = {}
  for line in tsv.read_text().splitlines():
    if line.startswith("#") or not line.strip():
      continue
    key, shape, dtype = line.split("\t")
    reference[key] = (tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), dtype)
  documented = {k: v for k, v in keys.items() if k.startswith(("model.diffusion_model.", "cond_stage_model.",
                                                                 "first_stage_model."))}
  assert documented == reference


def test_round_trip_is_bit_for_bit(official_setup):
  config, layout, sd = official_setup
  weights = official.import_state_dict(sd, config, layout=layout)
  assert weights.params["encoder"]["net_2_kernel"].shape == (20, 64, 128)
  assert weights.batch_stats["encoder_11"]["convs_2"]["var"].shape == (128,)
  assert float(weights.scale_factor) == pytest.approx(0.8)
  # The EMA comes from model_ema.*, not from the raw weights.
  np.testing.assert_array_equal(weights.ema_unet["out_2"]["bias"], sd["model_ema.diffusion_modelout2bias"])
  assert not np.array_equal(weights.ema_unet["out_2"]["bias"], weights.params["unet"]["out_2"]["bias"])
  _assert_same_state_dict(_export(config, weights), sd)


def test_layout_conversions_match_numpy_references(official_setup):
  """Conv OIHW->HWIO, Linear (out,in)->(in,out) and the per-token MLPs, pinned against numpy formulas."""
  config, layout, sd = official_setup
  weights = official.import_state_dict(sd, config, layout=layout)
  rng = np.random.default_rng(3)
  # A 3x3 conv in PyTorch convention: y[o, i, j] = b[o] + sum_{c,u,v} w[o, c, u, v] x[c, i+u-1, j+v-1].
  w, b = sd["model.diffusion_model.input_blocks.0.0.weight"], sd["model.diffusion_model.input_blocks.0.0.bias"]
  x = rng.standard_normal((3, 5, 5)).astype(np.float32)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
  ref = np.stack([[[b[o] + np.sum(w[o] * xp[:, i:i + 3, j:j + 3]) for j in range(5)] for i in range(5)]
                  for o in range(w.shape[0])])
  conv = jax.lax.conv_general_dilated(
      jnp.asarray(x.transpose(1, 2, 0))[None], jnp.asarray(weights.params["unet"]["input_blocks_0_0"]["kernel"]),
      (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))[0] + weights.params["unet"]["input_blocks_0_0"][
          "bias"]
  np.testing.assert_allclose(np.asarray(conv).transpose(2, 0, 1), ref, atol=1e-4)
  # Linear: y = x W^T + b.
  h = rng.standard_normal((2, 2048)).astype(np.float32)
  dense = weights.params["encoder"]["encoder_16"]
  np.testing.assert_allclose(h @ dense["kernel"] + dense["bias"],
                             h @ sd["cond_stage_model.encoder.16.weight"].T + sd["cond_stage_model.encoder.16.bias"],
                             rtol=1e-5, atol=1e-4)
  # Token MLP k is official net.k.*: our stacked einsum equals the k-th official nn.Sequential.
  from concept_diffusion.models.encoder import build_encoder
  scalars = rng.standard_normal((2, 20)).astype(np.float32)
  ours = build_encoder(config.encoder).apply({"params": weights.params["encoder"]}, jnp.asarray(scalars),
                                             method="tokens")
  elu = lambda v: np.where(v > 0, v, np.expm1(v))
  for k in (0, 13, 19):
    lin = lambda v, j: v @ sd[f"cond_stage_model.net.{k}.{j}.weight"].T + sd[f"cond_stage_model.net.{k}.{j}.bias"]
    ref = lin(elu(lin(elu(lin(scalars[:, k:k + 1], 0)), 2)), 4)
    np.testing.assert_allclose(np.asarray(ours[:, k]), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Validation: one clear error each.

def test_missing_key_is_named(official_setup):
  config, layout, sd = official_setup
  bad = dict(sd)
  del bad["model.diffusion_model.middle_block.1.proj_in.weight"]
  with pytest.raises(official.StateDictMismatchError, match=r"1 missing key.*middle_block\.1\.proj_in\.weight"):
    official.import_state_dict(bad, config, layout=layout)


def test_unexpected_key_is_named(official_setup):
  config, layout, sd = official_setup
  bad = dict(sd, **{"cond_stage_model.encoder.17.weight": np.zeros((3,), np.float32)})
  with pytest.raises(official.StateDictMismatchError, match=r"1 unexpected key.*encoder\.17\.weight"):
    official.import_state_dict(bad, config, layout=layout)


def test_wrong_shape_names_key_expected_and_got(official_setup):
  config, layout, sd = official_setup
  key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
  bad = dict(sd, **{key: np.zeros((64, 32), np.float32)})  # a checkpoint with 32-dim tokens
  with pytest.raises(official.StateDictMismatchError,
                     match=re.escape(f"{key}: expected (64, 16), got (64, 32)")):
    official.import_state_dict(bad, config, layout=layout)


def test_different_noise_schedule_is_an_error(official_setup):
  config, layout, sd = official_setup
  bad = dict(sd, betas=make_beta_schedule("cosine", 1000).astype(np.float32))
  with pytest.raises(ValueError, match=r"different noise schedule.*beta_schedule='cosine'"):
    official.import_state_dict(bad, config, layout=layout)


def test_missing_ema_error_and_opt_in(official_setup):
  config, layout, sd = official_setup
  no_ema = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
  with pytest.raises(official.StateDictMismatchError, match="--ema_from_params"):
    official.import_state_dict(no_ema, config, layout=layout)
  weights = official.import_state_dict(no_ema, config, layout=layout, ema_from_params=True)
  np.testing.assert_array_equal(weights.ema_unet["out_2"]["kernel"], weights.params["unet"]["out_2"]["kernel"])


# ----------------------------------------------------------------------------------------------------------------
# Standalone autoencoder checkpoints, files, the CLI.

def _autoencoder_state_dict(config, sd, seed=2):
  """A standalone official autoencoder ckpt: first_stage_model.* without prefix, discriminator, LPIPS."""
  _, disc_entries = official.autoencoder_entries(official.abstract_first_stage_state(config))
  rng = np.random.default_rng(seed)
  ae = {k[len(official.FIRST_STAGE_PREFIX):]: v for k, v in sd.items() if k.startswith(official.FIRST_STAGE_PREFIX)}
  ae.update({e.key: rng.standard_normal(e.shape, dtype=np.float32) for e in disc_entries})
  ae["loss.discriminator.main.3.num_batches_tracked"] = np.asarray(5, np.int64)
  ae["loss.perceptual_loss.lin0.model.1.weight"] = np.zeros((1, 64, 1, 1), np.float32)  # LPIPS: ignored
  return ae


def test_separate_autoencoder_checkpoint(smoke_setup):
  config, layout, sd = smoke_setup
  ae_sd = _autoencoder_state_dict(config, sd)
  without_fs = {k: v for k, v in sd.items() if not k.startswith(official.FIRST_STAGE_PREFIX)}
  with pytest.raises(official.StateDictMismatchError, match="--autoencoder_ckpt"):
    official.import_state_dict(without_fs, config, layout=layout)
  weights = official.import_state_dict(without_fs, config, layout=layout, autoencoder_state_dict=ae_sd)
  np.testing.assert_array_equal(weights.disc_params["main_0"]["bias"], ae_sd["loss.discriminator.main.0.bias"])
  _assert_same_state_dict(_export(config, weights), sd)
  # Both present and different: the diffusion model was trained on another autoencoder.
  other = dict(ae_sd, **{"decoder.conv_out.bias": ae_sd["decoder.conv_out.bias"] + 1})
  with pytest.raises(ValueError, match="trained on another autoencoder"):
    official.import_state_dict(sd, config, layout=layout, autoencoder_state_dict=other)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_torch_free_formats_round_trip(smoke_setup, tmp_path, suffix):
  _, _, sd = smoke_setup
  path = str(tmp_path / f"sd{suffix}")
  official.save_state_dict(path, sd, STEP)
  loaded = official.load_state_dict(path)
  assert loaded.global_step == STEP
  _assert_same_state_dict(loaded.state_dict, sd)


def test_bad_files_give_one_clear_error(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="not found"):
    official.load_state_dict(str(tmp_path / "absent.ckpt"))
  (tmp_path / "weights.h5").write_bytes(b"x")
  with pytest.raises(ValueError, match="Unsupported checkpoint file"):
    official.load_state_dict(str(tmp_path / "weights.h5"))
  (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
  with pytest.raises(ValueError, match="Could not read"):
    official.load_state_dict(str(tmp_path / "broken.safetensors"))
  (tmp_path / "a.ckpt").write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ImportError, match=r"concept-diffusion\[torch\]"):
    official.load_state_dict(str(tmp_path / "a.ckpt"))


def test_import_cli_writes_a_workdir_training_resumes(smoke_setup, tmp_path):
  """Import -> the workdir restores through the project's own templates -> export gives back the same tensors."""
  from concept_diffusion.checkpoint import StageCheckpoints
  from concept_diffusion.interop import export_official, import_official
  from concept_diffusion import parallel
  from concept_diffusion.train import trainer
  from concept_diffusion.workdir import DIFFUSION_DIR, MetricWriter
  config, _, sd = smoke_setup
  src = str(tmp_path / "official.npz")
  official.save_state_dict(src, sd, STEP)
  workdir = str(tmp_path / "imported")
  assert import_official.import_checkpoint(src, config, workdir) == STEP
  # Training sees a finished first stage (it restores instead of training) and a diffusion run at STEP.
  writer = MetricWriter(workdir, enabled=False)
  first_stage_params = trainer._first_stage_params  # pylint: disable=protected-access
  ae_params = first_stage_params(config, workdir, None, writer, jax.random.PRNGKey(0), parallel.make_mesh(config.mesh))
  np.testing.assert_array_equal(np.asarray(ae_params["quantize"]["embedding"]),
                                sd["first_stage_model.quantize.embedding.weight"])
  ckpts = StageCheckpoints(os.path.join(workdir, DIFFUSION_DIR))
  assert ckpts.latest_step() == STEP
  ckpts.close()
  exported, step = export_official.export_workdir(workdir)
  assert step == STEP
  _assert_same_state_dict(exported, sd)
  # The first stage alone, as an official autoencoder checkpoint (fresh discriminator included).
  ae_sd, ae_step = export_official.export_autoencoder(workdir)
  assert ae_step == config.first_stage.num_steps
  fs_keys = {k[len(official.FIRST_STAGE_PREFIX):] for k in sd if k.startswith(official.FIRST_STAGE_PREFIX)}
  assert {k for k in ae_sd if not k.startswith("loss.")} == fs_keys
  assert "loss.discriminator.main.3.running_var" in ae_sd
  np.testing.assert_array_equal(ae_sd["decoder.conv_out.weight"], sd["first_stage_model.decoder.conv_out.weight"])
  with pytest.raises(ValueError, match="already holds checkpoints"):
    import_official.import_checkpoint(src, config, workdir)


def test_import_cli_reports_errors_without_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "concept_diffusion.interop.import_official", f"--ckpt={tmp_path / 'absent.ckpt'}",
       f"--config={REPO_ROOT / 'configs' / 'smoke.py'}", f"--workdir={tmp_path / 'w'}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: Checkpoint file" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_global_step_is_a_clear_error(smoke_setup, tmp_path):
  from concept_diffusion.interop import import_official
  config, _, sd = smoke_setup
  path = str(tmp_path / "bare.safetensors")
  import safetensors.numpy
  safetensors.numpy.save_file(sd, path)  # a bare state dict: no step recorded
  with pytest.raises(ValueError, match="--global_step"):
    import_official.import_checkpoint(path, config, str(tmp_path / "w"))


# ----------------------------------------------------------------------------------------------------------------
# PyTorch: Lightning checkpoints and numerical parity with functional re-statements of the official modules.

def test_lightning_ckpt_import_and_export(smoke_setup, tmp_path):
  torch = pytest.importorskip("torch")
  config, layout, sd = smoke_setup
  path = str(tmp_path / "last.ckpt")
  torch.save({"state_dict": {k: torch.from_numpy(v.copy()) for k, v in sd.items()}, "global_step": STEP,
              "epoch": 0}, path)
  loaded = official.load_state_dict(path)
  assert (loaded.global_step, loaded.epoch) == (STEP, 0)
  weights = official.import_state_dict(loaded.state_dict, config, layout=layout)
  out = str(tmp_path / "export.ckpt")
  official.save_state_dict(out, _export(config, weights), STEP)
  back = torch.load(out, map_location="cpu", weights_only=True)
  assert back["global_step"] == STEP
  _assert_same_state_dict({k: v.numpy() for k, v in back["state_dict"].items()}, sd)
  # Like an official ckpt, whose LR-scheduler state holds OmegaConf objects: a class from a package that is not
  # installed at load time. The state dict still loads (the object becomes an inert placeholder) ...
  (tmp_path / "fake_omegaconf.py").write_text(
      "class ListConfig(list):\n  def __reduce__(self):\n    return (ListConfig, (list(self),))\n"
      "class Config:\n  def __init__(self):\n    self.steps = ListConfig([10000])\n")
  sys.path.insert(0, str(tmp_path))
  try:
    import fake_omegaconf  # pylint: disable=g-import-not-at-top
    odd = str(tmp_path / "odd.ckpt")
    small = {k: torch.from_numpy(v.copy()) for k, v in list(sd.items())[:3]}
    torch.save({"state_dict": small, "global_step": STEP, "lr_schedulers": [fake_omegaconf.Config()]}, odd)
  finally:
    sys.path.remove(str(tmp_path))
    sys.modules.pop("fake_omegaconf", None)
  assert set(official.load_state_dict(odd).state_dict) == set(small)
  # ... while really unpickling it (--trust_pickle) needs the missing package: one clear error.
  with pytest.raises(ValueError, match="No module named 'fake_omegaconf'"):
    official.load_state_dict(odd, trust_pickle=True)


def _params_and_torch(module, *args, prefix="", collections=("params",), seed=0, scale=1.0, **kwargs):
  """Random official-layout tensors for `module`'s variables, and the same weights in our layout."""
  import torch
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))
  entries = []
  for col in collections:
    entries += official.tree_entries(abstract[col], col, prefix)
  rng = np.random.default_rng(seed)
  sd = {}
  for e in entries:
    if e.key.endswith("running_var"):
      sd[e.key] = rng.uniform(0.5, 2.0, e.shape).astype(np.float32)
    elif e.key.endswith(("bias", "running_mean")) or len(e.shape) == 1:
      sd[e.key] = (0.1 * rng.standard_normal(e.shape) + (1.0 if e.key.endswith("weight") else 0.0)).astype(
          np.float32)
    else:  # PyTorch-default-like fan-in scaling keeps deep stacks of random layers at unit scale
      fan_in = int(np.prod(e.shape[1:]))
      sd[e.key] = (scale * rng.standard_normal(e.shape) / np.sqrt(fan_in)).astype(np.float32)
  official.check_keys("test", sd, entries)
  trees = official.state_dict_to_trees(entries, sd)
  return {col: trees[col] for col in collections}, {k: torch.from_numpy(v) for k, v in sd.items()}


def _nchw(x):
  import torch
  return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()


def _max_err(ours_nhwc, ref_nchw):
  ours = np.asarray(ours_nhwc)
  ref = ref_nchw.detach().numpy()
  if ref.ndim == 4:
    ref = ref.transpose(0, 2, 3, 1)
  return float(np.max(np.abs(ours - ref))), float(np.max(np.abs(ref)))


class _TorchRef:
  """The official forward passes restated in torch.nn.functional (notes §1.1-1.3, §7), over a state dict."""

  def __init__(self, sd):
    import torch
    import torch.nn.functional as F  # pylint: disable=invalid-name
    self.sd, self.torch, self.F = sd, torch, F

  def conv(self, p, x, stride=1):
    w = self.sd[p + ".weight"]
    return self.F.conv2d(x, w, self.sd.get(p + ".bias"), stride=stride, padding=(w.shape[-1] - 1) // 2)

  def linear(self, p, x):
    return self.F.linear(x, self.sd[p + ".weight"], self.sd.get(p + ".bias"))

  def group_norm(self, p, x, eps, groups=32):
    return self.F.group_norm(x, groups, self.sd[p + ".weight"], self.sd[p + ".bias"], eps)

  def layer_norm(self, p, x):
    return self.F.layer_norm(x, x.shape[-1:], self.sd[p + ".weight"], self.sd[p + ".bias"], 1e-5)

  def batch_norm(self, p, x):  # eval mode: running statistics, eps 1e-5
    sd = self.sd
    return self.F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                             sd[p + ".bias"], training=False, eps=1e-5)

  # UNet (openaimodel_enc.py + attention.py).
  @staticmethod
  def timestep_embedding(torch, t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

  def resblock(self, p, x, emb, up=False, down=False):
    F = self.F  # pylint: disable=invalid-name
    h = F.silu(self.group_norm(p + ".in_layers.0", x, 1e-5))
    if up:
      h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
    if down:
      h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = self.conv(p + ".in_layers.2", h)
    scale, shift = self.linear(p + ".emb_layers.1", F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = self.group_norm(p + ".out_layers.0", h, 1e-5) * (1 + scale) + shift
    h = self.conv(p + ".out_layers.3", F.silu(h))
    skip = self.conv(p + ".skip_connection", x) if p + ".skip_connection.weight" in self.sd else x
    return skip + h

  def attention(self, p, x, context, heads):
    q = self.linear(p + ".to_q", x)
    k, v = self.linear(p + ".to_k", context), self.linear(p + ".to_v", context)
    b, n, inner = q.shape
    d = inner // heads
    split = lambda t: t.reshape(b, t.shape[1], heads, d).permute(0, 2, 1, 3)  # 'b n (h d) -> b h n d'
    q, k, v = split(q), split(k), split(v)
    attn = self.torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1)
    return self.linear(p + ".to_out.0", (attn @ v).permute(0, 2, 1, 3).reshape(b, n, inner))

  def transformer_block(self, p, x, context, heads):
    h = self.layer_norm(p + ".norm1", x)
    x = self.attention(p + ".attn1", h, h, heads) + x
    x = self.attention(p + ".attn2", self.layer_norm(p + ".norm2", x), context, heads) + x
    value, gate = self.linear(p + ".ff.net.0.proj", self.layer_norm(p + ".norm3", x)).chunk(2, dim=-1)
    return self.linear(p + ".ff.net.2", value * self.F.gelu(gate)) + x  # exact (erf) GELU

  def spatial_transformer(self, p, x, context, heads, depth=1):
    b, c, hh, ww = x.shape
    h = self.conv(p + ".proj_in", self.group_norm(p + ".norm", x, 1e-6))
    h = h.permute(0, 2, 3, 1).reshape(b, hh * ww, -1)  # 'b c h w -> b (h w) c'
    for i in range(depth):
      h = self.transformer_block(f"{p}.transformer_blocks.{i}", h, context, heads)
    return self.conv(p + ".proj_out", h.reshape(b, hh, ww, -1).permute(0, 3, 1, 2)) + x

  def unet(self, x, t, context, *, model_channels, channel_mult, num_res_blocks, attention_resolutions, num_heads):
    F = self.F  # pylint: disable=invalid-name
    emb = self.timestep_embedding(self.torch, t, model_channels)
    emb = self.linear("time_embed.2", F.silu(self.linear("time_embed.0", emb)))
    heads = lambda h: num_heads  # legacy=True with a spatial transformer: dim_head = channels // num_heads
    h = self.conv("input_blocks.0.0", x)
    hs, ds, block = [h], 1, 1
    for level, _ in enumerate(channel_mult):
      for _ in range(num_res_blocks):
        h = self.resblock(f"input_blocks.{block}.0", h, emb)
        if ds in attention_resolutions:
          h = self.spatial_transformer(f"input_blocks.{block}.1", h, context, heads(h))
        hs.append(h)
        block += 1
      if level != len(channel_mult) - 1:
        h = self.resblock(f"input_blocks.{block}.0", h, emb, down=True)
        hs.append(h)
        block, ds = block + 1, ds * 2
    h = self.resblock("middle_block.0", h, emb)
    h = self.spatial_transformer("middle_block.1", h, context, heads(h))
    h = self.resblock("middle_block.2", h, emb)
    block = 0
    for level, _ in reversed(list(enumerate(channel_mult))):
      for i in range(num_res_blocks + 1):
        h = self.resblock(f"output_blocks.{block}.0", self.torch.cat([h, hs.pop()], dim=1), emb)
        sub = 1
        if ds in attention_resolutions:
          h = self.spatial_transformer(f"output_blocks.{block}.1", h, context, heads(h))
          sub = 2
        if level and i == num_res_blocks:
          h = self.resblock(f"output_blocks.{block}.{sub}", h, emb, up=True)
          ds //= 2
        block += 1
    return self.conv("out.2", F.silu(self.group_norm("out.0", h, 1e-5)))

  # Encoder4 (openaimodel_enc.py): note the missing ReLU after the third conv + BN.
  def enc_res(self, p, x):
    h = self.conv(p + ".convs.1", self.F.relu(x))
    return x + self.conv(p + ".convs.4", self.F.relu(self.batch_norm(p + ".convs.2", h)))

  def encoder4(self, x):
    F = self.F  # pylint: disable=invalid-name
    h = F.relu(self.batch_norm("encoder.1", self.conv("encoder.0", x, stride=2)))
    h = F.relu(self.batch_norm("encoder.4", self.conv("encoder.3", h, stride=2)))
    h = self.batch_norm("encoder.7", self.conv("encoder.6", h, stride=2))
    h = F.relu(self.batch_norm("encoder.9", self.conv("encoder.8", h, stride=2)))
    h = self.enc_res("encoder.11", h)
    h = F.relu(self.batch_norm("encoder.12", h))
    h = self.enc_res("encoder.14", h)
    return self.linear("encoder.16", h.reshape(h.shape[0], -1))  # View((-1, 128*4*4)): NCHW flatten

  def tokens(self, scalars, num_tokens):
    elu = self.F.elu
    out = [self.linear(f"net.{k}.4", elu(self.linear(f"net.{k}.2", elu(self.linear(f"net.{k}.0",
                                                                                     scalars[:, k:k + 1])))))
           for k in range(num_tokens)]
    return self.torch.cat(out, dim=1)  # (B, N * token_dim); the UNet reshapes it to (B, N, token_dim)

  # taming VQ first stage (ldm/modules/diffusionmodules/model.py): GroupNorm(32, eps 1e-6), swish.
  def vq_resnet(self, p, x):
    F = self.F  # pylint: disable=invalid-name
    h = self.conv(p + ".conv1", F.silu(self.group_norm(p + ".norm1", x, 1e-6)))
    h = self.conv(p + ".conv2", F.silu(self.group_norm(p + ".norm2", h, 1e-6)))
    return (self.conv(p + ".nin_shortcut", x) if p + ".nin_shortcut.weight" in self.sd else x) + h

  def vq_attn(self, p, x):
    torch = self.torch
    h = self.group_norm(p + ".norm", x, 1e-6)
    q, k, v = self.conv(p + ".q", h), self.conv(p + ".k", h), self.conv(p + ".v", h)
    b, c, hh, ww = q.shape
    w = torch.bmm(q.reshape(b, c, hh * ww).permute(0, 2, 1), k.reshape(b, c, hh * ww)) * c ** -0.5
    w = torch.softmax(w, dim=2)
    h = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + self.conv(p + ".proj_out", h)

  def vq_encode(self, x, ch_mult, num_res_blocks):
    F = self.F  # pylint: disable=invalid-name
    h = self.conv("encoder.conv_in", x)
    for i in range(len(ch_mult)):
      for j in range(num_res_blocks):
        h = self.vq_resnet(f"encoder.down.{i}.block.{j}", h)
      if i != len(ch_mult) - 1:  # Downsample: pad (0, 1, 0, 1), then 3x3 stride-2 conv without padding
        w = self.sd[f"encoder.down.{i}.downsample.conv.weight"]
        h = F.conv2d(F.pad(h, (0, 1, 0, 1)), w, self.sd[f"encoder.down.{i}.downsample.conv.bias"], stride=2)
    h = self.vq_resnet("encoder.mid.block_2", self.vq_attn("encoder.mid.attn_1",
                                                            self.vq_resnet("encoder.mid.block_1", h)))
    h = self.conv("encoder.conv_out", F.silu(self.group_norm("encoder.norm_out", h, 1e-6)))
    return self.conv("quant_conv", h)

  def vq_decode(self, z, ch_mult, num_res_blocks):
    torch, F = self.torch, self.F  # pylint: disable=invalid-name
    codebook = self.sd["quantize.embedding.weight"]
    flat = z.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    d = (flat ** 2).sum(1, keepdim=True) + (codebook ** 2).sum(1) - 2 * flat @ codebook.T
    zq = codebook[torch.argmin(d, dim=1)].reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    h = self.conv("decoder.conv_in", self.conv("post_quant_conv", zq))
    h = self.vq_resnet("decoder.mid.block_2", self.vq_attn("decoder.mid.attn_1",
                                                            self.vq_resnet("decoder.mid.block_1", h)))
    for i in reversed(range(len(ch_mult))):
      for j in range(num_res_blocks + 1):
        h = self.vq_resnet(f"decoder.up.{i}.block.{j}", h)
      if i != 0:
        h = self.conv(f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2, mode="nearest"))
    return self.conv("decoder.conv_out", F.silu(self.group_norm("decoder.norm_out", h, 1e-6)))


PARITY_ATOL = 1e-4


def _fast_jit(fn):
  """jit with LLVM's expensive passes off: these forwards run once, so compile time is all that counts."""
  try:
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0,
                                         "xla_llvm_disable_expensive_passes": True})
  except TypeError:  # a jax without per-jit compiler options
    return jax.jit(fn)


def _report(name, err, scale):
  print(f"parity {name}: max abs error {err:.2e} (output max {scale:.2f})")
  assert err <= PARITY_ATOL * max(1.0, scale), (name, err, scale)


def test_parity_timestep_embedding():
  from concept_diffusion.models.layers import timestep_embedding
  t = np.array([0, 1, 17, 999])
  ours = np.asarray(timestep_embedding(jnp.asarray(t), 64))
  assert np.array_equal(ours[0], np.r_[np.ones(32), np.zeros(32)])  # [cos, sin], not [sin, cos]
  torch = pytest.importorskip("torch")
  ref = _TorchRef.timestep_embedding(torch, torch.from_numpy(t), 64).numpy()
  _report("timestep_embedding", float(np.max(np.abs(ours - ref))), 1.0)


def test_parity_unet_blocks():
  """ResBlock (scale-shift norm, 1x1 skip), SpatialTransformer (GN eps 1e-6, GEGLU, cross-attn) and a small full
  UNet with the official wiring (skips, up/down ResBlocks, [cos, sin] embedding), all against torch."""
  torch = pytest.importorskip("torch")
  from concept_diffusion.models import layers
  from concept_diffusion.models.unet import UNet
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 64)).astype(np.float32)
  emb = rng.standard_normal((2, 256)).astype(np.float32)
  ctx = rng.standard_normal((2, 20, 16)).astype(np.float32)

  res = layers.ResBlock(128, use_scale_shift_norm=True)
  p_res, sd_res = _params_and_torch(res, x, emb, seed=1)
  st = layers.SpatialTransformer(heads=8, dim_head=8)
  p_st, sd_st = _params_and_torch(st, x, ctx, seed=2)
  # Both levels, up/down ResBlocks, skip concatenation, a SpatialTransformer at full resolution and in the middle.
  unet = UNet(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,), num_heads=8)
  xl, t = rng.standard_normal((2, 8, 8, 3)).astype(np.float32), np.array([3, 911])
  p_unet, sd_unet = _params_and_torch(unet, xl, t, ctx, seed=3)

  @_fast_jit
  def ours(p_res, p_st, p_unet):
    return (res.apply(p_res, x, emb), st.apply(p_st, x, ctx), unet.apply(p_unet, xl, t, ctx))
  out_res, out_st, out_unet = ours(p_res, p_st, p_unet)

  with torch.no_grad():
    tx, temb, tctx = _nchw(x), torch.from_numpy(emb), torch.from_numpy(ctx)
    # Block state dicts are unprefixed ("in_layers.0.weight"); the helpers take a prefix ending before the dot.
    ref_res = _TorchRef({"b." + k: v for k, v in sd_res.items()}).resblock("b", tx, temb)
    ref_st = _TorchRef({"b." + k: v for k, v in sd_st.items()}).spatial_transformer("b", tx, tctx, heads=8)
    ref_unet = _TorchRef(sd_unet).unet(_nchw(xl), torch.from_numpy(t), tctx, model_channels=64, channel_mult=(1, 2),
                                       num_res_blocks=1, attention_resolutions=(1,), num_heads=8)
  _report("ResBlock", *_max_err(out_res, ref_res))
  _report("SpatialTransformer", *_max_err(out_st, ref_st))
  _report("UNet (64 ch, mult 1-2, attention at 1)", *_max_err(out_unet, ref_unet))


def test_parity_encoder4_and_token_mlps():
  torch = pytest.importorskip("torch")
  from concept_diffusion.models.encoder import build_encoder
  config = config_lib.get_base_config()
  encoder = build_encoder(config.encoder)
  images = np.random.default_rng(4).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  variables, sd = _params_and_torch(encoder, images, collections=("params", "batch_stats"), seed=5)
  scalars, tokens = _fast_jit(lambda v: encoder.apply(v, images, train=False))(variables)
  with torch.no_grad():
    ref = _TorchRef(sd)
    ref_scalars = ref.encoder4(_nchw(images))
    ref_tokens = ref.tokens(ref_scalars, 20).reshape(2, 20, 16)
  _report("Encoder4 trunk (eval BN)", *_max_err(scalars, ref_scalars))
  _report("token MLPs", *_max_err(tokens, ref_tokens))


def test_parity_vq_autoencoder():
  torch = pytest.importorskip("torch")
  from concept_diffusion.models import autoencoder
  config = config_lib.get_base_config()
  model = autoencoder.build_first_stage(config.first_stage, 3)
  rng = np.random.default_rng(6)
  images = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)  # fully convolutional: 32x32 -> 8x8 latent
  variables, sd = _params_and_torch(model, images, seed=7)
  block = autoencoder.ResnetBlock(64)
  attn = autoencoder.AttnBlock()
  xb = rng.standard_normal((1, 8, 8, 32)).astype(np.float32)
  p_block, sd_block = _params_and_torch(block, xb, seed=8)
  p_attn, sd_attn = _params_and_torch(attn, xb, seed=9)

  @_fast_jit
  def ours(variables, p_block, p_attn):
    z = model.apply(variables, images, method="encode")
    return z, model.apply(variables, z, method="decode"), block.apply(p_block, xb), attn.apply(p_attn, xb)
  z, rec, out_block, out_attn = ours(variables, p_block, p_attn)

  with torch.no_grad():
    ref = _TorchRef(sd)
    ch_mult, nrb = tuple(config.first_stage.ch_mult), config.first_stage.num_res_blocks
    ref_z = ref.vq_encode(_nchw(images), ch_mult, nrb)
    ref_rec = ref.vq_decode(_nchw(z), ch_mult, nrb)  # from our latent, so both quantise the same input
    ref_block = _TorchRef({"b." + k: v for k, v in sd_block.items()}).vq_resnet("b", _nchw(xb))
    ref_attn = _TorchRef({"b." + k: v for k, v in sd_attn.items()}).vq_attn("b", _nchw(xb))
  _report("VQ ResnetBlock (1x1 shortcut)", *_max_err(out_block, ref_block))
  _report("VQ AttnBlock", *_max_err(out_attn, ref_attn))
  _report("VQ encoder + quant_conv", *_max_err(z, ref_z))
  _report("VQ decode (quantise + post_quant_conv + decoder)", *_max_err(rec, ref_rec))

