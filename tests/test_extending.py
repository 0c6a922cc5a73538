"""docs/extending.md's two examples, run as written: a new encoder and a new conditioning, each registered from its
own module through config.extensions, trained on the smoke config and opened with load_run."""
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import concept_diffusion
from concept_diffusion import config as config_lib
from concept_diffusion.models import encdiff
from concept_diffusion.train import trainer
from configs import smoke

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "extending.md")


@pytest.fixture(scope="module")
def example_modules(tmp_path_factory):
  """The doc's python blocks that name a file, written there; the directory goes on sys.path."""
  directory = tmp_path_factory.mktemp("extensions")
  with open(DOC, encoding="utf-8") as f:
    blocks = re.findall(r"```python\n# file: (\w+)\.py\n(.*?)```", f.read(), re.S)
  assert [name for name, _ in blocks] == ["vit_encoder", "time_conditioning"]
  for name, code in blocks:
    (directory / f"{name}.py").write_text(code)
  sys.path.insert(0, str(directory))
  yield directory
  sys.path.remove(str(directory))


def _config(extension: str):
  """Smoke sizes in pixel space on the 60-image tiny_blocks dataset (tests/conftest.py), one UNet level."""
  config = smoke.get_config()
  config.data.name = "tiny_blocks"
  config.first_stage.kind, config.stages = "none", ("diffusion",)
  config.unet.channel_mult, config.unet.attention_resolutions = (1,), (1,)
  config.sample.final_figures = False
  config.extensions = (extension,)
  return config


def _train_and_load(config, workdir):
  state = trainer.train(config, workdir)
  assert int(state.step) == config.train.num_steps
  return concept_diffusion.load_run(workdir)


def test_a_new_encoder_is_one_class_one_register_call_and_a_config_value(example_modules, tmp_path):
  config = _config("vit_encoder")
  config.encoder.kind = "patch_vit"
  run = _train_and_load(config, str(tmp_path))
  encoder_params = run.variables.params["encoder"]
  assert "position" in encoder_params and "blocks_0" in encoder_params and "net_0_kernel" in encoder_params
  assert "encoder_0" not in encoder_params  # not the built-in CNN
  assert run.config.extensions == ("vit_encoder",)  # from config.json: load_run imported the module itself
  images = run.dataset.images(np.arange(6))
  scalars = run.encode(images)
  assert scalars.shape == (6, config.encoder.num_tokens) and np.all(np.isfinite(scalars))
  assert np.ptp(scalars, axis=0).max() > 0  # the trained encoder tells images apart
  # Swapping in an image's own scalar is the unswapped reconstruction, bit for bit (same noise).
  np.testing.assert_array_equal(run.swap(images[:2], images[:2], token=1, steps=3),
                                run.reconstruct(images[:2], steps=3))
  cells = run.traverse(images[0], token=0, values=[-1.0, 0.0, 1.0], steps=3)
  assert cells.shape == (3,) + run.model.image_shape and np.all(np.isfinite(cells))
  _, maps = run.attention_maps(images[:2], steps=3)
  assert maps.shape == (2, 16, 16, config.encoder.num_tokens)
  np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)  # a distribution over the tokens at every position


def test_a_new_conditioning_is_one_class_one_register_call_and_a_config_value(example_modules, tmp_path):
  config = _config("time_conditioning")
  config.unet.conditioning = "time_embedding"
  run = _train_and_load(config, str(tmp_path))
  unet_params = run.variables.params["unet"]
  assert "conditioning" in unet_params  # the new module's projection
  assert not any("attn2" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(unet_params))
  model, tokens = run.model, jnp.asarray(run.tokens(np.random.RandomState(0).randn(2, config.encoder.num_tokens)))
  x, t = jnp.zeros((2,) + model.latent_shape), jnp.full((2,), 50, jnp.int32)
  eps = model.denoise(unet_params, x, t, tokens)
  assert float(jnp.abs(eps - model.denoise(unet_params, x, t, tokens[::-1])).max()) > 0  # tokens reach the UNet
  with pytest.raises(ValueError, match="no attention layers|no cross-attention"):
    run.attention_maps(run.dataset.images(np.arange(2)), steps=2)


def test_registries_refuse_a_silent_replacement_and_validation_names_the_choices():
  with pytest.raises(ValueError, match="already registered"):
    encdiff.register_encoder("concept_cnn", lambda config: None)
  with pytest.raises(ValueError, match="already registered"):
    encdiff.register_conditioning("adagn", encdiff.CONDITIONINGS["cross_attention"])
  config = smoke.get_config()
  config.encoder.kind = "resnet_nowhere"
  with pytest.raises(ValueError, match="encoder.kind must be a registered encoder.*concept_cnn"):
    config_lib.validate_config(config)
  config = smoke.get_config()
  config.extensions = ("no_such_module_anywhere",)
  with pytest.raises(ValueError, match="config.extensions names 'no_such_module_anywhere'"):
    config_lib.validate_config(config)
