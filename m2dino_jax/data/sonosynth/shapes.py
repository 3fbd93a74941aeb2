"""Drawing primitives for sonosynth scenes, all on the output pixel grid (x = column, y = row).

Shapes are returned as a normalised radius `rho` (< 1 inside, 1 on the boundary), so one call
gives the filled region, a ring of any thickness and a soft edge. Backscatter maps are in dB
relative to soft tissue; attenuation maps in dB/cm/MHz.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage

from m2dino_jax.data.sonosynth import physics

# Backscatter levels (dB re soft tissue) and attenuations (dB/cm/MHz) of the materials used.
FLUID_DB, FLUID_ATTEN = -45.0, 0.05
BONE_DB, BONE_ATTEN = 16.0, 12.0
FAT_DB = -7.0
FAT_DENSITY = 0.4  # scatterers per beam sample in fat: few per resolution cell, Nakagami m ~ 0.6
SPECULAR_FLOOR_DB = -18.0  # a specular surface seen edge-on still scatters this much (rough bone)
# soft-tissue interfaces (organ capsules, the diaphragm, a bladder wall) are partly specular: brightest where the
# beam meets them square on, down to this much (dB) where it runs along them (smoother than bone)
CAPSULE_FLOOR_DB = -10.0
WALL_DB = 10.0
MUSCLE_DB = -3.0
# Skeletal muscle: scatterers concentrated on the fibrous septa between fascicles, fewer per resolution cell
# than parenchyma (dense, fully developed: Nakagami m = 1), more than fat: m ~ 0.8 with a linear probe.
MUSCLE_DENSITY = 0.6
BLOOD_DB, BLOOD_ATTEN = -32.0, 0.18


class Canvas:
  """The output image grid of one sample: size, pixel coordinates, imaged field, mm per pixel."""

  def __init__(self, size: int, probe: physics.Probe):
    self.size = size
    self.probe = probe
    geo = physics.geometry(probe, size, size)
    self.fov = geo.fov
    self.spacing_mm = geo.spacing_mm
    self.beam_dir = geo.beam_dir  # [2, H, W] (x, y) direction of the beam through each pixel
    self.yy, self.xx = _grid(size)
    self.depth_mm = geo.pixel_depth_mm  # [H, W] depth below the skin along the beam
    self.density = None  # scatterer density map, set by `background` (None: dense everywhere)

  def px(self, fraction: float) -> float:
    """A length given as a fraction of the image size, in pixels."""
    return fraction * self.size

  def mm(self, length_mm: float) -> float:
    """A length in mm, in pixels."""
    return length_mm / self.spacing_mm[1]

  def window(self, cx, cy, r):
    """(rows, cols) slices of the square of half-side r (pixels) around (cx, cy), clipped to the image."""
    r = int(math.ceil(r)) + 1
    x, y = int(round(float(cx))), int(round(float(cy)))
    return (slice(min(max(y - r, 0), self.size), min(max(y + r + 1, 0), self.size)),
            slice(min(max(x - r, 0), self.size), min(max(x + r + 1, 0), self.size)))

  def density_map(self) -> np.ndarray:
    """The scatterer density map (created dense on first use), to paint sparse-scatterer tissue into."""
    if self.density is None:
      self.density = np.ones((self.size, self.size), np.float32)
    return self.density

  def inside(self, points, margin: float = 2.0) -> bool:
    """Whether every (x, y) point lies in the imaged field, at least `margin` pixels from its edge."""
    fov = self.fov if margin <= 0 else _eroded(self.probe, self.size, int(margin))
    p = np.round(np.asarray(points, np.float32).reshape(-1, 2)).astype(int)
    ok = (p[:, 0] >= 0) & (p[:, 0] < self.size) & (p[:, 1] >= 0) & (p[:, 1] < self.size)
    return bool(ok.all() and fov[p[:, 1], p[:, 0]].all())


_ERODED: dict = {}


def _eroded(probe: physics.Probe, size: int, margin: int) -> np.ndarray:
  """The imaged field shrunk by `margin` pixels (cached per field geometry)."""
  key = (probe.geometry, probe.depth_mm, probe.width_mm, probe.angle_deg, probe.apex_mm, size, margin)
  if key not in _ERODED:
    if len(_ERODED) > 64:
      _ERODED.clear()
    _ERODED[key] = ndimage.binary_erosion(physics.geometry(probe, size, size).fov, iterations=margin)
  return _ERODED[key]


@functools.lru_cache(maxsize=8)
def _grid(size: int):
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  yy.setflags(write=False)
  xx.setflags(write=False)
  return yy, xx


def _local(cv: Canvas, cx, cy, angle):
  """Pixel coordinates rotated into a frame centred on (cx, cy) and turned by `angle` radians."""
  dx, dy = cv.xx - np.float32(cx), cv.yy - np.float32(cy)
  c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
  return c * dx + s * dy, -s * dx + c * dy


def ellipse(cv: Canvas, cx, cy, a, b, angle=0.0) -> np.ndarray:
  """rho of an ellipse with semi-axes a (along `angle`) and b."""
  u, v = _local(cv, cx, cy, angle)
  return np.sqrt((u / np.float32(a)) ** 2 + (v / np.float32(b)) ** 2)


def ellipse_at(cv: Canvas, cx, cy, a, b, angle=0.0):
  """A small ellipse computed only in its window: (window, rho there). `echo[w][rho < 1] = v` paints it."""
  w = cv.window(cx, cy, max(a, b))
  dx = cv.xx[w] - np.float32(cx)
  dy = cv.yy[w] - np.float32(cy)
  c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
  u, v = c * dx + s * dy, -s * dx + c * dy
  return w, np.sqrt((u / np.float32(a)) ** 2 + (v / np.float32(b)) ** 2)


def blob(cv: Canvas, rng, cx, cy, a, b, angle=0.0, wobble=0.08, spikes=0.0) -> np.ndarray:
  """rho of an irregular star-shaped mass: an ellipse whose radius has random low harmonics
  (`wobble`, smooth lobulation) and, when `spikes` > 0, narrow outward spicules."""
  u, v = _local(cv, cx, cy, angle)
  theta = np.arctan2(v / np.float32(b), u / np.float32(a))
  scale = np.ones_like(theta)
  for k in (2, 3, 4, 5):
    amplitude = np.float32(wobble * rng.uniform(0.3, 1.0) / k * 2)
    scale += amplitude * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
  if spikes > 0:
    for k in rng.integers(7, 15, size=2):
      spike = np.maximum(np.cos(k * theta + rng.uniform(0, 2 * np.pi)), 0) ** 12
      scale += np.float32(spikes * rng.uniform(0.6, 1.0)) * spike
  return np.sqrt((u / np.float32(a)) ** 2 + (v / np.float32(b)) ** 2) / scale


def ellipse_normal(cv: Canvas, cx, cy, a, b, angle=0.0) -> tuple[np.ndarray, np.ndarray]:
  """(x, y) components of the gradient of an ellipse's rho (the outward normal direction, unnormalised)."""
  u, v = _local(cv, cx, cy, angle)
  gu, gv = u / np.float32(a * a), v / np.float32(b * b)
  c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
  return c * gu - s * gv, s * gu + c * gv


def specular_db(cv: Canvas, nx: np.ndarray, ny: np.ndarray, floor_db: float = SPECULAR_FLOOR_DB) -> np.ndarray:
  """Gain (dB) of a specular surface with normal (nx, ny): amplitude cos^2 of the beam-to-normal angle.

  A smooth interface (skull, bone cortex, a vessel wall) sends the echo back only when the beam meets
  it near normal incidence; seen edge-on (a skull's side walls) it is dark, down to `floor_db`, what
  its roughness still scatters. The beam direction comes from the probe (vertical for a linear array,
  radial from the apex for a sector)."""
  norm = np.maximum(np.hypot(nx, ny), 1e-9)
  cos = np.abs(nx * cv.beam_dir[0] + ny * cv.beam_dir[1]) / norm
  return np.maximum(40.0 * np.log10(np.maximum(cos, 1e-6)), floor_db).astype(np.float32)


def segment_distance(cv: Canvas, p0, p1, window=None) -> np.ndarray:
  """Distance in pixels from every pixel to the segment p0-p1; with `window` (`cv.window` slices) only over
  that part of the canvas (a thin structure's distance is needed only near it)."""
  p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
  xx, yy = (cv.xx, cv.yy) if window is None else (cv.xx[window], cv.yy[window])
  d = p1 - p0
  t = ((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / max(float(d @ d), 1e-6)
  t = np.clip(t, 0, 1)
  return np.hypot(xx - (p0[0] + t * d[0]), yy - (p0[1] + t * d[1]))


def smooth_noise(cv: Canvas, rng, cells: int = 8) -> np.ndarray:
  """Unit-variance random field varying over about size/cells pixels (tissue heterogeneity):
  a coarse white grid blown up by a separable Gaussian interpolation. One field per scale and scene
  (drawn on first use, then shared, read-only): structures textured at the same scale lie in different
  regions, and each field costs a pair of matrix products."""
  cache = cv.__dict__.setdefault("_noise", {})
  if int(cells) not in cache:
    field = _smooth_noise(cv, rng, int(cells))
    field.setflags(write=False)
    cache[int(cells)] = field
  return cache[int(cells)]


def _smooth_noise(cv: Canvas, rng, cells: int) -> np.ndarray:
  up = _upsampler(cv.size, int(cells))
  coarse = rng.standard_normal((up.shape[1], up.shape[1])).astype(np.float32)
  # einsum's own loop, not BLAS: a threaded BLAS stalls on such small products when cores are busy
  fine = np.einsum("ik,kj->ij", up, np.einsum("kl,jl->kj", coarse, up))
  return (fine - fine.mean()) / (fine.std() + 1e-6)


@functools.lru_cache(maxsize=32)
def _upsampler(size: int, cells: int) -> np.ndarray:
  """[size, cells + 2] matrix: row i holds Gaussian weights of the coarse knots around pixel i."""
  knots = (np.arange(cells + 2) - 0.5) * (size / cells)
  x = np.arange(size) + 0.5
  w = np.exp(-0.5 * ((x[:, None] - knots[None, :]) / (0.6 * size / cells)) ** 2)
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def polar_dir(angle_deg: float) -> np.ndarray:
  """Unit (x, y) image vector for a direction given clockwise from 'up' (12 o'clock) in degrees."""
  a = math.radians(angle_deg)
  return np.array([math.sin(a), -math.cos(a)], np.float32)


def background(cv: Canvas, rng, layers: bool = True, texture_db: float = 2.0):
  """Soft-tissue backscatter map with mild heterogeneity; `layers` adds the superficial skin,
  fat and fascia bands of a linear-probe image (and sets `cv.density`: fat has few scatterers per
  resolution cell, so its speckle is pre-Rayleigh, not just darker). Returns (echo_db, atten) maps."""
  echo = texture_db * smooth_noise(cv, rng, int(rng.integers(5, 12)))
  atten = np.full_like(echo, cv.probe.nominal_atten)
  if layers:
    rows = cv.yy / cv.size
    wave = 0.015 * np.sin(cv.xx / cv.size * rng.uniform(2, 6) + rng.uniform(0, 6.3))
    skin = rng.uniform(0.015, 0.03)
    fat = skin + rng.uniform(0.05, 0.14) + wave
    echo = np.where(rows < skin, echo + 8.0, echo)
    echo = np.where((rows >= skin) & (rows < fat), echo + FAT_DB, echo)
    echo = np.where(np.abs(rows - fat) < 0.006, echo + WALL_DB, echo)  # fascia
    cv.density = np.where((rows >= skin) & (rows < fat), FAT_DENSITY, 1.0).astype(np.float32)  # sparse fat
  else:
    cv.density = None
  return echo.astype(np.float32), atten.astype(np.float32)


def paint(echo, atten, region, db, att=None, add=False):
  """Sets (or with `add`, raises) the backscatter inside a boolean region, and its attenuation."""
  if add:
    echo[region] += db
  else:
    echo[region] = db if np.isscalar(db) else db[region]
  if att is not None:
    atten[region] = att
