"""Beam grid <-> display grid: where the simulator samples echoes and how they reach the pixels.

Conventions. The display grid is h x w square pixels (x = column, y = row, pixel (i, j) covers
[j, j + 1) x [i, i + 1), so its centre is at (j + 0.5, i + 0.5)). The beam grid is depth x scan line.

- Linear probe: the beam grid IS the display grid (one line per column, one sample per row); the PSF
  already holds the display's anti-alias filter, so there is nothing to resample and no moire.
- Sector probe (phased array or convex): the beam grid samples depth every half display pixel and has
  enough lines that the line spacing at the deepest row is at most half a display pixel, so it is at
  least 2x finer than the display everywhere. Scan conversion averages the envelope over each pixel's
  area (2 x 2 bilinear sub-samples, one sparse matrix per geometry), as a scanner's decimation does.
  Sampling the envelope at one point per pixel on a grid as coarse as the display (the old scheme)
  made the per-pixel variance depend on where the pixel fell between beam samples: a fixed pattern
  of arcs and rays that a network could learn.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import scipy.sparse

OVERSAMPLE = 2  # sector beam grid: samples per display pixel (depth) and lines per pixel (deepest row)
_SUB = (0.25, 0.75)  # sub-pixel sample offsets of the area average (2 x 2 per pixel)


class Bilinear:
  """Bilinear resampling at fixed fractional (row, col) coordinates, edges clamped: the same as
  `ndimage.map_coordinates(src, coords, order=1, mode='nearest')`, with the indices and weights
  computed once so each call is four gathers."""

  def __init__(self, coords: np.ndarray, src_shape: tuple[int, int]):
    self.index, self.weight, self.shape = _bilinear_terms(coords, src_shape)
    # per output row, the smallest source row it reads (to resample only the rows a shallow map reaches)
    self.min_src_row = np.minimum.accumulate(
        np.floor(np.clip(coords[0], 0, src_shape[0] - 1)).reshape(self.shape[0], -1).min(axis=1)[::-1])[::-1]

  def __call__(self, src: np.ndarray, rows: int | None = None) -> np.ndarray:
    """Resampled map [out rows, out cols]; with `rows`, only the first `rows` output rows."""
    flat = np.asarray(src, np.float32).ravel()
    n = self.index.shape[1] if rows is None else rows * self.shape[1]
    out = flat[self.index[0, :n]] * self.weight[0, :n]
    for k in (1, 2, 3):
      out += flat[self.index[k, :n]] * self.weight[k, :n]
    return out.reshape(-1, self.shape[1])


def _bilinear_terms(coords, src_shape):
  h, w = src_shape
  r = np.clip(coords[0].astype(np.float64), 0, h - 1)
  c = np.clip(coords[1].astype(np.float64), 0, w - 1)
  r0 = np.minimum(np.floor(r).astype(np.int64), h - 2)
  c0 = np.minimum(np.floor(c).astype(np.int64), w - 2)
  fr, fc = (r - r0).astype(np.float32), (c - c0).astype(np.float32)
  base = (r0 * w + c0).ravel()
  index = np.stack([base, base + 1, base + w, base + w + 1]).astype(np.intp)
  weight = np.stack([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc]).reshape(4, -1)
  return index, weight, coords.shape[1:]


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Beam grid <-> image grid mapping for one probe and image size (cached)."""
  spacing_mm: tuple[float, float]  # (x, y) image pixel size
  shape: tuple[int, int]  # beam grid (depth samples, scan lines)
  depth_step_mm: float  # beam-grid sample spacing along depth
  line_step_mm: np.ndarray  # [nz] lateral spacing of beam-grid lines at each depth
  depth_mm: np.ndarray  # [nz] depth of each beam-grid row below the skin
  to_beam: Bilinear | None  # samples image-grid maps at the beam samples (sector only)
  to_image: scipy.sparse.csr_matrix | None  # area-averages beam-grid data onto the pixels (sector only)
  fov: np.ndarray  # [H, W] bool: image pixels inside the imaged field
  beam_dir: np.ndarray  # [2, H, W] unit (x, y) direction the beam travels through each pixel
  pixel_depth_mm: np.ndarray  # [H, W] depth of each pixel centre below the skin, along its beam


def geometry(kind: str, depth_mm: float, width_mm: float, angle_deg: float, apex_mm: float,
             h: int, w: int) -> Geometry:
  return _geometry(kind, float(depth_mm), float(width_mm), float(angle_deg), float(apex_mm), int(h), int(w))


@functools.lru_cache(maxsize=64)
def _geometry(kind, depth_mm, width_mm, angle_deg, apex_mm, h, w) -> Geometry:
  if kind == "linear":
    dz, dx = depth_mm / h, width_mm / w
    depth = (np.arange(h) + 0.5) * dz
    down = np.zeros((2, h, w), np.float32)
    down[1] = 1.0
    pixel_depth = np.broadcast_to(depth.astype(np.float32)[:, None], (h, w))
    return Geometry((dx, dz), (h, w), dz, np.full(h, dx), depth, None, None, np.ones((h, w), bool), down,
                    pixel_depth)
  half = math.radians(angle_deg) / 2
  r_max = apex_mm + depth_mm
  top = apex_mm * math.cos(half)  # shallowest point of the fan, from the apex
  s = max(2 * r_max * math.sin(half) / w, (r_max - top) / h)  # square pixels, the fan fits the box
  nz = int(math.ceil(OVERSAMPLE * depth_mm / s))
  nl = int(math.ceil(OVERSAMPLE * r_max * 2 * half / s))
  dz, dtheta = depth_mm / nz, 2 * half / nl
  depth = (np.arange(nz) + 0.5) * dz
  radius = apex_mm + depth
  theta = -half + (np.arange(nl) + 0.5) * dtheta

  def image_to_beam(yy, xx):  # image (row, col) pixel coordinates -> beam (row, line) coordinates
    y = top + yy * s
    x = (xx - w / 2) * s
    return np.stack([(np.hypot(x, y) - apex_mm) / dz - 0.5, (np.arctan2(x, y) + half) / dtheta - 0.5])

  # beam sample -> image pixel coordinates (for sampling the scene maps)
  x = radius[:, None] * np.sin(theta)[None, :]
  y = radius[:, None] * np.cos(theta)[None, :]
  beam_coords = np.stack([(y - top) / s - 0.5, x / s + w / 2 - 0.5]).astype(np.float32)
  # display pixel -> 2 x 2 sub-samples on the beam grid, averaged: one sparse matrix
  yy, xx = np.mgrid[:h, :w].astype(np.float64)
  rows, cols, vals = [], [], []
  pixel = np.arange(h * w)
  for oy in _SUB:
    for ox in _SUB:
      index, weight, _ = _bilinear_terms(image_to_beam(yy + oy, xx + ox), (nz, nl))
      for k in range(4):
        rows.append(pixel)
        cols.append(index[k])
        vals.append(weight[k] / len(_SUB) ** 2)
  yc, xc = top + (yy + 0.5) * s, (xx + 0.5 - w / 2) * s
  r, th = np.hypot(xc, yc), np.arctan2(xc, yc)
  fov = (r >= apex_mm) & (r <= r_max) & (np.abs(th) <= half)
  keep = np.tile(fov.ravel(), len(rows))
  to_image = scipy.sparse.csr_matrix(
      (np.concatenate(vals)[keep], (np.concatenate(rows)[keep], np.concatenate(cols)[keep])),
      shape=(h * w, nz * nl), dtype=np.float32)
  beam_dir = np.stack([np.sin(th), np.cos(th)]).astype(np.float32)
  return Geometry((s, s), (nz, nl), dz, radius * dtheta, depth, Bilinear(beam_coords, (h, w)), to_image, fov,
                  beam_dir, (r - apex_mm).astype(np.float32))


def to_image(beam_img: np.ndarray, geo: Geometry, h: int, w: int) -> np.ndarray:
  """Beam grid -> display grid (identity for a linear probe; area average for a sector); outside the fan 0."""
  if geo.to_image is None:
    return beam_img
  return (geo.to_image @ np.asarray(beam_img, np.float32).ravel()).reshape(h, w)
