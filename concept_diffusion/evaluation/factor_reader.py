"""A factor reader: a small CNN that reads a dataset's ground-truth factors off an image.

The encoder metrics (FactorVAE, DCI, MIG) read EncDiff's scalars; nothing there looks at what the diffusion side
draws. The reader does: trained on the dataset's own labelled images (one softmax head per factor), it turns a
generated image back into a factor tuple, so that a reconstruction or a token swap can be scored by which factor
values the picture shows (evaluation/generation.py).

A share of the dataset (a fixed hash of the index, `HELD_OUT_SHARE`) is never trained on; the reader's accuracy
per factor on it is reported beside every score it gives. Readers are cached per dataset (the data config's
fields that change pixels) under `cache_dir`, so every run on one dataset is read by the same classifier.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from concept_diffusion.data.base import GroundTruthDataset
from concept_diffusion.errors import UserError
from concept_diffusion.workdir import atomic_path, exists, read_text, write_json

HELD_OUT_SHARE = 20  # one index in 20 (by hash) is held out
# Pixel noise (std drawn per image from [0, NOISE_STD]) during training: generated images are not the rendered
# ones, and a reader that keys on exact pixel values would misread slightly noisy colours.
NOISE_STD = 0.08
# The data config's fields that change the pixels a dataset gives (and so the reader it needs).
_PIXEL_FIELDS = ("name", "image_size", "channels", "supersample", "source", "factor_sizes")


def held_out(indices: np.ndarray) -> np.ndarray:
  """Whether each dataset index belongs to the reader's held-out share: a multiplicative hash, so the share is
  spread over every factor value rather than a corner of the row-major order."""
  hashed = (np.asarray(indices, np.uint64) * np.uint64(2654435761)) % np.uint64(2 ** 32)
  return (hashed % np.uint64(HELD_OUT_SHARE)) == 0


class FactorReaderNet(nn.Module):
  """Images (B, H, W, C) in [-1, 1] -> logits (B, sum(factor_sizes)): a full-resolution convolution (the object's
  scale differs by a pixel or two), three stride-2 convolutions, one dense layer."""
  factor_sizes: tuple[int, ...]
  width: int = 16

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.gelu(nn.Conv(self.width, (3, 3))(x))
    for mult in (2, 4, 8):
      x = nn.gelu(nn.Conv(self.width * mult, (3, 3), strides=2)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.gelu(nn.Dense(256)(x))
    return nn.Dense(sum(self.factor_sizes))(x)


def _split(logits: jax.Array, factor_sizes: Sequence[int]) -> list[jax.Array]:
  return jnp.split(logits, np.cumsum(factor_sizes)[:-1], axis=-1)


@dataclasses.dataclass
class FactorReader:
  """A trained reader: `read(images)` -> (B, num_factors) int factor values."""
  net: FactorReaderNet
  params: Any
  factor_names: tuple[str, ...]
  accuracy: dict[str, float]  # held-out accuracy per factor
  info: dict[str, Any]  # how it was trained (steps, images, seconds, cache key)

  @property
  def factor_sizes(self) -> tuple[int, ...]:
    return self.net.factor_sizes

  def read(self, images: Any, batch_size: int = 256) -> np.ndarray:
    images = np.asarray(images, np.float32)
    out = [np.asarray(_predict(self.net, self.params, jnp.asarray(images[i:i + batch_size])))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(self.factor_sizes)), np.int64)

  def describe(self) -> str:
    return "factor reader held-out accuracy: " + ", ".join(f"{n} {a:.3f}" for n, a in self.accuracy.items())


@jax.jit(static_argnums=0)
def _predict(net: FactorReaderNet, params: Any, images: jax.Array) -> jax.Array:
  return jnp.stack([z.argmax(-1) for z in _split(net.apply({"params": params}, images), net.factor_sizes)], -1)


def _draw_indices(dataset: GroundTruthDataset, num: int, rng: np.random.Generator, *, want_held_out: bool
                  ) -> np.ndarray:
  """`num` random dataset indices inside (or outside) the held-out share."""
  indices = np.zeros((0,), np.int64)
  while len(indices) < num:
    drawn = dataset.factors_to_index(dataset.sample_factors(2 * num if want_held_out else num + num // 4, rng))
    indices = np.concatenate([indices, drawn[held_out(drawn) == want_held_out]])
  return indices[:num]


def _draw(dataset: GroundTruthDataset, num: int, rng: np.random.Generator, *, want_held_out: bool
          ) -> tuple[np.ndarray, np.ndarray]:
  """(factors, images) of `num` random images inside (or outside) the held-out share."""
  indices = _draw_indices(dataset, num, rng, want_held_out=want_held_out)
  return dataset.index_to_factors(indices), dataset.images(indices)


def train_reader(dataset: GroundTruthDataset, *, steps: int = 800, batch_size: int = 128, lr: float = 3e-3,
                 num_held_out: int = 2_000, seed: int = 0, width: int = 16, progress: bool = True) -> FactorReader:
  """Trains a reader on random labelled images outside the held-out share; measures it on `num_held_out` inside.
  A dataset that renders on the device (procedural ones) renders each batch inside the jitted step."""
  if steps < 1 or batch_size < 1:
    raise UserError(f"reader steps and batch size must be >= 1, got {steps} and {batch_size}.")
  net = FactorReaderNet(tuple(dataset.factor_sizes), width)
  rng = np.random.default_rng(seed)
  params = net.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + tuple(dataset.image_shape)))["params"]
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps), weight_decay=1e-4)
  opt_state = tx.init(params)
  on_device = dataset.renders_on_device

  @jax.jit
  def step(params, opt_state, batch, factors, key):
    images = dataset.images_jax(batch) if on_device else batch
    noise_std = jax.random.uniform(key, (images.shape[0], 1, 1, 1), maxval=NOISE_STD)
    images = images + noise_std * jax.random.normal(jax.random.fold_in(key, 1), images.shape)

    def loss_fn(p):
      heads = _split(net.apply({"params": p}, images), net.factor_sizes)
      return sum(optax.softmax_cross_entropy_with_integer_labels(z, factors[:, j]).mean()
                 for j, z in enumerate(heads))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.time()
  for i in range(steps):
    indices = _draw_indices(dataset, batch_size, rng, want_held_out=False)
    batch = jnp.asarray(indices, jnp.int32) if on_device else jnp.asarray(dataset.images(indices))
    params, opt_state, loss = step(params, opt_state, batch, jnp.asarray(dataset.index_to_factors(indices)),
                                   jax.random.PRNGKey(seed * 7919 + i))
    if progress and (i + 1) % max(1, steps // 10) == 0:
      eta = (time.time() - start) / (i + 1) * (steps - i - 1)
      print(f"factor reader {dataset.name}: step {i + 1}/{steps}  loss {float(loss):.4f}  ETA {eta:.0f} s",
            file=sys.stderr, flush=True)
  factors, images = _draw(dataset, num_held_out, np.random.default_rng(seed + 1), want_held_out=True)
  reader = FactorReader(net, params, tuple(dataset.factor_names), {}, {})
  hits = reader.read(images) == factors
  reader.accuracy = {name: float(hits[:, j].mean()) for j, name in enumerate(dataset.factor_names)}
  reader.info = {"steps": steps, "batch_size": batch_size, "lr": lr, "width": width, "seed": seed,
                 "train_images": steps * batch_size, "num_held_out": num_held_out,
                 "train_seconds": round(time.time() - start, 1)}
  return reader


def reader_key(data_config: Any) -> str:
  """The cache key of a dataset's reader: its name and a hash of the data fields that change its pixels."""
  fields = {f: data_config.get(f) for f in _PIXEL_FIELDS if f in data_config}
  fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
  digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
  return f"{fields.get('name', 'dataset')}-{digest}"


def save_reader(reader: FactorReader, directory: str) -> None:
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(reader.params).items()}
  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  with atomic_path(os.path.join(directory, "params.npz")) as tmp:
    with open(tmp, "wb") as f:
      f.write(buffer.getvalue())
  write_json(os.path.join(directory, "reader.json"),
             {"factor_names": list(reader.factor_names), "factor_sizes": list(reader.factor_sizes),
              "width": reader.net.width, "held_out_accuracy": reader.accuracy, **reader.info}, indent=2)


def load_reader(directory: str) -> Optional[FactorReader]:
  """The reader saved in `directory`, or None when there is none (or it is incomplete)."""
  meta_path, params_path = os.path.join(directory, "reader.json"), os.path.join(directory, "params.npz")
  if not (exists(meta_path) and exists(params_path)):
    return None
  meta = json.loads(read_text(meta_path))
  with np.load(params_path) as arrays:
    params = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(arrays[k]) for k in arrays.files})
  info = {k: v for k, v in meta.items() if k not in ("factor_names", "factor_sizes", "held_out_accuracy")}
  return FactorReader(FactorReaderNet(tuple(meta["factor_sizes"]), meta["width"]), params,
                      tuple(meta["factor_names"]), dict(meta["held_out_accuracy"]), info)


def reader_for(dataset: GroundTruthDataset, data_config: Any, cache_dir: str, *, steps: int = 800,
               say: Callable[[str], None] = lambda m: print(m, file=sys.stderr), **train_kwargs) -> FactorReader:
  """The dataset's cached reader, trained (and cached) first when there is none for these pixels and steps."""
  directory = os.path.join(os.path.expanduser(cache_dir), reader_key(data_config))
  reader = load_reader(directory) if cache_dir else None
  if reader is not None and reader.info.get("steps") == steps and reader.factor_sizes == tuple(dataset.factor_sizes):
    return reader
  say(f"training the factor reader of {dataset.name} ({steps} steps; cached in {directory})")
  reader = train_reader(dataset, steps=steps, **train_kwargs)
  reader.info["key"] = reader_key(data_config)
  if cache_dir:
    save_reader(reader, directory)
  say(reader.describe())
  return reader
