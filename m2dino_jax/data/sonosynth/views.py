"""Composite views shared by several sonosynth tasks (a breast scan, a lung scan, a fetal thorax,
the transperineal symphysis-and-head view, ...), built from `anatomy` parts, and small helpers.
Each returns the scene maps (or draws into them) and the regions / landmarks its tasks label.
"""

from __future__ import annotations

import math

import numpy as np

from m2dino_jax.data.sonosynth import anatomy as A
from m2dino_jax.data.sonosynth import obstetric as O
from m2dino_jax.data.sonosynth.shapes import (
  FLUID_DB,
  Canvas,
  background,
  ellipse,
  smooth_noise,
)


def box_of(mask) -> np.ndarray:
  ys, xs = np.nonzero(mask)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def centre(cv: Canvas, rng, x=0.5, y=0.45, jitter=0.08):
  return (cv.px(x + rng.uniform(-jitter, jitter)), cv.px(y + rng.uniform(-jitter, jitter)))


def symphysis_and_head(cv, rng):
  """Transperineal view: pubic symphysis (upper left) and the fetal head (lower right)."""
  echo, atten = background(cv, rng, layers=False)
  ps_c = np.array(centre(cv, rng, x=0.33, y=0.28, jitter=0.04), np.float32)
  half = cv.px(rng.uniform(0.08, 0.11))
  ang = rng.uniform(0.3, 0.8)
  u = np.array([math.cos(ang), math.sin(ang)], np.float32)
  upper, lower = ps_c - half * u, ps_c + half * u
  ps = ellipse(cv, *ps_c, half, cv.px(0.03), ang) < 1  # the landmarks are its two ends
  echo[ps] = 8.0 + 2.0 * smooth_noise(cv, rng, 24)[ps]
  atten[ps] = 2.0
  hc = (lower[0] + cv.px(rng.uniform(0.15, 0.22)), lower[1] + cv.px(rng.uniform(0.18, 0.26)))
  a, b = cv.px(rng.uniform(0.17, 0.22)), cv.px(rng.uniform(0.14, 0.17))
  h_ang = rng.uniform(-0.5, 0.5)
  head = O.skull(cv, rng, echo, atten, hc, a, b, h_ang)
  head &= ~ps
  # tangent from the symphysis' lower end to the skull: the boundary point seen at the widest angle
  t = np.linspace(0, 2 * math.pi, 720, endpoint=False)
  c, s = math.cos(h_ang), math.sin(h_ang)
  bx = hc[0] + a * np.cos(t) * c - b * np.sin(t) * s
  by = hc[1] + a * np.cos(t) * s + b * np.sin(t) * c
  vec = np.stack([bx - lower[0], by - lower[1]], 1)
  cosang = vec @ u / np.linalg.norm(vec, axis=1)
  tangent = np.array([bx[np.argmin(cosang)], by[np.argmin(cosang)]], np.float32)
  return echo, atten, ps, head, np.stack([upper, lower, tangent])


def breast(cv, rng, kind):
  """kind: 0 normal, 1 benign, 2 malignant."""
  echo, atten = background(cv, rng)
  A.breast_tissue(cv, rng, echo)
  mask = None
  if kind:
    mask = A.breast_mass(cv, rng, echo, atten, kind == 2, centre(cv, rng, y=0.45, jitter=0.12),
                         cv.px(rng.uniform(0.08, 0.15)))
  else:
    for _ in range(rng.integers(0, 3)):  # a few ducts / tiny cysts
      c = centre(cv, rng, y=0.45, jitter=0.25)
      duct = ellipse(cv, *c, cv.px(rng.uniform(0.02, 0.05)), cv.px(0.012), rng.uniform(-0.3, 0.3)) < 1
      echo[duct] = FLUID_DB
  return echo, atten, mask


def lung(cv, rng, kind):
  """kind: 0 A-lines, 1 B-lines, 2 consolidation. Returns echo, atten, the consolidation region or None, the
  pleural mirror map and the ring-down map: A-lines and B-lines come from them in the physics, not drawn."""
  echo, atten = background(cv, rng)
  pleura, ribs = A.lung_surface(cv, rng, echo, atten)
  region, ringdown = None, None
  mirror = A.pleural_mirror(cv, pleura, ribs, -60.0)
  # The signs overlap as in practice: a normal lung may show a faint isolated B-line, A-lines can
  # persist faintly between B-lines, and B-lines often flank a consolidation.
  if kind == 0:
    mirror = A.pleural_mirror(cv, pleura, ribs, rng.uniform(-16.0, -7.0))
    if rng.random() < 0.35:
      ringdown = A.b_lines(cv, rng, pleura, ribs, 1, fade_db_per_cm=(6.0, 12.0), mirror=mirror)
  elif kind == 1:
    if rng.random() < 0.3:
      mirror = A.pleural_mirror(cv, pleura, ribs, rng.uniform(-20.0, -14.0))
    ringdown = A.b_lines(cv, rng, pleura, ribs, int(rng.integers(2, 6)), fade_db_per_cm=(0.0, 4.0), mirror=mirror)
  else:
    if rng.random() < 0.3:
      ringdown = A.b_lines(cv, rng, pleura, ribs, int(rng.integers(1, 3)), fade_db_per_cm=(2.0, 8.0), mirror=mirror)
    region = A.consolidation(cv, rng, echo, atten, pleura, ribs, mirror=mirror)
    if ringdown is not None:  # no ring-down from inside the consolidation: its pleura has no air
      ringdown[:, region.any(axis=0)] = 0.0
  return echo, atten, region, mirror, ringdown


def cervix(cv, rng):
  """Transvaginal cervix. Returns echo, atten, the cervix, its anterior and posterior lips, internal and
  external os."""
  echo, atten = background(cv, rng, layers=False)
  return (echo, atten) + A.cervix(cv, rng, echo, atten, centre(cv, rng, y=0.42, jitter=0.05),
                                  cv.px(rng.uniform(0.2, 0.28)), cv.px(rng.uniform(0.08, 0.11)),
                                  rng.uniform(-0.4, 0.4))


def thyroid_with_nodule(cv, rng):
  echo, atten = background(cv, rng)
  lobe, (lx, ly), (a, b) = A.thyroid(cv, rng, echo, atten)
  r = min(a, b) * rng.uniform(0.3, 0.7)
  c = (lx + rng.uniform(-0.4, 0.4) * (a - r), ly + rng.uniform(-0.3, 0.3) * (b - r))
  return echo, atten, A.nodule(cv, rng, echo, atten, c, r)
