"""docs/extending.md's two examples, run as written: a new encoder and a new conditioning, each registered from its
own module with its own config field, trained by the command line the doc shows and opened with load_run; and
the extension fields' round trip through the schema (config.json, resume, the CLI's one-line errors)."""
import json
import os
import re
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import concept_diffusion
from concept_diffusion import config as config_lib
from concept_diffusion.errors import UserError
from concept_diffusion.models import conditioning, encdiff
from configs import smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "extending.md")
# Appended to the doc's command: configs/smoke.py's sizes on 16x16 procedural shapes, so that it runs in seconds.
# Everything the doc's line sets (config, extension, kind, the extension's own field) stays as written.
SMOKE_SIZES = ("--config.data.image_size=16 --config.data.supersample=1 --config.encoder.num_tokens=4 "
               "--config.encoder.token_dim=8 --config.encoder.mlp_widths=(8,16) --config.unet.model_channels=16 "
               "--config.unet.channel_mult=(1,) --config.unet.num_res_blocks=1 --config.unet.attention_resolutions=(1,) "
               "--config.unet.num_heads=2 --config.unet.norm_groups=4 --config.diffusion.timesteps=100 "
               "--config.train.batch_size=4 --config.train.num_steps=2 --config.train.log_every=1 "
               "--config.train.checkpoint_every=2 --config.eval.final=False --config.sample.final_figures=False "
               "--config.sample.ddim_steps=3").split()


def _doc_examples() -> dict[str, tuple[str, list[str]]]:
  """module name -> (its code, the encdiff-train command after it) for each python block that names a file."""
  with open(DOC, encoding="utf-8") as f:
    text = f.read()
  out = {}
  for name, code, rest in re.findall(r"```python\n# file: (\w+)\.py\n(.*?)```(.*?)(?=```python|\Z)", text, re.S):
    command = re.search(r"```\n(PYTHONPATH=\. encdiff-train .*?)\n```", rest, re.S).group(1)
    out[name] = (code, shlex.split(command.replace("\\\n", " ")))
  return out


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
  """The doc's python blocks written where they say; the directory on sys.path; the registries restored after."""
  directory = tmp_path_factory.mktemp("extensions")
  found = _doc_examples()
  assert list(found) == ["vit_encoder", "time_conditioning"]
  for name, (code, _) in found.items():
    (directory / f"{name}.py").write_text(code)
  saved = (dict(encdiff.ENCODERS), dict(conditioning.CONDITIONINGS), dict(config_lib._EXTENSION_FIELDS))
  sys.path.insert(0, str(directory))
  yield directory, {name: command for name, (_, command) in found.items()}
  sys.path.remove(str(directory))
  for registry, before in zip((encdiff.ENCODERS, conditioning.CONDITIONINGS, config_lib._EXTENSION_FIELDS), saved):
    registry.clear()
    registry.update(before)
  for name in found:
    sys.modules.pop(name, None)


def _run_doc_command(command: list[str], directory, workdir, *extra: str) -> subprocess.CompletedProcess:
  """The doc's `PYTHONPATH=. encdiff-train ...` from the examples' directory, its --workdir moved under pytest's."""
  assert command[:2] == ["PYTHONPATH=.", "encdiff-train"], command
  args = [f"--workdir={workdir}" if a.startswith("--workdir=") else a for a in command[2:]]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([".", REPO, os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-m", "experiments.train", *args, *SMOKE_SIZES, *extra], cwd=directory,
                        env=env, capture_output=True, text=True, timeout=600)


def test_a_new_encoder_with_its_own_field_trains_from_the_doc_command(examples, tmp_path):
  directory, commands = examples
  workdir = str(tmp_path / "vit")
  proc = _run_doc_command(commands["vit_encoder"], directory, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["encoder"]["patch_vit"] == {"width": 64, "patch": 4, "depth": 1, "heads": 4}  # depth from the CLI

  run = concept_diffusion.load_run(workdir)
  encoder_params = run.variables.params["encoder"]
  assert "position" in encoder_params and "blocks_0" in encoder_params and "net_0_kernel" in encoder_params
  assert "blocks_1" not in encoder_params  # --config.encoder.patch_vit.depth=1 reached the model (default 2)
  assert "encoder_0" not in encoder_params  # not the built-in CNN
  assert run.config.extensions == ("vit_encoder",) and run.config.encoder.patch_vit.depth == 1
  images = run.dataset.images(np.arange(6))
  scalars = run.encode(images)
  assert scalars.shape == (6, 4) and np.all(np.isfinite(scalars))
  assert np.ptp(scalars, axis=0).max() > 0  # the encoder tells images apart
  # Swapping in an image's own scalar is the unswapped reconstruction, bit for bit (same noise).
  np.testing.assert_array_equal(run.swap(images[:2], images[:2], token=1, steps=3),
                                run.reconstruct(images[:2], steps=3))
  _, maps = run.attention_maps(images[:2], steps=3)
  assert maps.shape[0] == 2 and maps.shape[-1] == 4
  np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)  # a distribution over the tokens at every position

  # The extension's field is part of what the run computes: another value on this workdir is refused, in one line.
  again = _run_doc_command(commands["vit_encoder"], directory, workdir, "--config.encoder.patch_vit.depth=2")
  assert again.returncode == 2 and "encoder.patch_vit.depth: workdir has 1, this run has 2" in again.stderr
  assert "Traceback" not in again.stderr


def test_a_new_conditioning_with_its_own_field_trains_from_the_doc_command(examples, tmp_path):
  directory, commands = examples
  workdir = str(tmp_path / "time_emb")
  proc = _run_doc_command(commands["time_conditioning"], directory, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = concept_diffusion.load_run(workdir)
  unet_params = run.variables.params["unet"]
  # --config.unet.time_embedding.hidden=32 reached the module as its `hidden` attribute (default 64).
  assert unet_params["conditioning"]["Dense_0"]["kernel"].shape == (4 * 8, 32)
  assert not any("attn2" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(unet_params))
  model, tokens = run.model, jnp.asarray(run.tokens(np.random.RandomState(0).randn(2, 4)))
  x, t = jnp.zeros((2,) + model.latent_shape), jnp.full((2,), 50, jnp.int32)
  eps = model.denoise(unet_params, x, t, tokens)
  assert float(jnp.abs(eps - model.denoise(unet_params, x, t, tokens[::-1])).max()) > 0  # tokens reach the UNet
  with pytest.raises(ValueError, match="no attention layers|no cross-attention"):
    run.attention_maps(run.dataset.images(np.arange(2)), steps=2)


def test_an_unknown_field_is_one_line_and_a_bug_keeps_its_traceback(examples, tmp_path):
  directory, commands = examples
  proc = _run_doc_command(commands["vit_encoder"], directory, tmp_path / "w", "--config.encoder.patch_vit.dpth=3")
  assert proc.returncode == 2 and "error: unknown config field encoder.patch_vit.dpth" in proc.stderr
  assert 'Did you mean "depth"' in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()
  # An extension whose build function is broken is a bug to report: its traceback is kept.
  (directory / "broken_encoder.py").write_text(
      "from concept_diffusion.models import encdiff\n"
      "encdiff.register_encoder('broken', lambda config: config.encoder.broken.missing_field,\n"
      "                         defaults={'width': 8})\n")
  proc = _run_doc_command(["PYTHONPATH=.", "encdiff-train", "--config=quickstart", "--workdir=w",
                           "--config.extensions=('broken_encoder',)", "--config.encoder.kind=broken"],
                          directory, tmp_path / "w2")
  assert proc.returncode == 1 and "Traceback" in proc.stderr and "missing_field" in proc.stderr


def test_extension_fields_live_in_the_schema_saved_config_and_resume_check():
  defaults = ml_collections.ConfigDict({"depth": 3, "widths": (8, 16)})
  try:
    encdiff.register_encoder("test_only_mlp", lambda config: None, defaults=defaults)
    config = smoke.get_config()
    assert config.encoder.test_only_mlp.depth == 3
    config.encoder.test_only_mlp.depth = 5
    config_lib.validate_config(config)
    saved = config_lib.config_to_dict(config)
    assert saved["encoder"]["test_only_mlp"] == {"depth": 5, "widths": [8, 16]}
    again = config_lib.config_from_dict(json.loads(json.dumps(saved)))
    assert again.encoder.test_only_mlp.widths == (8, 16) and not config_lib.differing_fields(again, saved)
    again.encoder.test_only_mlp.depth = 4
    assert config_lib.differing_fields(again, saved) == [("encoder.test_only_mlp.depth", 5, 4)]
    config.encoder.test_only_mlp.dpth = 1
    with pytest.raises(UserError, match="encoder.test_only_mlp.dpth.*encoder.test_only_mlp.depth"):
      config_lib.validate_config(config)
    with pytest.raises(ValueError, match="already a config field"):
      encdiff.register_encoder("width", lambda config: None, defaults={"x": 1})
  finally:
    encdiff.ENCODERS.pop("test_only_mlp", None)
    config_lib._EXTENSION_FIELDS.pop(("encoder", "test_only_mlp"), None)
  # A saved config keeps the fields of an extension this process has not registered: it still reads and compares.
  restored = config_lib.config_from_dict(saved)
  assert restored.encoder.test_only_mlp.depth == 5 and not config_lib.differing_fields(restored, saved)


def test_registries_refuse_a_silent_replacement_and_build_model_names_the_choices():
  with pytest.raises(ValueError, match="already registered"):
    encdiff.register_encoder("concept_cnn", lambda config: None)
  with pytest.raises(ValueError, match="already registered"):
    encdiff.register_conditioning("adagn", encdiff.CONDITIONINGS["cross_attention"])
  config = smoke.get_config()
  config.encoder.kind = "resnet_nowhere"
  config_lib.validate_config(config)  # the schema does not know the registries
  with pytest.raises(UserError, match="encoder.kind='resnet_nowhere' is not registered.*concept_cnn"):
    encdiff.build_model(config)
  config = smoke.get_config()
  config.extensions = ("no_such_module_anywhere",)
  with pytest.raises(UserError, match="config.extensions names 'no_such_module_anywhere'"):
    config_lib.validate_config(config)


def test_config_and_workdir_import_without_flax():
  code = ("import sys\nimport concept_diffusion.config, concept_diffusion.workdir\n"
          "print(sorted(m for m in ('flax', 'jax', 'optax', 'orbax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])))
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"
