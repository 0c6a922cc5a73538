"""ProceduralShapes3D: a ray-cast stand-in for DeepMind's 3dshapes that needs no download.

Same six factors, sizes and canonical (row-major) order as Shapes3D, so code, configs and metrics written for
the real dataset run unchanged on it. Every image is a pure float32 function of its factor tuple: an object
standing on the floor in front of a room corner, lit by one directional light (Lambert + ambient, with the
object's shadow on the floor and walls). As in 3dshapes, `orientation` swings the camera around the
object's vertical axis, so the walls, the light on the object and the object's outline all move with it
(a sphere's own shading still changes because the light stays fixed in the world).

Rendering is analytic ray casting (planes, box, sphere, finite cylinder, capsule) with fixed-shape
arithmetic only, so a batch renders in one jitted call on CPU, GPU or TPU.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from concept_diffusion.data import base
from concept_diffusion.data.array_files import cached_array
from concept_diffusion.errors import UserError

FACTOR_NAMES = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
FACTOR_SIZES = (10, 10, 10, 8, 4, 15)
SHAPE_NAMES = ("cube", "cylinder", "sphere", "capsule")

# Factor values as in the real 3dshapes labels.
HUES = np.linspace(0.0, 1.0, 10, endpoint=False)
SCALES = np.linspace(0.75, 1.25, 8)
ORIENTATIONS_DEG = np.linspace(-30.0, 30.0, 15)

# Scene constants (world units, y up, object at the origin on the floor y = 0). Sizes were chosen so that
# the object covers 6-10% of the image at the middle scales and the room corner stays in view at all angles.
_SATURATION, _VALUE = 0.85, 0.9
_CAMERA_DISTANCE, _CAMERA_HEIGHT, _TARGET_HEIGHT = 5.5, 3.2, 0.6
_HALF_FOV_TAN = math.tan(math.radians(17.0))
_CORNER = (0.8, -3.2)  # (x, z) of the vertical edge where the two walls meet
_WALL_NORMALS = ((0.7071068, 0.7071068), (-0.7071068, 0.7071068))  # (x, z), pointing into the room
_LIGHT = np.array([-0.35, 1.0, 0.55]) / np.linalg.norm([-0.35, 1.0, 0.55])  # towards the light
_AMBIENT, _DIFFUSE = 0.45, 0.6
# Base sizes at scale 1: similar apparent size, but distinct silhouettes even at 32x32 (the cylinder is
# slimmer and taller than the cube, the capsule slimmer still).
_CUBE_HALF = 0.45
_CYLINDER_RADIUS, _CYLINDER_HEIGHT = 0.38, 1.15
_SPHERE_RADIUS = 0.55
_CAPSULE_RADIUS, _CAPSULE_LENGTH = 0.34, 0.8  # length of the straight part between the hemispheres
_FAR = 1e30
_EPS = 1e-4
# Images per jit call in `images()`. Every call is padded to this size so that each image_size compiles once
# (a compile costs seconds on CPU, rendering 64 small images milliseconds); it also bounds memory.
_CHUNK = 64
# Bumped whenever a change of the scene or renderer changes pixels: render caches made before are rebuilt.
_RENDERER_VERSION = 2


def _hsv_to_rgb(hue: np.ndarray, saturation: float, value: float) -> np.ndarray:
  """Vectorised HSV -> RGB (hue in [0, 1)) via the piecewise-linear channel formula."""
  k = (np.array([5.0, 3.0, 1.0]) + hue[:, None] * 6.0) % 6.0
  return value - value * saturation * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


PALETTE = _hsv_to_rgb(HUES, _SATURATION, _VALUE).astype(np.float32)  # (10, 3) RGB in [0, 1]


# Vectors are (x, y, z) tuples of per-pixel arrays: no stacking or slicing, so the graph stays small (fast to
# compile) and XLA fuses the per-pixel arithmetic into a few loops.
Vec = tuple[jax.Array, jax.Array, jax.Array]


def _dot(a: Vec, b: Vec) -> jax.Array:
  return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _along(origin: Vec, direction: Vec, t: jax.Array) -> Vec:
  return tuple(o + t * d for o, d in zip(origin, direction))


def _select(cond: jax.Array, a: Vec, b: Vec) -> Vec:
  # Explicit float32: constant vectors would otherwise become float64 under jax_enable_x64.
  return tuple(jnp.where(cond, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)) for x, y in zip(a, b))


def _sphere_t(ro: Vec, rd: Vec, center_y, radius) -> jax.Array:
  """Distance to the first hit of a sphere centred on the y axis (_FAR on a miss)."""
  oc = (ro[0], ro[1] - center_y, ro[2])
  b = _dot(oc, rd)
  h = b * b - (_dot(oc, oc) - radius * radius)
  t = -b - jnp.sqrt(jnp.maximum(h, 0.0))
  return jnp.where((h > 0.0) & (t > 0.0), t, _FAR)


def _tube_t(ro: Vec, rd: Vec, radius, y0, y1) -> jax.Array:
  """First hit of the side of an open vertical cylinder x^2 + z^2 = r^2, y0 < y < y1."""
  a = rd[0] * rd[0] + rd[2] * rd[2]
  b = ro[0] * rd[0] + ro[2] * rd[2]
  h = b * b - a * (ro[0] * ro[0] + ro[2] * ro[2] - radius * radius)
  t = (-b - jnp.sqrt(jnp.maximum(h, 0.0))) / jnp.maximum(a, 1e-12)
  y = ro[1] + t * rd[1]
  return jnp.where((h > 0.0) & (t > 0.0) & (y > y0) & (y < y1), t, _FAR)


def _disc_t(ro: Vec, rd: Vec, radius, y) -> jax.Array:
  """First hit of an upward-facing horizontal disc at height y (the cylinder's lid)."""
  down = rd[1] < 0.0
  t = (y - ro[1]) / jnp.where(down, rd[1], -1.0)
  px, pz = ro[0] + t * rd[0], ro[2] + t * rd[2]
  return jnp.where(down & (t > 0.0) & (px * px + pz * pz < radius * radius), t, _FAR)


def _box_hit(ro: Vec, rd: Vec, half) -> tuple[jax.Array, Vec]:
  """First hit (t, normal) of an axis-aligned cube of half-size `half` resting on the floor (slab method)."""
  safe = tuple(jnp.where(jnp.abs(d) < 1e-8, 1e-8, d) for d in rd)
  near, far = [], []
  for o, d, c in zip(ro, safe, (0.0, half, 0.0)):
    inv = 1.0 / d
    near.append(-inv * (o - c) - jnp.abs(inv) * half)
    far.append(-inv * (o - c) + jnp.abs(inv) * half)
  t_near = jnp.maximum(jnp.maximum(near[0], near[1]), near[2])
  t_far = jnp.minimum(jnp.minimum(far[0], far[1]), far[2])
  # The face hit is the slab entered last.
  is_x = (near[0] >= near[1]) & (near[0] >= near[2])
  is_y = ~is_x & (near[1] >= near[2])
  is_z = ~is_x & ~is_y
  normal = tuple(jnp.where(axis, -jnp.sign(d), 0.0) for axis, d in zip((is_x, is_y, is_z), safe))
  return jnp.where((t_near < t_far) & (t_near > 0.0), t_near, _FAR), normal


def _object_hit(ro: Vec, rd: Vec, shape, scale) -> tuple[jax.Array, Vec]:
  """First hit (t, normal) of the object `shape` (index into SHAPE_NAMES) at `scale`.

  Cylinder, sphere and capsule are one family: a vertical tube between heights y0 and y1 closed by a flat lid
  (cylinder) or by spheres at both ends (capsule; a sphere is a capsule with y0 = y1). Intersecting that
  family and the cube, then selecting, keeps the code branch-free so it vectorises over the batch, and the
  graph small.
  """
  cylinder, sphere = shape == 1, shape == 2
  rounded = sphere | (shape == 3)
  radius = scale * jnp.where(cylinder, jnp.float32(_CYLINDER_RADIUS),
                             jnp.where(sphere, jnp.float32(_SPHERE_RADIUS), jnp.float32(_CAPSULE_RADIUS)))
  y0 = jnp.where(cylinder, 0.0, radius)
  y1 = jnp.where(cylinder, _CYLINDER_HEIGHT * scale, jnp.where(sphere, radius, radius + _CAPSULE_LENGTH * scale))

  lid_t = jnp.where(cylinder, _disc_t(ro, rd, radius, y1), _FAR)
  caps_t = jnp.where(rounded, jnp.minimum(_sphere_t(ro, rd, y0, radius), _sphere_t(ro, rd, y1, radius)), _FAR)
  # Union of convex parts: its first hit is the nearest part's first hit.
  round_t = jnp.minimum(jnp.minimum(_tube_t(ro, rd, radius, y0, y1), caps_t), lid_t)
  point = _along(ro, rd, round_t)
  axis_y = jnp.clip(point[1], y0, y1)  # nearest point on the core segment: the normal points away from it
  round_normal = _select(round_t == lid_t, (0.0, 1.0, 0.0),
                         (point[0] / radius, (point[1] - axis_y) / radius, point[2] / radius))

  box_t, box_normal = _box_hit(ro, rd, _CUBE_HALF * scale)
  is_cube = shape == 0
  return jnp.where(is_cube, box_t, round_t), _select(is_cube, box_normal, round_normal)


def _room_hit(ro: Vec, rd: Vec) -> tuple[jax.Array, Vec, jax.Array]:
  """First hit (t, normal) of the floor or one of the two walls, and whether it is the floor."""
  down = rd[1] < 0.0
  floor_t = jnp.where(down, -ro[1] / jnp.where(down, rd[1], -1.0), _FAR)
  t, normal = floor_t, (0.0, 1.0, 0.0)
  for nx, nz in _WALL_NORMALS:
    facing = rd[0] * nx + rd[2] * nz
    wall_t = ((_CORNER[0] - ro[0]) * nx + (_CORNER[1] - ro[2]) * nz) / jnp.where(facing < 0.0, facing, -1.0)
    wall_t = jnp.where((facing < 0.0) & (wall_t > 0.0), wall_t, _FAR)
    closer = wall_t < t
    t = jnp.where(closer, wall_t, t)
    normal = _select(closer, (nx, 0.0, nz), normal)
  return t, normal, t == floor_t


def _camera_rays(orientation_deg, image_size: int) -> tuple[Vec, Vec]:
  """Ray origin and unit directions (each (H, W)) of a pinhole camera orbiting the object."""
  azimuth = jnp.deg2rad(orientation_deg)
  position = jnp.stack([_CAMERA_DISTANCE * jnp.sin(azimuth), jnp.float32(_CAMERA_HEIGHT),
                        _CAMERA_DISTANCE * jnp.cos(azimuth)])
  forward = jnp.array([0.0, _TARGET_HEIGHT, 0.0], jnp.float32) - position
  forward = forward / jnp.linalg.norm(forward)
  right = jnp.cross(forward, jnp.array([0.0, 1.0, 0.0], jnp.float32))
  right = right / jnp.linalg.norm(right)
  up = jnp.cross(right, forward)
  # Pixel centres, so that every image_size samples the same field of view.
  coords = ((jnp.arange(image_size, dtype=jnp.float32) + 0.5) / image_size * 2.0 - 1.0) * _HALF_FOV_TAN
  u, v = coords[None, :], -coords[:, None]
  rd = tuple(forward[k] + u * right[k] + v * up[k] for k in range(3))
  norm = jnp.sqrt(_dot(rd, rd))
  rd = tuple(d / norm for d in rd)
  return tuple(jnp.broadcast_to(position[k], norm.shape) for k in range(3)), rd


def _render_one(factors: jax.Array, image_size: int) -> jax.Array:
  """One (H, W, 3) image in [0, 1] from a factor tuple (6,) of ints."""
  palette = jnp.asarray(PALETTE)
  floor_rgb, wall_rgb, object_rgb = palette[factors[0]], palette[factors[1]], palette[factors[2]]
  scale = jnp.asarray(SCALES, jnp.float32)[factors[3]]
  shape = factors[4]
  orientation = jnp.asarray(ORIENTATIONS_DEG, jnp.float32)[factors[5]]
  light = tuple(float(c) for c in _LIGHT)

  ro, rd = _camera_rays(orientation, image_size)
  room_t, room_n, is_floor = _room_hit(ro, rd)
  obj_t, obj_n = _object_hit(ro, rd, shape, scale)
  # Shadow: a room point is lit unless the ray from it towards the light hits the object. (Stacking camera
  # and shadow rays into one intersection call compiles no faster and runs 2x slower: it breaks fusion.)
  room_point = tuple(p + _EPS * n for p, n in zip(_along(ro, rd, room_t), room_n))
  shadow_t, _ = _object_hit(room_point, tuple(jnp.full_like(d, c) for d, c in zip(rd, light)), shape, scale)
  lit = shadow_t >= _FAR

  room_light = _AMBIENT + _DIFFUSE * jnp.where(lit, jnp.maximum(_dot(room_n, light), 0.0), 0.0)
  object_light = _AMBIENT + _DIFFUSE * jnp.maximum(_dot(obj_n, light), 0.0)
  room_rgb = jnp.where(is_floor[..., None], floor_rgb, wall_rgb) * room_light[..., None]
  rgb = jnp.where((obj_t < room_t)[..., None], object_rgb * object_light[..., None], room_rgb)
  return jnp.clip(rgb, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("image_size", "supersample"))
def render(factors: jax.Array, image_size: int = 64, supersample: int = 1) -> jax.Array:
  """Images (n, H, W, 3) float32 in [-1, 1] of factor tuples (n, 6) (canonical order, unchecked).

  `supersample` s > 1 casts s x s rays per pixel on a regular grid and averages them (a box filter), so edges are
  anti-aliased as in the real 3dshapes renders; 1 samples each pixel's centre (hard, aliased edges).
  A supersampled image is also rounded to 8 bits, as 3dshapes stores uint8, so that the on-the-fly render and the
  uint8 render cache (`ProceduralShapes3D(cache_dir=...)`) give identical pixels.
  """
  fine = image_size * supersample
  rgb = jax.vmap(functools.partial(_render_one, image_size=fine))(factors.astype(jnp.int32))
  if supersample > 1:
    rgb = rgb.reshape(rgb.shape[0], image_size, supersample, image_size, supersample, 3).mean(axis=(2, 4))
    rgb = jnp.round(rgb * 255.0) / 255.0
  return (rgb * 2.0 - 1.0).astype(jnp.float32)


class ProceduralShapes3D(base.GroundTruthDataset):
  """Shapes3D factors rendered on the fly; 480,000 images, deterministic, no files.

  With `cache_dir` and supersampling, every image is rendered once into a uint8 .npy there (1.5 GB at 32x32, about
  11 minutes of one core with 4x4 supersampling) and read from it afterwards: a whole-dataset evaluation then
  reads instead of casting 16 rays per pixel, and training loads batches from it on the host. Pixels are the same
  either way (rendering rounds to 8 bits too).
  """

  name = "procedural_shapes"
  factor_names = FACTOR_NAMES
  factor_sizes = FACTOR_SIZES

  def __init__(self, image_size: int = 64, supersample: int = 1, cache_dir: str = ""):
    self.image_size = base.validate_image_size(image_size)
    if not isinstance(supersample, (int, np.integer)) or isinstance(supersample, bool) or supersample < 1:
      raise UserError(f"data.supersample={supersample!r}: it must be a whole number >= 1 (rays per pixel side; "
                       "1 = no anti-aliasing, 4 = 16 rays per pixel as faithful to 3dshapes).")
    self.supersample = int(supersample)
    self.image_shape = (self.image_size, self.image_size, 3)
    self._cache = self._open_cache(cache_dir) if cache_dir and self.supersample > 1 else None

  @property
  def renders_on_device(self) -> bool:
    return self._cache is None

  def _open_cache(self, cache_dir: str) -> np.ndarray:
    path = os.path.join(os.path.expanduser(cache_dir),
                        f"procedural_shapes_{self.image_size}px_supersample{self.supersample}.npy")

    def fill(out: np.ndarray) -> None:
      block = _CHUNK * 16
      with tqdm(total=self.num_images, desc=f"render {os.path.basename(path)} (once)", unit="img",
                mininterval=2.0) as bar:
        for start in range(0, self.num_images, block):
          images = self._render_host(np.arange(start, min(start + block, self.num_images)))
          out[start:start + len(images)] = np.round((images + 1.0) * 127.5).astype(np.uint8)
          bar.update(len(images))

    return cached_array(path, [], (self.num_images, *self.image_shape), np.uint8, fill,
                        extra={"renderer": _RENDERER_VERSION}, what="procedural_shapes render cache")

  def images_jax(self, indices: jax.Array) -> jax.Array:
    """Jit-able: images (n, H, W, 3) float32 in [-1, 1].

    Indices cannot be range-checked here (they may be traced): out-of-range ones wrap around silently, so
    check them on the host (`check_indices`) where they come from.
    """
    return render(base.unravel_jax(jnp.asarray(indices), self.factor_sizes), image_size=self.image_size,
                  supersample=self.supersample)

  def images(self, indices: np.ndarray) -> np.ndarray:
    """Images (n, H, W, 3) float32 in [-1, 1]: read from the render cache, else rendered."""
    if self._cache is not None:
      indices = self.check_indices(indices)
      return self._cache[indices].astype(np.float32) / 127.5 - 1.0
    return self._render_host(indices)

  def _render_host(self, indices: np.ndarray) -> np.ndarray:
    """Rendered in fixed-size chunks (one compile, bounded memory)."""
    factors = self.index_to_factors(indices).astype(np.int32)
    out = np.empty((len(factors),) + self.image_shape, np.float32)
    for start in range(0, len(factors), _CHUNK):
      chunk = factors[start:start + _CHUNK]
      padded = np.zeros((_CHUNK, len(FACTOR_SIZES)), np.int32)
      padded[:len(chunk)] = chunk
      out[start:start + len(chunk)] = np.asarray(
          render(padded, image_size=self.image_size, supersample=self.supersample))[:len(chunk)]
    return out
