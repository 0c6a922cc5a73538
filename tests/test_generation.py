"""Generation metrics on a fake generator whose answers are known, and the factor reader on a small dataset."""
import dataclasses

import jax
import numpy as np
import pytest

from concept_diffusion.data.base import GroundTruthDataset
from concept_diffusion.evaluation import factor_reader, generation
from tiny_blocks import TinyBlocks


class FactorPixels(GroundTruthDataset):
  """Each image holds its own factor tuple in its pixels, so a reader can be exact."""
  name = "factor_pixels"
  factor_names = ("a", "b", "c")
  factor_sizes = (3, 4, 5)
  image_shape = (1, 1, 3)

  def images(self, indices):
    return self.index_to_factors(indices).astype(np.float32)[:, None, None, :]


class ExactReader:
  factor_sizes = FactorPixels.factor_sizes
  accuracy = {"a": 1.0, "b": 1.0, "c": 1.0}

  def read(self, images):
    return np.rint(np.asarray(images)[:, 0, 0, :]).astype(np.int64)


def _fake_generator():
  """Reconstructs a, b exactly and c as no value at all; token 0 carries a, token 1 carries b and c together, token 2
  nothing, token 3 carries a in every second image (by batch position)."""

  def reconstruct(sources):
    out = np.array(sources)
    out[..., 2] = -1
    return out

  def swap(sources, targets, token):
    out = reconstruct(sources)
    if token == 0:
      out[..., 0] = targets[..., 0]
    elif token == 1:
      out[..., 1:] = targets[..., 1:]
    elif token == 3:
      out[::2, ..., 0] = targets[::2, ..., 0]
    return out

  return reconstruct, swap


def test_generation_metrics_of_a_known_generator():
  dataset = FactorPixels()
  reconstruct, swap = _fake_generator()
  record = generation.generation_metrics(ExactReader(), dataset, reconstruct, swap, [0, 1, 2, 3], num_images=40,
                                         batch_size=10, progress=False)
  assert record["generation.reconstruction_accuracy.per_factor"] == {"a": 1.0, "b": 1.0, "c": 0.0}
  np.testing.assert_allclose(record["generation.swap_matrix"], [[1, 0, 0], [0, 1, 1], [0, 0, 0], [0.5, 0, 0]])
  # a: token 0 takes it every time and leaks nowhere; b and c: token 1 moves both, so each leaks fully.
  assert record["generation.swap_score.per_factor"] == {"a": 1.0, "b": 0.0, "c": 0.0}
  assert record["generation.swap_token.per_factor"] == {"a": 0, "b": 1, "c": 1}
  assert record["generation.swap_leakage.per_factor"] == {"a": 0.0, "b": 1.0, "c": 1.0}
  assert record["generation.swap_score"] == pytest.approx(1 / 3)
  lines = generation.describe_generation({**record, "factor_names": list(dataset.factor_names)}).splitlines()
  assert lines[1].split()[:8] == ["a", "reconstructed", "1.00", "swap", "token", "0", "moves", "it"]


def test_swap_targets_differ_in_every_factor_that_can():
  class WithConstant(FactorPixels):
    factor_sizes = (3, 1, 5)
  sources, targets = generation.swap_pairs(WithConstant(), 500, seed=1)
  assert np.all(sources[:, [0, 2]] != targets[:, [0, 2]]) and np.all(targets[:, 1] == 0)
  assert set(np.unique(targets[:, 2])) == set(range(5))  # every other value is drawn
  again = generation.swap_pairs(WithConstant(), 500, seed=1)
  np.testing.assert_array_equal(again[1], targets)


def test_a_generator_that_ignores_its_tokens_scores_zero_swaps():
  dataset = FactorPixels()
  reconstruct, _ = _fake_generator()
  record = generation.generation_metrics(ExactReader(), dataset, reconstruct, lambda s, t, k: reconstruct(s),
                                         [0, 1], num_images=20, batch_size=20, progress=False)
  assert np.max(record["generation.swap_matrix"]) == 0 and record["generation.swap_score"] == 0


def test_informative_tokens_drop_those_far_below_the_best():
  matrix = np.array([[0.9, 0.0], [0.0, 0.5], [0.01, 0.01], [0.0, 0.0]])
  np.testing.assert_array_equal(generation.informative_tokens(matrix), [0, 1])


def test_the_held_out_share_is_never_trained_on_and_spread_over_the_factors():
  dataset = TinyBlocks()
  rng = np.random.default_rng(0)
  factors, _ = factor_reader._draw(dataset, 500, rng, want_held_out=False)
  assert not factor_reader.held_out(dataset.factors_to_index(factors)).any()
  held = factor_reader.held_out(np.arange(480_000))
  assert 0.04 < held.mean() < 0.06
  # Row-major order puts the last factor fastest; a hash, unlike index % 20, holds out every value of it.
  assert len(np.unique(np.arange(480_000)[held] % 15)) == 15


def test_reader_learns_a_dataset_and_is_cached_by_its_pixels(tmp_path, monkeypatch):
  dataset = TinyBlocks()
  data_config = {"name": "tiny_blocks", "image_size": 16, "channels": 3}
  reader = factor_reader.reader_for(dataset, data_config, str(tmp_path), steps=300, batch_size=32, lr=3e-3,
                                    num_held_out=64, progress=False)
  assert min(reader.accuracy.values()) == 1.0, reader.accuracy
  indices = np.arange(dataset.num_images)
  np.testing.assert_array_equal(reader.read(dataset.images(indices)), dataset.index_to_factors(indices))
  # The second call loads the cached reader; nothing is trained.
  monkeypatch.setattr(factor_reader, "train_reader", lambda *a, **k: pytest.fail("trained again"))
  cached = factor_reader.reader_for(dataset, data_config, str(tmp_path), steps=300)
  assert cached.accuracy == reader.accuracy
  np.testing.assert_array_equal(cached.read(dataset.images(indices)), reader.read(dataset.images(indices)))
  # Other pixels (another image size) are another reader.
  assert factor_reader.reader_key({**data_config, "image_size": 32}) != factor_reader.reader_key(data_config)


@pytest.fixture(scope="module")
def tiny_pixel_run(tmp_path_factory):
  """A pixel-space smoke model trained for a few hundred steps on tiny_blocks with the cosine schedule over 1,000
  timesteps (alpha_bar_T = 2.4e-9, where an unclipped eps sampler amplifies its errors ~2e4 times)."""
  from concept_diffusion import api
  from concept_diffusion.train import trainer
  from configs import smoke
  config = smoke.get_config()
  config.data.name = "tiny_blocks"
  config.stages = ("diffusion",)
  config.first_stage.kind = "none"
  config.diffusion.beta_schedule = "cosine"
  config.diffusion.timesteps = 1000
  config.diffusion.loss = "l2"
  config.unet.patch_size = 2  # the UNet at 8x8 and 4x4: a few seconds per hundred steps
  config.train.batch_size = 8
  config.train.num_steps = 300
  config.train.lr = 1e-3
  config.train.ema_decay = 0.9
  config.train.log_every = 100
  config.train.checkpoint_every = 300
  config.sample.final_figures = False
  workdir = str(tmp_path_factory.mktemp("tiny_pixel_run"))
  trainer.train(config, workdir)
  return api.load_run(workdir)


def test_reconstructions_do_not_get_worse_with_more_steps(tiny_pixel_run):
  run = tiny_pixel_run
  assert run.model.clip_x0  # sample.clip_x0 "auto" clips in pixel space
  images = run.dataset.images(np.arange(0, 60, 5))
  mse = lambda x: float(np.mean((np.clip(x, -1, 1) - images) ** 2))
  for eta in (0.0, 1.0):
    few, many = (mse(run.reconstruct(images, steps=s, eta=eta)) for s in (10, 100))
    assert many <= 1.1 * few + 0.01, (eta, few, many)
  # Unclipped, the same model drifts with more steps (what sample.clip_x0 "auto" prevents in pixel space).
  plain = dataclasses.replace(run.model, clip_x0=False)
  tokens = run.tokens(run.encode(images))
  unclipped = mse(np.asarray(plain.sample_jit(run.variables, None, tokens, jax.random.PRNGKey(0), steps=100,
                                              eta=0.0)))
  assert mse(run.reconstruct(images, steps=100, eta=0.0)) <= unclipped + 1e-4


def test_tokens_to_swap():
  matrix = np.array([[0.9, 0.0, 0.2], [0.0, 0.5, 0.0], [0.01, 0.01, 0.0], [0.3, 0.0, 0.6]])
  np.testing.assert_array_equal(generation.tokens_to_swap(matrix, "informative"), [0, 1, 3])
  np.testing.assert_array_equal(generation.tokens_to_swap(matrix, "per_factor"), [0, 1, 3])
  np.testing.assert_array_equal(generation.tokens_to_swap(matrix[:3], "per_factor"), [0, 1])
  np.testing.assert_array_equal(generation.tokens_to_swap(matrix, "all"), [0, 1, 2, 3])
  with pytest.raises(ValueError, match="per_factor"):
    generation.tokens_to_swap(matrix, "best")
