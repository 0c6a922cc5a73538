"""Swaps, attention maps and figure helpers (pixel-space smoke model with perturbed weights), and the run figures
for grey and tiny datasets."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from concept_diffusion import data as data_lib
from concept_diffusion import visualize
from concept_diffusion.models.encdiff import EncDiffVariables, build_model
from configs import smoke


@pytest.fixture(scope="module")
def model():
  config = smoke.get_config()
  config.first_stage.kind = "none"  # pixel space: no autoencoder to build
  encdiff = build_model(config)
  variables = jax.jit(encdiff.init)(jax.random.PRNGKey(0))
  # A fresh UNet's zero-initialised output layers ignore the tokens; perturb so the tokens matter.
  leaves, treedef = jax.tree_util.tree_flatten(variables["params"]["unet"])
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  unet = treedef.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  state = EncDiffVariables(variables["params"], variables["batch_stats"], unet, jnp.ones(()))
  images = jax.random.uniform(jax.random.PRNGKey(2), (6, 16, 16, 3), minval=-1, maxval=1)
  return encdiff, state, images


def test_swapping_in_the_own_token_reproduces_the_unswapped_sample_exactly(model):
  encdiff, state, images = model
  sets = ((),) + tuple((k,) for k in range(encdiff.num_tokens)) + ((0, 1),)
  grid = encdiff.swap_grid(state, None, images[:3], images[:3], jax.random.PRNGKey(3), steps=4, eta=1.0,
                           token_sets=sets)
  assert grid.shape == (encdiff.num_tokens + 2, 3, 16, 16, 3)
  for row in grid[1:]:
    np.testing.assert_array_equal(np.asarray(row), np.asarray(grid[0]))
  other = encdiff.swap_grid(state, None, images[:3], images[3:], jax.random.PRNGKey(3), steps=4, eta=1.0,
                            token_sets=sets)
  np.testing.assert_array_equal(np.asarray(other[0]), np.asarray(grid[0]))  # the empty set never swaps
  changed = [float(jnp.abs(r - other[0]).max()) for r in other[1:]]
  assert max(changed) > 1e-5  # a swapped token changes the sample


def test_attention_maps_are_distributions_and_capturing_them_changes_nothing(model):
  encdiff, state, images = model
  _, tokens = encdiff.encode_with_tokens(state, images[:2])
  side = encdiff.attention_sides()[0]
  assert encdiff.attention_sides() == (16, 8)
  samples, maps = encdiff.sample_jit(state, None, tokens, jax.random.PRNGKey(4), steps=4, eta=1.0,
                                     attention_side=side)
  assert maps.shape == (2, 16, 16, encdiff.num_tokens)
  np.testing.assert_allclose(np.asarray(maps.sum(-1)), 1.0, atol=1e-5)
  plain = encdiff.sample_jit(state, None, tokens, jax.random.PRNGKey(4), steps=4, eta=1.0)
  # Without capture the UNet uses fused attention (jax.nn.dot_product_attention), with capture the explicit
  # softmax it must read the probabilities from: the same samples up to fp32 round-off.
  np.testing.assert_allclose(np.asarray(samples), np.asarray(plain), atol=1e-5)
  _, coarse = encdiff.sample_jit(state, None, tokens, jax.random.PRNGKey(4), steps=4, eta=1.0, attention_side=8)
  assert coarse.shape == (2, 8, 8, encdiff.num_tokens)


def test_attention_maps_of_a_patch_stem_unet_are_on_its_patch_grid():
  config = smoke.get_config()
  config.first_stage.kind = "none"
  config.unet.patch_size = 2  # 16x16 images -> the UNet works at 8x8 and 4x4
  encdiff = build_model(config)
  variables = jax.jit(encdiff.init)(jax.random.PRNGKey(0))
  state = EncDiffVariables(variables["params"], variables["batch_stats"], variables["params"]["unet"], jnp.ones(()))
  assert encdiff.attention_sides() == (8, 4)
  images = jax.random.uniform(jax.random.PRNGKey(2), (2, 16, 16, 3), minval=-1, maxval=1)
  _, tokens = encdiff.encode_with_tokens(state, images)
  samples, maps = encdiff.sample_jit(state, None, tokens, jax.random.PRNGKey(4), steps=2, eta=1.0, attention_side=8)
  assert samples.shape == images.shape and maps.shape == (2, 8, 8, config.encoder.num_tokens)
  with pytest.raises(ValueError, match=r"no cross-attention layer has a 16x16 query grid; .* sides \[4, 8\]"):
    encdiff.sample_jit(state, None, tokens, jax.random.PRNGKey(4), steps=2, eta=1.0, attention_side=16)


def test_traversal_changes_only_through_the_traversed_token(model):
  encdiff, state, images = model
  n = encdiff.num_tokens
  src = encdiff.encode(state, images[:1])
  values = jnp.tile(src.T, (1, 3))  # every value = the image's own scalar: all cells equal
  grid = encdiff.traversal_grid(state, None, images[0], values, jax.random.PRNGKey(5), steps=3, eta=0.0,
                                tokens=tuple(range(n)))
  assert grid.shape == (n, 3, 16, 16, 3)
  np.testing.assert_allclose(np.asarray(grid), np.asarray(jnp.broadcast_to(grid[0, 0], grid.shape)), atol=1e-5)
  moved = encdiff.traversal_grid(state, None, images[0], jnp.array([[-3.0, 0.0, 3.0]]), jax.random.PRNGKey(5),
                                 steps=3, eta=0.0, tokens=(2,))
  assert moved.shape == (1, 3, 16, 16, 3) and float(jnp.abs(moved[0, 0] - moved[0, 2]).max()) > 1e-5


def test_ssim_and_overlay():
  rng = np.random.default_rng(0)
  a = rng.uniform(size=(2, 16, 16, 3))
  np.testing.assert_allclose(visualize.ssim(a, a), 1.0)
  assert np.all(visualize.ssim(a, rng.uniform(size=a.shape)) < 0.5)
  image = np.zeros((16, 16, 3), np.uint8)
  heat = np.zeros((4, 4))
  heat[0, 0] = 1.0
  over = visualize.heat_overlay(image, heat)
  assert over.shape == (16, 16, 3) and over[0, 0, 0] > over[15, 15, 0]  # 'jet': hot is red, cold is blue


def test_token_labels_say_what_a_token_encodes_and_what_its_swaps_change():
  evaluation = {"dci.importance_matrix": [[0.0, 0.9], [0.8, 0.1], [0.001, 0.0]], "factor_names": ["x", "y"]}
  assert visualize.token_labels(3, evaluation) == ["token 0 encodes y (importance 0.90)",
                                                   "token 1 encodes x (importance 0.80)", "token 2 (uninformative)"]
  assert visualize.token_labels(2, None) == ["token 0", "token 1"]
  # Without DCI (the quickstart scores FactorVAE and MIG only) MIG's I(code; factor) / H(factor) names them.
  mig_only = {"mig.normalized_mutual_info": [[0.7, 0.05], [0.02, 0.3]], "factor_names": ["x", "y"]}
  assert visualize.token_labels(2, mig_only) == ["token 0 encodes x (I/H 0.70)", "token 1 encodes y (I/H 0.30)"]
  # DCI's importances win where both are there.
  assert visualize.token_labels(2, {**mig_only, **evaluation})[0] == "token 0 encodes y (importance 0.90)"
  # What a swap does outranks what the scalar encodes: token 0 encodes y but its swaps change x; token 1's swaps
  # change nothing reliably.
  record = {"factor_names": ["x", "y"], "generation.swap_tokens": [0, 1],
            "generation.swap_matrix": [[0.93, 0.05], [0.1, 0.15]], "generation.factor_sizes": [10, 10]}
  assert visualize.token_labels(3, evaluation, record) == ["token 0 swaps x 93%", "token 1 swap changes nothing",
                                                          "token 2 (uninformative)"]
  # 30% of swaps showing the target's value of a 4-valued factor is what a random generator does: not labelled.
  coin = {**record, "generation.swap_matrix": [[0.93, 0.05], [0.1, 0.3]], "generation.factor_sizes": [10, 4]}
  assert visualize.token_labels(2, evaluation, coin)[1] == "token 1 swap changes nothing"
  assert visualize.shown_tokens(3, evaluation) == (0, 1)
  assert visualize.shown_tokens(3, evaluation, all_tokens=True) == visualize.shown_tokens(3, None) == (0, 1, 2)


def test_column_labels_wrap_under_their_token():
  assert visualize._column_label("token 12 swaps floor_hue 93%") == "token 12\nswaps\nfloor_hue\n93%"
  assert visualize._column_label("token 3 (uninformative)") == "token 3\nuninformative"
  grid = visualize.image_grid([np.zeros((2, 8, 8, 3), np.uint8)], ["a"], col_labels=["token 1\nx", "token 2"])
  assert grid.shape[0] > 8 + 2 * 2 + 20  # room for two header lines above the row


def test_describe_factors_names_each_factors_token():
  from concept_diffusion.evaluation.evaluate import describe_factors
  record = {"factor_names": ["floor_hue", "shape"], "mig.normalized_mutual_info": [[0.9, 0.0], [0.1, 0.4], [0.0, 0.5]],
            "mig.per_factor": {"floor_hue": 0.8, "shape": 0.1}}
  lines = describe_factors(record).splitlines()
  assert "MIG's I/H" in lines[0]
  assert lines[1].split() == ["floor_hue", "token", "0", "I/H", "0.90", "MIG", "gap", "0.80"]
  assert lines[2].split()[:3] == ["shape", "token", "2"]
  assert describe_factors({"factor_names": ["x"], "factor_vae.eval_accuracy": 0.5}) == ""


# --------------------------------------------------------------------------------------------------------------
# write_run_figures on grey (1-channel, as dSprites) and tiny datasets
# --------------------------------------------------------------------------------------------------------------


class GreyBlocks(data_lib.GroundTruthDataset):
  """A white block on black, one position per factor tuple: 1-channel images, every one different."""
  name = "grey_blocks"
  factor_names = ("x", "y")
  image_shape = (16, 16, 1)

  def __init__(self, factor_sizes: tuple[int, int]):
    self.factor_sizes = factor_sizes

  def images(self, indices):
    out = np.full((len(np.atleast_1d(indices)), 16, 16, 1), -1.0, np.float32)
    for i, (x, y) in enumerate(self.index_to_factors(indices)):
      out[i, 2 + 3 * y:6 + 3 * y, 2 + 3 * x:6 + 3 * x] = 1.0
    return out


class RecordingWriter:
  """MetricWriter's figure calls, kept in memory."""

  def __init__(self):
    self.images = {}

  def image(self, step, tag, image):
    del step
    self.images[tag] = image

  def scalars(self, step, values, stage):
    del step, values, stage


@pytest.fixture(scope="module")
def grey_run():
  """A pixel-space 1-channel model with a one-level UNet (the figures compile every sampler: keep them small)."""
  config = smoke.get_config()
  config.first_stage.kind = "none"
  config.data.channels = 1
  config.unet.channel_mult = (1,)
  config.unet.attention_resolutions = (1,)
  config.sample.ddim_steps = 2
  encdiff = build_model(config)
  variables = jax.jit(encdiff.init)(jax.random.PRNGKey(0))
  state = EncDiffVariables(variables["params"], variables["batch_stats"], variables["params"]["unet"], jnp.ones(()))
  return config, encdiff, state


def _workdir_with_logs(root) -> str:
  """A workdir with training logs and an evaluation, so the curves, DCI and metric figures are drawn too."""
  workdir = root / "run"
  (workdir / "eval").mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text("".join(
      json.dumps({"stage": "diffusion", "step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))
  (workdir / "eval" / "metrics_2.json").write_text(json.dumps(
      {"step": 2, "dci.disentanglement": 0.5, "factor_names": ["x", "y"],
       "dci.importance_matrix": [[0.9, 0.0], [0.0, 0.8], [0.0, 0.0], [0.1, 0.1]]}))
  return str(workdir)


ALL_FIGURES = {"swap_grid.png", "reconstructions.png", "attention_maps.png", "samples.png", "traversals.png",
               "loss_curves.png", "dci_importance.png", "metrics.png"}


def _figures(config, workdir, dataset, encdiff, state, **kwargs):
  return visualize.write_run_figures(config, workdir, dataset, encdiff, state, None, jax.random.PRNGKey(6), step=2,
                                     traversal_values=2, **kwargs)


def test_run_figures_of_a_one_channel_dataset_are_grey_except_the_attention_overlays(grey_run, tmp_path):
  config, encdiff, state = grey_run
  workdir, writer = _workdir_with_logs(tmp_path), RecordingWriter()
  written = _figures(config, workdir, GreyBlocks((4, 3)), encdiff, state, num_images=6, writer=writer)
  figures = os.path.join(workdir, "figures")
  assert sorted(written) == sorted(os.path.join(figures, name) for name in ALL_FIGURES)
  assert sorted(os.listdir(figures)) == sorted(ALL_FIGURES)  # no temporary files left beside them
  for name in ALL_FIGURES - {"loss_curves.png", "dci_importance.png", "metrics.png"}:
    pixels = np.asarray(Image.open(os.path.join(figures, name)))
    assert pixels.ndim == 3 and pixels.shape[-1] == 3, name
    grey = np.all(pixels[..., 0] == pixels[..., 1]) and np.all(pixels[..., 1] == pixels[..., 2])
    assert grey == (name != "attention_maps.png"), name
  for tag, image in writer.images.items():  # TensorBoard takes (H, W, 3) uint8
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3, tag


def test_run_figures_of_a_dataset_smaller_than_asked_for_pair_every_source_with_another_image(
    grey_run, tmp_path, monkeypatch):
  config, encdiff, state = grey_run
  grids = {}
  image_grid = visualize.image_grid
  def recording_grid(rows, labels=None, **kwargs):
    grids[labels[0] if labels else None] = [np.asarray(r) for r in rows]
    return image_grid(rows, labels, **kwargs)
  monkeypatch.setattr(visualize, "image_grid", recording_grid)
  workdir = _workdir_with_logs(tmp_path)
  # 10 images asked of a 6-image dataset: each figure shows all 6 (there are not 20 for distinct swap targets).
  written = _figures(config, workdir, GreyBlocks((3, 2)), encdiff, state, num_images=10)
  assert {os.path.basename(p) for p in written} == ALL_FIGURES
  sources, targets = grids["source"][:2]
  assert all(len(row) == 6 for row in grids["source"])
  assert all(len(row) == 6 for row in grids["input"])
  assert len({s.tobytes() for s in sources}) == 6
  assert {t.tobytes() for t in targets} == {s.tobytes() for s in sources}
  assert not any(np.array_equal(s, t) for s, t in zip(sources, targets))


def test_run_figures_of_a_one_image_dataset_skip_the_swap_grid_with_a_note(grey_run, tmp_path, capsys):
  config, encdiff, state = grey_run
  workdir = str(tmp_path / "run")
  written = _figures(config, workdir, GreyBlocks((1, 1)), encdiff, state, num_images=4, light=True)
  assert [os.path.basename(p) for p in written] == ["reconstructions.png"]
  assert os.listdir(os.path.join(workdir, "figures")) == ["reconstructions.png"]
  err = capsys.readouterr().err
  assert "no swap_grid.png" in err and "grey_blocks has 1 image" in err


def test_a_failed_figure_write_keeps_the_previous_file_and_closes_the_figure(tmp_path, monkeypatch):
  import matplotlib.figure  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  def half_written(path):
    with open(path, "wb") as f:
      f.write(b"\x89PNG half")
    raise OSError("disk full")

  path = tmp_path / "metrics.png"
  path.write_bytes(b"previous")
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, p, **kw: half_written(p))
  with pytest.raises(OSError, match="disk full"):
    visualize.plot_metric_history([{"step": 1, "dci.disentanglement": 0.5}], str(path))
  assert plt.get_fignums() == []
  monkeypatch.setattr(Image.Image, "save", lambda self, p, *a, **kw: half_written(p))
  with pytest.raises(OSError, match="disk full"):
    visualize.save_png(str(path), np.zeros((4, 4, 3), np.uint8))
  assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["metrics.png"]
