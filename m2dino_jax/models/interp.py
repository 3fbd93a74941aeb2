"""Bicubic resizing of 2D grids, matching PyTorch's `interpolate(mode='bicubic', align_corners=False)`.

DINOv2 checkpoints carry a learned position-embedding grid that is resized to the patch grid of
each input. PyTorch's plain bicubic (Keys kernel, a = -0.75, clamped borders) and its antialiased
variant (PIL-style, a = -0.5, support widened when downsampling, weights normalised) differ from
`jax.image.resize`, so we build the exact interpolation matrices and apply them separably.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def _keys(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int, *, antialias: bool = False) -> np.ndarray:
  """[n_out, n_in] float64 matrix M with out = M @ in (one axis)."""
  scale = n_in / n_out
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    if antialias:
      support = 2.0 * scale if scale >= 1 else 2.0
      inv = 1.0 / scale if scale >= 1 else 1.0
      center = scale * (i + 0.5)
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), n_in)
      taps = np.arange(lo, hi)
      w = _keys((taps - center + 0.5) * inv, -0.5)
      m[i, taps] += w / w.sum()
    else:
      real = scale * (i + 0.5) - 0.5
      base = math.floor(real)
      t = real - base
      w = _keys(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
      for k, wk in enumerate(w):
        m[i, min(max(base - 1 + k, 0), n_in - 1)] += wk
  return m


def resize_grid(grid: jnp.ndarray, out_hw: tuple[int, int], *, antialias: bool = False) -> jnp.ndarray:
  """Resizes [H, W, C] to [h, w, C] bicubically (float32 math, as PyTorch does)."""
  h_in, w_in = grid.shape[:2]
  if (h_in, w_in) == tuple(out_hw):
    return grid
  my = jnp.asarray(bicubic_matrix(h_in, out_hw[0], antialias=antialias), jnp.float32)
  mx = jnp.asarray(bicubic_matrix(w_in, out_hw[1], antialias=antialias), jnp.float32)
  g = grid.astype(jnp.float32)
  return jnp.einsum("yh,hwc,xw->yxc", my, g, mx).astype(grid.dtype)
