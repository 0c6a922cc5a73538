"""ProceduralDSprites: a dSprites-like dataset rendered from its factors, no download.

Same five factors, sizes and canonical order as dSprites (shape 3, scale 6, orientation 40, posX 32,
posY 32; 737,280 binary 64x64x1 images), so configs and metrics written for dSprites run unchanged. Each
image is a white shape (square, ellipse or heart) on black, tested at pixel centres, so pixels are exactly
-1 or 1 as in dSprites (0/1 there). Two deliberate differences from the real files: orientations are
`linspace(0, 2pi, 40, endpoint=False)` (dSprites includes 2pi, so its first and last orientation are the same
image), and the shapes are analytic curves rather than dSprites' sprites.

Pure fixed-shape jnp arithmetic: a batch renders in one jitted call on CPU, GPU or TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from concept_diffusion.data import base

FACTOR_NAMES = ("shape", "scale", "orientation", "posX", "posY")
FACTOR_SIZES = (3, 6, 40, 32, 32)
SHAPE_NAMES = ("square", "ellipse", "heart")

SCALES = np.linspace(0.5, 1.0, 6)  # as dSprites
ORIENTATIONS = np.linspace(0.0, 2.0 * np.pi, 40, endpoint=False)
POSITIONS = np.linspace(0.0, 1.0, 32)  # as dSprites; mapped to centres in [_MARGIN, 1 - _MARGIN]

# Geometry in image units ([0, 1] across). At scale 1 the square is 0.25 wide (16 px at 64x64); the margin
# keeps every shape inside the frame at any orientation (the rotated square reaches 0.177 from its centre, the
# ellipse 0.156, the heart 0.131).
_HALF_SIZE = 0.125
_MARGIN = 0.2
_ELLIPSE_AXES = (1.25, 0.6)  # semi-axes in units of the half size: elongated like dSprites' ellipse
_HEART_SCALE = 0.8  # the heart curve spans about 2.3 x 2.2 units before this
_HEART_SHIFT = 0.15  # centres the heart's bounding box on the position
# Images per jit call in `images()`: every call is padded to this, so each image_size compiles once.
_CHUNK = 256


def _render_one(factors: jax.Array, image_size: int) -> jax.Array:
  """One (H, W, 1) image in {-1, 1} from a factor tuple (5,) of ints."""
  shape = factors[0]
  scale = jnp.asarray(SCALES, jnp.float32)[factors[1]]
  angle = jnp.asarray(ORIENTATIONS, jnp.float32)[factors[2]]
  positions = jnp.asarray(_MARGIN + (1.0 - 2.0 * _MARGIN) * POSITIONS, jnp.float32)
  center_x, center_y = positions[factors[3]], positions[factors[4]]

  coords = (jnp.arange(image_size, dtype=jnp.float32) + 0.5) / image_size  # pixel centres: size-independent shapes
  dx, dy = coords[None, :] - center_x, coords[:, None] - center_y  # x right, y down
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  radius = _HALF_SIZE * scale
  qx = (cos * dx + sin * dy) / radius  # rotated into the shape's frame
  qy = (-sin * dx + cos * dy) / radius

  square = jnp.maximum(jnp.abs(qx), jnp.abs(qy)) <= 1.0
  ellipse = (qx / _ELLIPSE_AXES[0]) ** 2 + (qy / _ELLIPSE_AXES[1]) ** 2 <= 1.0
  hx, hy = qx / _HEART_SCALE, -qy / _HEART_SCALE + _HEART_SHIFT  # the curve's y points up, the image's down
  heart = (hx * hx + hy * hy - 1.0) ** 3 - hx * hx * hy ** 3 <= 0.0
  inside = jnp.where(shape == 0, square, jnp.where(shape == 1, ellipse, heart))
  return jnp.where(inside, 1.0, -1.0).astype(jnp.float32)[..., None]


@functools.partial(jax.jit, static_argnames=("image_size",))
def render(factors: jax.Array, image_size: int = 64) -> jax.Array:
  """Images (n, H, W, 1) float32 in {-1, 1} of factor tuples (n, 5) (canonical order, unchecked)."""
  return jax.vmap(functools.partial(_render_one, image_size=image_size))(factors.astype(jnp.int32))


class ProceduralDSprites(base.GroundTruthDataset):
  """dSprites factors rendered on the fly; 737,280 images, deterministic, no files."""

  name = "procedural_dsprites"
  factor_names = FACTOR_NAMES
  factor_sizes = FACTOR_SIZES
  renders_on_device = True

  def __init__(self, image_size: int = 64):
    self.image_size = base.validate_image_size(image_size)
    self.image_shape = (self.image_size, self.image_size, 1)

  def images_jax(self, indices: jax.Array) -> jax.Array:
    """Jit-able: images (n, H, W, 1) float32 in {-1, 1}. Out-of-range indices wrap: check them on the host."""
    return render(base.unravel_jax(indices, FACTOR_SIZES), image_size=self.image_size)

  def images(self, indices: np.ndarray) -> np.ndarray:
    """Images (n, H, W, 1) float32 in {-1, 1}, rendered in fixed-size chunks (one compile, bounded memory)."""
    factors = self.index_to_factors(indices).astype(np.int32)
    out = np.empty((len(factors),) + self.image_shape, np.float32)
    for start in range(0, len(factors), _CHUNK):
      chunk = factors[start:start + _CHUNK]
      padded = np.zeros((_CHUNK, len(FACTOR_SIZES)), np.int32)
      padded[:len(chunk)] = chunk
      out[start:start + len(chunk)] = np.asarray(render(padded, image_size=self.image_size))[:len(chunk)]
    return out
