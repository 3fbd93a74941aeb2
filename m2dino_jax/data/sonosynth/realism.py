"""The realism checks of issue 18, as measurements (the tests assert them against their targets; `m2dino bench
sonosynth --stats` prints them all, so the numbers in the issue's table can be reproduced).

Each function simulates what it needs with fixed seeds and returns plain numbers:
- `speckle`: displayed envelope mean / std (Rayleigh: 1.913) and log-envelope std (5.57 dB) of homogeneous tissue;
- `flatness`: per-pixel std of the display log-envelope over many realisations (5th / 95th percentile re its
  median, the fixed-pattern part from split halves, the largest local spectral peak);
- `grain_mm`: intensity-grain FWHM in mm (lateral, axial) in a depth band of a sector;
- `tissue_m`: Nakagami m of fat / muscle / parenchyma / fluid in one scene, and its theory;
- `skull_wall_ratio_db`: a fetal skull ring's near/far walls over its side walls;
- `capsule_ratio_db`: the same for a kidney capsule (soft-tissue interfaces are partly specular);
- `cyst_db`: an anechoic cyst re the tissue level with it;
- `a_lines`: where a specular plate's reverberations peak, in multiples of its depth.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from m2dino_jax.data.sonosynth import obstetric, physics, scenes
from m2dino_jax.data.sonosynth.shapes import (
  FAT_DB,
  FAT_DENSITY,
  FLUID_DB,
  MUSCLE_DB,
  MUSCLE_DENSITY,
  Canvas,
)

PROBES = {"linear": scenes.LINEAR, "convex": scenes.CONVEX, "phased": scenes.PHASED}


def quiet(name: str, clutter: bool = False) -> physics.Probe:
  """A preset probe without electronic noise (and without clutter unless asked): speckle alone."""
  return dataclasses.replace(PROBES[name], noise_db=None, clutter_db=PROBES[name].clutter_db if clutter else None)


def display(probe: physics.Probe, size: int, seed: int, echo=None, **kw) -> np.ndarray:
  """Displayed envelope of homogeneous 0 dB tissue (or of `echo`) at size x size."""
  echo = np.zeros((size, size), np.float32) if echo is None else echo
  return physics.display_envelope(echo, probe, np.random.default_rng(seed), **kw)


def _inner(probe, size):
  inner = ndimage.binary_erosion(physics.geometry(probe, size, size).fov, iterations=6)
  inner[:size // 10] = False
  return inner


def speckle(probe: physics.Probe, size: int, seeds: int = 4) -> dict:
  """Envelope mean / std and log-envelope std (dB) of homogeneous tissue as displayed, inside the field."""
  inner = _inner(probe, size)
  env = np.concatenate([display(probe, size, s)[inner].astype(np.float64) for s in range(seeds)])
  db = 20 * np.log10(np.maximum(env, 1e-12))
  return {"mean_over_std": float(env.mean() / env.std()), "log_std_db": float(db.std())}


def flatness(probe: physics.Probe, size: int = 128, n: int = 2000) -> dict:
  """Per-pixel std of the display log-envelope over `n` realisations of homogeneous tissue.

  lo / hi: its 5th / 95th percentile minus its median (dB); fixed: the std (dB) of the part two independent
  halves share (covariance of their std maps: the learnable pattern; the rest is the estimate's noise);
  peak: the largest ratio of a spectral bin (lateral or axial, central block) to the median of its 8 neighbours."""
  acc = np.zeros((4, size, size))
  for s in range(n):
    db = 20 * np.log10(np.maximum(display(probe, size, s), 1e-9))
    acc[2 * (s % 2)] += db
    acc[2 * (s % 2) + 1] += db * db
  half = [np.sqrt(acc[2 * h + 1] / (n // 2) - (acc[2 * h] / (n // 2)) ** 2) for h in (0, 1)]
  std = np.sqrt((acc[1] + acc[3]) / n - ((acc[0] + acc[2]) / n) ** 2)
  inner = _inner(probe, size)
  med = float(np.median(std[inner]))
  lo, hi = (float(v) for v in np.percentile(std[inner], [5, 95]) - med)
  a, b = half[0][inner], half[1][inner]
  fixed = math.sqrt(max(float(np.mean((a - a.mean()) * (b - b.mean()))), 0.0))
  block = std[size // 2:size - 8, size // 4:3 * size // 4]  # inside the fan
  peaks = []
  for axis in (1, 0):  # lateral, axial
    spec = (np.abs(np.fft.rfft(block - block.mean(axis=axis, keepdims=True), axis=axis)) ** 2).mean(axis=1 - axis)
    peaks.append(max(spec[k] / np.median(np.r_[spec[k - 4:k], spec[k + 1:k + 5]]) for k in range(6, len(spec) - 4)))
  return {"median_db": med, "lo_db": lo, "hi_db": hi, "fixed_db": fixed, "peak_lateral": float(peaks[0]),
          "peak_axial": float(peaks[1])}


def fwhm(x: np.ndarray) -> float:
  """FWHM (samples) of the autocovariance along axis 1, averaged over rows (linear interpolation)."""
  x = x - x.mean(axis=1, keepdims=True)
  n = x.shape[1]
  ac = np.fft.irfft(np.abs(np.fft.rfft(x, n=2 * n, axis=1)) ** 2, axis=1)[:, :n].mean(axis=0)
  ac /= ac[0]
  k = int(np.argmax(ac < 0.5))
  return 2 * (k - 1 + (ac[k - 1] - 0.5) / (ac[k - 1] - ac[k]))


def grain_mm(probe: physics.Probe, size: int, rows, seeds: int = 3) -> tuple[float, float]:
  """(lateral, axial) intensity-grain FWHM in mm in a band of depths (`rows`: fractions of the depth), central
  columns (40-60% of the width), averaged over `seeds` realisations."""
  s = physics.geometry(probe, size, size).spacing_mm[0]
  top = probe.apex_mm * math.cos(math.radians(probe.angle_deg / 2))
  r0, r1 = (int((probe.apex_mm + f * probe.depth_mm - top) / s) for f in rows)
  c0, c1 = int(0.4 * size), int(0.6 * size)
  lat, ax = [], []
  for seed in range(seeds):
    i = display(probe, size, 100 + seed).astype(np.float64) ** 2
    lat.append(fwhm(i[r0:r1, c0:c1]))
    ax.append(fwhm(i[r0:r1, c0:c1].T))
  return float(np.mean(lat) * s), float(np.mean(ax) * s)


TISSUES = ("fat", "muscle", "parenchyma", "fluid")


def tissue_m(seeds: int = 4, size: int = 256) -> tuple[dict, dict]:
  """Nakagami m = E[I]^2 / var(I) of the envelope in four depth bands painted by the scene code (obstetric
  `_layers`, a linear probe with the scanners' clutter): fat, muscle, parenchyma, fluid. Returns (measured,
  theory): theory is `physics.nakagami_m` of the band's scatterer density (fluid: its clutter is dense)."""
  probe = quiet("linear", clutter=True)
  cv = Canvas(size, probe)
  echo = np.zeros((size, size), np.float32)
  atten = np.full((size, size), probe.nominal_atten, np.float32)
  idx = obstetric._layers(cv, None, echo, atten, cv.depth_mm, [10.0, 19.0, 29.0, 40.0],
                          [FAT_DB, MUSCLE_DB, 0.0, 0.0, 0.0], ["fat", "muscle", "add", "fluid", "add"])
  sigma_z, sigma_x = physics.psf_sigmas_px(probe, size, size)
  settings = (FAT_DENSITY, MUSCLE_DENSITY, 1.0, 1.0)
  cols = (np.arange(size) >= 16) & (np.arange(size) < size - 16)
  regions = [ndimage.binary_erosion(idx == k, iterations=6) & cols[None, :] for k in range(len(TISSUES))]
  measured = {n: [] for n in TISSUES}
  for seed in range(seeds):
    env = physics.envelope(echo, probe, np.random.default_rng(seed), atten, density=cv.density)
    for n, r in zip(TISSUES, regions):
      i = env[r].astype(np.float64) ** 2
      measured[n].append(i.mean() ** 2 / i.var())
  theory = {n: physics.nakagami_m(d, sigma_z, float(sigma_x[np.nonzero(r.any(axis=1))[0]].mean()))
            for n, d, r in zip(TISSUES, settings, regions)}
  return {n: float(np.mean(v)) for n, v in measured.items()}, theory


def skull_wall_ratio_db(index: int, size: int = 256) -> float:
  """Mean echo power of a fetal skull ring where the beam meets it square on (|cos| > 0.9) over where it runs
  along it (|cos| < 0.3), in dB, for fetal-head scene `index`."""
  rng = np.random.default_rng([7, index])
  cv = Canvas(size, scenes.CONVEX)
  scene = scenes.fetal_head(cv, rng, -1)
  ring = (scene.echo > 0) & (scene.mask > 0) & ndimage.binary_dilation(scene.mask == 0, iterations=4)
  ys, xs = np.nonzero(ring)
  d = np.stack([xs - xs.mean(), ys - ys.mean()])
  d /= np.linalg.norm(d, axis=0)
  cos = np.abs((d * cv.beam_dir[:, ys, xs]).sum(axis=0))  # ~ the normal's cosine with the beam
  env = physics.display_envelope(scene.echo, quiet("convex"), rng, scene.atten) ** 2
  return float(10 * np.log10(env[ys[cos > 0.9], xs[cos > 0.9]].mean() / env[ys[cos < 0.3], xs[cos < 0.3]].mean()))


def cyst_db(size: int = 256, seed: int = 1) -> float:
  """An anechoic cyst (30 px radius, convex probe with the scanners' clutter) re the tissue level with it, dB."""
  probe = dataclasses.replace(scenes.CONVEX, noise_db=None)
  yy, xx = np.mgrid[:size, :size]
  r = np.hypot(yy - 140, xx - 128)
  echo = np.where(r < 30, FLUID_DB, 0.0).astype(np.float32)
  atten = np.where(r < 30, 0.05, probe.nominal_atten).astype(np.float32)
  env = physics.display_envelope(echo, probe, np.random.default_rng(seed), atten)
  inside = np.mean(env[r < 22] ** 2)
  beside = np.mean(env[(r > 40) & (r < 60) & (yy < 150)] ** 2)  # level with the cyst, not its enhancement
  return float(10 * np.log10(inside / beside))


def a_lines(size: int = 256, depth: int = 60, ratio_db: float = -8.0, seed: int = 2) -> dict:
  """A bright specular plate at row `depth` (linear probe, reverberation ratio `ratio_db` per bounce; no A-line
  drawn): per k in (2, 3) the row of the k-th echo's peak over (depth + 0.5) and minus k * (depth + 0.5) (px),
  and how far it stands above
  the same scene without the mirror (dB); `fade_db`: 2nd minus 3rd echo (expected -ratio_db)."""
  probe = quiet("linear")
  echo = np.full((size, size), -18.0, np.float32)
  echo[depth - 1:depth + 2, 40:216] = 16.0
  mirror = np.zeros_like(echo)
  mirror[depth - 1:depth + 2, 40:216] = 10 ** (ratio_db / 10)
  rows = []
  for m in (mirror, None):
    env = physics.envelope(echo, probe, np.random.default_rng(seed), mirror=m)
    rows.append(10 * np.log10(np.mean(env[:, 60:196] ** 2, axis=1)))
  with_m, without = rows
  out = {}
  for k in (2, 3):
    peak = int(np.argmax(with_m[k * depth - 8:k * depth + 8])) + k * depth - 8
    out[f"echo{k}_at"] = peak / (depth + 0.5)  # in multiples of the plate's depth
    out[f"echo{k}_offset_px"] = peak - k * (depth + 0.5)
    out[f"echo{k}_above_db"] = float(with_m[peak] - without[peak])
  out["fade_db"] = float(with_m[2 * depth] - with_m[3 * depth])
  return out


def capsule_ratio_db(index: int, size: int = 256) -> float:
  """A kidney capsule (organ_cls scene `index`, label kidney) where the beam meets it square on (|cos| > 0.9)
  over where it runs along it (|cos| < 0.3), displayed power in dB (the capsule: a 2 px ring outside the
  kidney, whose cortex the scene paints at exactly -6 dB; normals from the smoothed outline)."""
  rng = np.random.default_rng([11, index])
  cv = Canvas(size, scenes.CONVEX)
  scene = scenes.organ_cls(cv, rng, 1)
  kidney = ndimage.binary_fill_holes(scene.echo == np.float32(-6.0))
  kidney = ndimage.binary_opening(kidney, iterations=2)
  ring = ndimage.binary_dilation(kidney, iterations=2) & ~kidney & cv.fov
  smooth = ndimage.gaussian_filter(kidney.astype(np.float32), 3.0)
  ny, nx = np.gradient(smooth)
  ys, xs = np.nonzero(ring)
  norm = np.maximum(np.hypot(nx[ys, xs], ny[ys, xs]), 1e-9)
  cos = np.abs(nx[ys, xs] * cv.beam_dir[0, ys, xs] + ny[ys, xs] * cv.beam_dir[1, ys, xs]) / norm
  env = np.mean([physics.display_envelope(scene.echo, quiet("convex"), np.random.default_rng(s), scene.atten) ** 2
                 for s in range(4)], axis=0)
  return float(10 * np.log10(env[ys[cos > 0.9], xs[cos > 0.9]].mean() / env[ys[cos < 0.3], xs[cos < 0.3]].mean()))
