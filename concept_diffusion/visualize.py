"""Figures written to W/figures/: image grids and training curves (PNG)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def image_grid(rows: Sequence[np.ndarray], labels: Sequence[str] | None = None, pad: int = 2,
               upscale: int = 1) -> np.ndarray:
  """Rows of uint8 images (n, H, W, C) -> one (H', W', 3) uint8 grid, with an optional label per row."""
  rows = [np.asarray(r) for r in rows]
  n = max(len(r) for r in rows)
  h, w = rows[0].shape[1:3]
  label_w = 0 if not labels else 8 + 7 * max(len(s) for s in labels)
  cell_h, cell_w = h * upscale + pad, w * upscale + pad
  grid = np.full((len(rows) * cell_h + pad, label_w + n * cell_w + pad, 3), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      img = img if img.shape[-1] == 3 else np.repeat(img[..., :1], 3, axis=-1)
      img = np.repeat(np.repeat(img, upscale, axis=0), upscale, axis=1)
      y, x = pad + i * cell_h, label_w + pad + j * cell_w
      grid[y:y + h * upscale, x:x + w * upscale] = img
  if labels:
    pil = Image.fromarray(grid)
    draw = ImageDraw.Draw(pil)
    for i, text in enumerate(labels):
      draw.text((4, pad + i * cell_h + cell_h // 2 - 6), text, fill=(0, 0, 0))
    grid = np.asarray(pil)
  return grid


def save_png(path: str, image: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.png"
  Image.fromarray(np.asarray(image)).save(tmp)
  os.replace(tmp, path)


def plot_curves(records: Sequence[dict], path: str, keys: Sequence[str] = ("loss",)) -> None:
  """One panel per stage: the logged values of `keys` (and any stage-specific losses) over steps."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  stages = sorted({r["stage"] for r in records})
  if not stages:
    return
  fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
  for ax, stage in zip(axes[0], stages):
    rs = [r for r in records if r["stage"] == stage]
    positive = True
    for key in [k for k in rs[-1] if k in keys or k.endswith("loss") or k == "l1"]:
      pts = [(r["step"], r[key]) for r in rs if key in r]
      positive &= all(v > 0 for _, v in pts)
      ax.plot(*zip(*pts), label=key)
    ax.set_title(stage)
    ax.set_xlabel("step")
    if positive:
      ax.set_yscale("log")
    ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
