"""Figures written to W/figures/: image grids and training curves (PNG)."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from concept_diffusion.evaluation import records
from concept_diffusion.evaluation.records import eval_history, token_factor_matrix
from concept_diffusion.models.encdiff import EncDiff, as_uint8
from concept_diffusion.workdir import (FIGURES_DIR, atomic_path, eval_path, eval_steps, figure_path, load_npy,
                                       read_metrics, read_text)


def to_rgb(image: np.ndarray) -> np.ndarray:
  """(..., C) -> (..., 3) for any channel count C: grey (C=1) repeated, colour (C=3) kept, 2 channels shown as
  their mean in grey, more than 3 as the first three (e.g. RGBA without its alpha)."""
  channels = image.shape[-1]
  if channels == 3:
    return image
  if channels > 3:
    return image[..., :3]
  grey = image[..., :1] if channels == 1 else np.mean(image, axis=-1, keepdims=True).astype(image.dtype)
  return np.repeat(grey, 3, axis=-1)


def image_grid(rows: Sequence[np.ndarray], labels: Sequence[str] | None = None, pad: int = 2,
               upscale: int = 1, col_labels: Sequence[str] | None = None) -> np.ndarray:
  """Rows of uint8 images (n, H, W, C) -> one (H', W', 3) uint8 grid, with an optional label per row and per column
  (a column label may have several lines, split at newlines)."""
  rows = [np.asarray(r) for r in rows]
  n = max(len(r) for r in rows)
  h, w = rows[0].shape[1:3]
  label_w = 0 if not labels else 8 + 7 * max(len(s) for s in labels)
  header_h = 0 if not col_labels else 4 + 11 * max(len(s.split("\n")) for s in col_labels)
  cell_h, cell_w = h * upscale + pad, w * upscale + pad
  grid = np.full((header_h + len(rows) * cell_h + pad, label_w + n * cell_w + pad, 3), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      img = to_rgb(img)
      img = np.repeat(np.repeat(img, upscale, axis=0), upscale, axis=1)
      y, x = header_h + pad + i * cell_h, label_w + pad + j * cell_w
      grid[y:y + h * upscale, x:x + w * upscale] = img
  if labels or col_labels:
    pil = Image.fromarray(grid)
    draw = ImageDraw.Draw(pil)
    for i, text in enumerate(labels or ()):
      draw.text((4, header_h + pad + i * cell_h + cell_h // 2 - 6), text, fill=(0, 0, 0))
    for j, text in enumerate(col_labels or ()):
      draw.multiline_text((label_w + pad + j * cell_w + 1, 2), text, fill=(0, 0, 0), spacing=1)
    grid = np.asarray(pil)
  return grid


def save_png(path: str, image: np.ndarray) -> None:
  """`image` (H, W, 3) uint8 as a PNG at `path`, atomically (a reader never sees a half-written figure)."""
  with atomic_path(path) as tmp:
    Image.fromarray(np.asarray(image)).save(tmp)


@contextlib.contextmanager
def _pyplot_figure(path: str, **subplots_kwargs) -> Iterator[tuple]:
  """(fig, axes) of plt.subplots(**subplots_kwargs) to draw into; saved atomically to `path` when the block ends
  without an error, and closed either way (pyplot keeps every open figure alive, so a failed plot would leak one).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(**subplots_kwargs)
  try:
    yield fig, axes
    fig.tight_layout()
    with atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=100)
  finally:
    plt.close(fig)


def plot_curves(records: Sequence[dict], path: str, keys: Sequence[str] = ("loss",)) -> bool:
  """One panel per stage: the logged values of `keys` (and any stage-specific losses) over steps. Returns whether
  it wrote the figure (not when nothing has been logged yet)."""
  stages = sorted({r["stage"] for r in records})
  if not stages:
    return False
  with _pyplot_figure(path, nrows=1, ncols=len(stages), figsize=(5 * len(stages), 3.5), squeeze=False) as (_, axes):
    for ax, stage in zip(axes[0], stages):
      rs = [r for r in records if r["stage"] == stage]
      positive = True
      for key in [k for k in rs[-1] if k in keys or k.endswith("loss") or k == "l1"]:
        pts = [(r["step"], r[key]) for r in rs if key in r]
        positive &= all(v > 0 for _, v in pts)
        ax.plot(*zip(*pts), label=key)
      ax.set_title(stage)
      ax.set_xlabel("step")
      if positive and ax.lines:
        ax.set_yscale("log")
      if ax.lines:
        ax.legend(fontsize=7)
  return True


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
  """uint8 image (H, W, C) with a [0, 1] heat map (h, w) upsampled (bilinear) and blended in as 'jet' colours."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  heat = np.asarray(Image.fromarray(np.asarray(heat, np.float32)).resize((w, h), Image.BILINEAR))
  colours = matplotlib.colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
  base = to_rgb(image)
  return np.clip((1 - alpha) * base + alpha * colours, 0, 255).astype(np.uint8)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) of images in [0, 1], mean over channels."""
  from scipy.ndimage import gaussian_filter  # pylint: disable=g-import-not-at-top
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  blur = lambda x: gaussian_filter(x, sigma=(0, 1.5, 1.5, 0), truncate=3.5)
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mu_a, mu_b = blur(a), blur(b)
  var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return s.mean(axis=(1, 2, 3))


def plot_matrix(matrix: np.ndarray, path: str, row_label: str, col_labels: Sequence[str], title: str) -> None:
  """A heat-map of e.g. the DCI importance matrix (codes x factors)."""
  with _pyplot_figure(path, figsize=(1.2 + 0.7 * len(col_labels), 1.2 + 0.3 * matrix.shape[0])) as (fig, ax):
    im = ax.imshow(matrix, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(matrix.shape[0]), [f"{row_label} {i}" for i in range(matrix.shape[0])], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)


def plot_metric_history(history: Sequence[dict], path: str) -> None:
  """Metric values over training steps (one line per metric) from W/eval/metrics_<step>.json records."""
  keys = sorted({k for r in history for k, v in r.items() if "." in k and isinstance(v, (int, float))
                 and not k.endswith(("num_active_dims", "runtime_s"))})
  with _pyplot_figure(path, figsize=(6, 3.5)) as (_, ax):
    for key in keys:
      pts = sorted((r["step"], r[key]) for r in history if key in r)
      ax.plot(*zip(*pts), marker="o", label=key)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.05)
    ax.set_title("disentanglement metrics")
    if ax.lines:
      ax.legend(fontsize=6)


# ---------------------------------------------------------------------------------------------------------
# The figures of a run (swap grid, attention maps, traversals, reconstructions, samples, curves, DCI).

def token_labels(num_tokens: int, evaluation: dict | None, generation_record: dict | None = None) -> list[str]:
  """'token k' plus what it does. With a generation record (W/eval/generation_<step>.json): the factor its swaps
  really change and how often ('token 3 swaps floor_hue 94%'), or 'swap changes nothing' when no factor takes the
  target's value in 20% of its swaps. Otherwise the factor its scalar encodes most, with the value of the
  information matrix it comes from (DCI importance, else MIG's I/H; records.token_factor_matrix), and
  '(uninformative)' for tokens below records.UNINFORMATIVE_SHARE of the most informative one."""
  labels = [f"token {k}" for k in range(num_tokens)]
  matrix, source = token_factor_matrix(evaluation)
  informative = set(range(num_tokens)) if matrix is None else set(records.informative_tokens(matrix).tolist())
  swapped = set(generation_record.get("generation.swap_tokens", [])) if generation_record else set()
  swap_labels = records.swap_factor_labels(generation_record, num_tokens)
  names = (evaluation or {}).get("factor_names") or []
  for k in range(num_tokens):
    if k in swap_labels:
      labels[k] += f" swaps {swap_labels[k]}"
    elif k in swapped:
      labels[k] += " swap changes nothing"
    elif k not in informative:
      labels[k] += " (uninformative)"
    elif matrix is not None and k < matrix.shape[0]:
      j = int(matrix[k].argmax())
      name = names[j] if j < len(names) else f"factor {j}"
      labels[k] += f" encodes {name} ({'I/H' if source.startswith('MIG') else 'importance'} {matrix[k, j]:.2f})"
  return labels


def shown_tokens(num_tokens: int, evaluation: dict | None, all_tokens: bool = False) -> tuple[int, ...]:
  """The tokens figures draw: every token with `all_tokens` or without an evaluation record to judge them by,
  else the informative ones (records.informative_tokens)."""
  matrix, _ = token_factor_matrix(evaluation)
  if all_tokens or matrix is None:
    return tuple(range(num_tokens))
  return tuple(int(k) for k in records.informative_tokens(matrix) if k < num_tokens)


def plot_swap_matrix(record: dict, path: str) -> None:
  """The swap matrix of a generation record: per swapped token (rows) the share of swaps in which each factor
  (columns) takes the target's value, annotated."""
  matrix = np.asarray(record["generation.swap_matrix"], np.float64).reshape(len(record["generation.swap_tokens"]),
                                                                           len(record["factor_names"]))
  names = record["factor_names"]
  with _pyplot_figure(path, figsize=(1.6 + 0.8 * len(names), 1.4 + 0.32 * max(matrix.shape[0], 1))) as (fig, ax):
    im = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(matrix.shape[0]), [f"token {k}" for k in record["generation.swap_tokens"]], fontsize=7)
    for (i, j), value in np.ndenumerate(matrix):
      ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white" if value < 0.6 else "black")
    recon = record.get("generation.reconstruction_accuracy", float("nan"))
    ax.set_title(f"swap take-rate, step {record.get('step', '?')} ({record['generation.num_images']} pairs; "
                 f"reconstruction accuracy {recon:.2f})", fontsize=8)
    fig.colorbar(im, ax=ax)


def _column_label(label: str) -> str:
  """A token label on narrow columns: 'token 3' over what it does, wrapped to ~9 characters a line."""
  head, _, rest = label.partition(" ")[2].partition(" ")
  words, lines = rest.strip("()").split(), []
  for word in words:
    if lines and len(lines[-1]) + len(word) < 9:
      lines[-1] += " " + word
    else:
      lines.append(word)
  return "\n".join([f"token {head}"] + lines)


def figures_hook(snapshot) -> list[str]:
  """The trainer's figures hook (train/trainer.py Hooks): the swap grid and reconstructions during training,
  every figure when the run is finished, only the loss curves when it has no diffusion stage."""
  s = snapshot
  if s.state is None:
    path = figure_path(s.workdir, "loss_curves.png")
    return [path] if plot_curves(read_metrics(s.workdir), path) else []
  return write_run_figures(s.config, s.workdir, s.dataset, s.model, s.state, s.ae_params, s.rng, step=s.step,
                           writer=s.writer, light=not s.final)


def write_run_figures(config, workdir: str, dataset, model: EncDiff, state, ae_params, rng, *, step: int,
                      num_images: int | None = None,
                      attention_side: int | None = None, traversal_values: int = 7,
                      writer=None, light: bool = False, all_tokens: bool = False) -> list[str]:
  """Writes the figures of a trained run to W/figures/ (and TensorBoard when `writer` is given).

  Swap grid (row k: token k from the target), per-token cross-attention maps averaged over heads, over the
  layers at `attention_side` (default: the finest) and over the sampling steps, traversals over quantiles of
  each scalar, DDIM reconstructions with MSE/SSIM, samples, loss curves, the DCI importance matrix and the
  metric history. `light` writes only the swap grid and the reconstructions (the periodic training figures).
  Sampling is batched and jitted (EMA UNet, config.sample's DDIM settings). Tokens are labelled by what their swaps
  change when the run has generation metrics, else by what their scalars encode; uninformative tokens are left out
  unless `all_tokens`.

  Each figure shows min(num_images, dataset.num_images) images. The swap targets are further images when the
  dataset has enough, otherwise the shown images again, each paired with a different one; a dataset of one image
  has no pair to swap, so it gets no swap grid.
  """
  figures = os.path.join(workdir, FIGURES_DIR)
  steps, eta = config.sample.ddim_steps, config.sample.eta
  n = min(num_images or config.sample.num_images, dataset.num_images)
  upscale = max(1, 64 // config.data.image_size)
  to_u8 = lambda x: np.asarray(as_uint8(x))
  num_drawn = min(2 * n, dataset.num_images)
  indices = np.sort(np.random.default_rng(config.seed + step).choice(dataset.num_images, size=num_drawn,
                                                                     replace=False))
  images = jnp.asarray(dataset.images(indices))
  sources = images[:n]
  targets = images[n:] if num_drawn == 2 * n else jnp.roll(sources, -1, axis=0)
  history = eval_history(workdir)
  evaluation = history[-1] if history else None
  labels = token_labels(config.encoder.num_tokens, evaluation, records.latest_generation_record(workdir))
  shown = shown_tokens(config.encoder.num_tokens, evaluation, all_tokens)
  keys = jax.random.split(rng, 4)
  written = []

  def save(name, grid):
    written.append(os.path.join(figures, name))
    save_png(written[-1], grid)
    if writer is not None:
      writer.image(step, f"figures/{name[:-4]}", grid)

  if dataset.num_images >= 2:
    swaps = model.swap_grid(state, ae_params, sources, targets, keys[0], steps=steps, eta=eta,
                            token_sets=((),) + tuple((k,) for k in shown))
    save("swap_grid.png", image_grid([to_u8(sources), to_u8(targets)] + [to_u8(r) for r in swaps],
                                     ["source", "target", "own tokens"] + [labels[k] for k in shown],
                                     upscale=upscale))
  else:
    print(f"note: no swap_grid.png: the dataset {dataset.name} has 1 image, and a swap needs a second one to take "
          "tokens from.", file=sys.stderr)

  recon = model.reconstruct(state, ae_params, sources, keys[3], steps=steps, eta=eta)
  x, y = (np.asarray(sources) + 1) / 2, np.clip((np.asarray(recon) + 1) / 2, 0, 1)
  mse, ssim_value = float(np.mean((x - y) ** 2)), float(np.mean(ssim(x, y)))
  rows, row_labels = [to_u8(sources)], ["input"]
  if model.first_stage is not None:
    rows.append(to_u8(model.first_stage_reconstruct(ae_params, sources)))
    row_labels.append("autoencoder")
  rows.append(to_u8(recon))
  row_labels.append(f"DDIM {steps}: MSE {mse:.4f} SSIM {ssim_value:.3f}")
  save("reconstructions.png", image_grid(rows, row_labels, upscale=upscale))
  if writer is not None:
    writer.scalars(step, {"reconstruction_mse": mse, "reconstruction_ssim": ssim_value}, "figures")
  if light:
    return written

  _, own_tokens = model.encode_with_tokens(state, sources)
  if model.has_cross_attention():
    side = attention_side or model.attention_sides()[0]
    samples, maps = model.sample_jit(state, ae_params, own_tokens, keys[1], steps=steps, eta=eta,
                                     attention_side=side)
    maps = np.asarray(maps)
    big = to_rgb(np.repeat(np.repeat(to_u8(sources), upscale, axis=1), upscale, axis=2))  # beside colour overlays
    rows = [np.stack([big[i]] + [heat_overlay(big[i], maps[i, :, :, k] / max(maps[i].max(), 1e-8))
                                 for k in shown]) for i in range(n)]
    columns = ["input"] + [_column_label(labels[k]) for k in shown]
    save("attention_maps.png", image_grid(rows, [f"image {i}" for i in range(n)], col_labels=columns))
  else:  # e.g. the AdaGN ablation: no cross-attention maps to draw
    samples = model.sample_jit(state, ae_params, own_tokens, keys[1], steps=steps, eta=eta)
  save("samples.png", image_grid([to_u8(samples)], ["samples"], upscale=upscale))

  code_steps = eval_steps(workdir, "codes")
  if code_steps:
    codes = load_npy(eval_path(workdir, "codes", code_steps[-1]), mmap_mode="r")
    codes = np.asarray(codes[np.linspace(0, len(codes) - 1, min(len(codes), 20000)).astype(int)])
  else:
    codes = np.asarray(model.encode(state, images))
  values = np.quantile(codes, np.linspace(0.05, 0.95, traversal_values), axis=0).T  # (N, V)
  trav = model.traversal_grid(state, ae_params, sources[0], jnp.asarray(values[list(shown)], jnp.float32), keys[2],
                              tokens=shown, steps=steps, eta=eta)
  save("traversals.png", image_grid([to_u8(r) for r in trav], [labels[k] for k in shown], upscale=upscale))

  if plot_curves(read_metrics(workdir), os.path.join(figures, "loss_curves.png")):
    written.append(os.path.join(figures, "loss_curves.png"))
  if evaluation and "dci.importance_matrix" in evaluation:
    written.append(os.path.join(figures, "dci_importance.png"))
    plot_matrix(np.asarray(evaluation["dci.importance_matrix"]), written[-1], "token",
                evaluation.get("factor_names", []), f"DCI importance, step {evaluation['step']}")
  if history:
    written.append(os.path.join(figures, "metrics.png"))
    plot_metric_history(history, written[-1])
  generation_record = records.latest_generation_record(workdir)
  if generation_record:
    written.append(os.path.join(figures, "swap_matrix.png"))
    plot_swap_matrix(generation_record, written[-1])
  return written

