"""Reusable anatomy for sonosynth scenes: each function draws one structure into the backscatter
(`echo`, dB) and attenuation (`atten`, dB/cm/MHz) maps in place and returns its region(s) or
landmarks. Sizes are fractions of the image size; every shape is randomised by `rng`.
"""

from __future__ import annotations

import math

import numpy as np

from m2dino_jax.data.sonosynth import physics
from m2dino_jax.data.sonosynth.shapes import (
  BLOOD_ATTEN,
  BLOOD_DB,
  BONE_ATTEN,
  BONE_DB,
  FLUID_ATTEN,
  FLUID_DB,
  MUSCLE_DB,
  WALL_DB,
  Canvas,
  blob,
  ellipse,
  ellipse_at,
  segment_distance,
  smooth_noise,
)


def breast_mass(cv: Canvas, rng, echo, atten, malignant: bool, centre, radius):
  """Benign: oval, wider than tall, circumscribed, thin echogenic capsule, usually posterior
  enhancement. Malignant: irregular or spiculated, often taller than wide, echogenic halo, usually
  a posterior shadow. The cues overlap (as in BI-RADS practice), so no single one decides."""
  cx, cy = centre
  if malignant:
    rho = blob(cv, rng, cx, cy, radius * rng.uniform(0.75, 1.1), radius * rng.uniform(0.85, 1.3),
               rng.uniform(-0.4, 0.4), wobble=rng.uniform(0.08, 0.2), spikes=rng.uniform(0.1, 0.5))
    inside = rho < 1
    echo[(rho >= 1) & (rho < 1.3)] += rng.uniform(0.0, 5.0)
    echo[inside] = rng.uniform(-20.0, -12.0) + 3.0 * smooth_noise(cv, rng, 24)[inside]
    atten[inside] = rng.uniform(0.4, 2.2)
  else:
    rho = blob(cv, rng, cx, cy, radius * rng.uniform(1.1, 1.7), radius * rng.uniform(0.65, 0.95),
               rng.uniform(-0.3, 0.3), wobble=rng.uniform(0.02, 0.12))
    inside = rho < 1
    echo[(rho >= 1) & (rho < 1.07)] += rng.uniform(0.0, 6.0)
    echo[inside] = rng.uniform(-20.0, -10.0) + smooth_noise(cv, rng, 16)[inside]
    atten[inside] = rng.uniform(0.05, 0.9)
  return inside


def breast_tissue(cv: Canvas, rng, echo):
  """Glandular band and chest-wall muscle below the fat layer of a linear-probe breast image."""
  rows = cv.yy / cv.size
  gland_top, gland_bottom = rng.uniform(0.15, 0.25), rng.uniform(0.65, 0.8)
  echo[(rows > gland_top) & (rows < gland_bottom)] += 3.0
  muscle = rows > gland_bottom + 0.03
  echo[muscle] -= 4.0
  stripes = np.abs(np.sin((cv.yy - 0.2 * cv.xx) / cv.px(0.02))) > 0.97
  echo[muscle & stripes] += 6.0


def _axis_end(rho, c, u, limit, size):
  """Distance from c along u to where the region rho < 1 ends (the last inside sample)."""
  t = np.linspace(0.0, limit, 96, dtype=np.float32)
  x = np.clip(np.round(c[0] + t * u[0]).astype(int), 0, size - 1)
  y = np.clip(np.round(c[1] + t * u[1]).astype(int), 0, size - 1)
  inside = rho[y, x] < 1
  out = np.flatnonzero(~inside)
  return float(t[out[0] - 1] if out.size and out[0] > 0 else t[-1])


def cervix(cv: Canvas, rng, echo, atten, centre, length, thickness, angle):
  """Uterine cervix (transvaginal): echogenic stroma; along its axis the endocervical canal, a bright mucus
  line inside a hypoechoic glandular zone; hypoechoic surroundings (fornices, parametrium); amniotic fluid
  beyond the internal os with, often, the fetal skull behind it; the bladder in front.
  Returns (cervix, anterior lip, posterior lip, internal os, external os): the lips are the stroma either
  side of the glandular zone; the os points lie where the canal meets the ends of the cervix."""
  cx, cy = centre
  c = np.array([cx, cy], np.float32)
  rho = blob(cv, rng, cx, cy, length, thickness, angle, wobble=0.04)
  tissue = rho < 1
  echo[(rho >= 1) & (rho < 1.25)] -= 8.0  # hypoechoic surroundings outline the cervix
  echo[tissue] = 6.0 + 1.5 * smooth_noise(cv, rng, 16)[tissue]
  u = np.array([math.cos(angle), math.sin(angle)], np.float32)
  v = np.array([-u[1], u[0]], np.float32)  # points down-ish for |angle| < 90 deg
  sign = float(rng.choice([-1.0, 1.0]))  # which end is the internal os
  internal = c + sign * (_axis_end(rho, c, sign * u, 1.5 * length, cv.size) - 0.5) * u
  external = c - sign * (_axis_end(rho, c, -sign * u, 1.5 * length, cv.size) - 0.5) * u
  along = (cv.xx - cx) * u[0] + (cv.yy - cy) * u[1]
  side = (cv.xx - cx) * v[0] + (cv.yy - cy) * v[1]
  glands = tissue & (np.abs(side) < cv.px(rng.uniform(0.012, 0.02)))
  echo[glands] = -8.0 + smooth_noise(cv, rng, 24)[glands]
  canal = segment_distance(cv, internal, external) < cv.px(0.003) + 0.5
  echo[canal] = WALL_DB + 2.0
  fluid_c = internal + sign * 0.55 * length * u
  fluid = (ellipse(cv, fluid_c[0], fluid_c[1], 0.55 * length, 1.6 * thickness, angle) < 1) & ~tissue
  echo[fluid] = FLUID_DB
  atten[fluid] = FLUID_ATTEN
  if rng.random() < 0.6:  # the presenting fetal head beyond the fluid: the near side of its skull
    hc = internal + sign * rng.uniform(1.3, 1.6) * length * u
    hr = ellipse(cv, hc[0], hc[1], 0.8 * length, 0.8 * length)
    echo[(hr < 1) & (hr > 0.93) & ~tissue] = BONE_DB
    echo[(hr <= 0.93) & ~tissue] = -9.0
  if rng.random() < 0.5:  # the bladder in front of the lower uterine segment
    bc = c + sign * 0.6 * length * u - v * rng.uniform(2.4, 3.0) * thickness
    bw, br = ellipse_at(cv, bc[0], bc[1], 0.7 * length, 0.9 * thickness, angle)
    keep = (br < 1) & ~tissue[bw]
    echo[bw][keep] = FLUID_DB
    atten[bw][keep] = FLUID_ATTEN
  lips = tissue & ~glands & ~canal & (np.abs(along) < 2 * length)
  return tissue, lips & (side < 0), lips & (side >= 0), internal, external


def thyroid(cv: Canvas, rng, echo, atten):
  """Transverse neck: strap muscles, thyroid lobe, trachea ring (with shadow) and carotid artery.
  Returns (lobe region, lobe centre, lobe semi-axes)."""
  s = cv.size
  side = rng.choice([-1.0, 1.0])
  rows = cv.yy / s
  strap_bottom = rng.uniform(0.18, 0.26)
  echo[(rows > 0.1) & (rows < strap_bottom)] -= 5.0
  lobe_c = (s * (0.5 + side * rng.uniform(-0.05, 0.08)), s * rng.uniform(0.45, 0.55))
  a, b = s * rng.uniform(0.26, 0.34), s * rng.uniform(0.16, 0.21)
  lobe = blob(cv, rng, *lobe_c, a, b, rng.uniform(-0.2, 0.2), wobble=0.05) < 1
  echo[lobe] = 5.0 + 1.5 * smooth_noise(cv, rng, 20)[lobe]
  tr_c = (lobe_c[0] - side * (a + s * 0.12), lobe_c[1] - s * 0.05)
  rho = ellipse(cv, *tr_c, s * 0.12, s * 0.1)
  arc = (rho > 0.85) & (rho < 1) & (cv.yy < tr_c[1])
  echo[arc] = BONE_DB - 4
  atten[arc] = 6.0
  ca_c = (lobe_c[0] + side * (a + s * 0.06), lobe_c[1] + s * 0.02)
  rho = ellipse(cv, *ca_c, s * 0.07, s * 0.07)
  echo[rho < 1] = FLUID_DB
  atten[rho < 1] = FLUID_ATTEN
  echo[(rho >= 1) & (rho < 1.12)] += WALL_DB
  return lobe, lobe_c, (a, b)


def nodule(cv: Canvas, rng, echo, atten, centre, radius, lobe=None):
  """A thyroid nodule: hypoechoic solid, isoechoic with a dark halo, or mixed cystic; optional
  micro-calcifications. Returns its region."""
  rho = blob(cv, rng, centre[0], centre[1], radius * rng.uniform(0.9, 1.3), radius * rng.uniform(0.7, 1.0),
             rng.uniform(-0.5, 0.5), wobble=0.1)
  inside = rho < 1
  kind = rng.integers(3)
  if kind == 0:
    echo[inside] = -10.0 + 2.0 * smooth_noise(cv, rng, 24)[inside]
  elif kind == 1:
    echo[inside] = 2.0 + 2.0 * smooth_noise(cv, rng, 24)[inside]
    echo[(rho > 0.85) & inside] = -15.0
  else:
    cyst = inside & (smooth_noise(cv, rng, 20) > 0.2)
    echo[inside] = -4.0
    echo[cyst] = FLUID_DB
    atten[cyst] = FLUID_ATTEN
  if rng.random() < 0.3:
    for _ in range(rng.integers(1, 4)):
      p = np.asarray(centre) + rng.uniform(-0.5, 0.5, 2) * radius
      dot = ellipse(cv, p[0], p[1], 1.5, 1.5) < 1
      echo[dot] = BONE_DB
      atten[dot] = BONE_ATTEN
  return inside


def lung_surface(cv: Canvas, rng, echo, atten):
  """Chest wall with two rib shadows and the bright pleural line. Returns (pleura row, rib x centres)."""
  s = cv.size
  pleura = s * rng.uniform(0.22, 0.35)
  gap = s * rng.uniform(0.45, 0.6)
  x0 = s * 0.5 - gap / 2 + s * rng.uniform(-0.05, 0.05)
  ribs = (x0, x0 + gap)
  for x in ribs:
    rho = ellipse(cv, x, pleura - s * 0.03, s * 0.09, s * 0.045)
    surface = (rho < 1) & (rho > 0.75) & (cv.yy < pleura - s * 0.03)  # bright cortex, then shadow
    echo[surface] = BONE_DB
    atten[(rho < 0.75) | ((rho < 1) & (cv.yy >= pleura - s * 0.03))] = BONE_ATTEN * 3
  line = (np.abs(cv.yy - pleura) < 1.5) & (cv.xx > ribs[0] - s * 0.1) & (cv.xx < ribs[1] + s * 0.1)
  echo[line] = BONE_DB
  echo[cv.yy > pleura + 1.5] = -18.0  # aerated lung: no transmitted echoes, only artefacts
  return pleura, ribs


def pleural_mirror(cv: Canvas, pleura, ribs, ratio_db):
  """Per-bounce reverberation ratio map of the pleura between the ribs (air behind it: a near-perfect
  mirror). The physics turns it into A-lines at multiples of the pleural depth; `ratio_db` (probe
  face and pleura reflection losses per round trip) sets how many stay visible."""
  mirror = np.zeros((cv.size, cv.size), np.float32)
  line = (np.abs(cv.yy - pleura) < 1.5) & (cv.xx > ribs[0]) & (cv.xx < ribs[1])
  mirror[line] = 10.0 ** (ratio_db / 10.0)
  return mirror


def b_lines(cv: Canvas, rng, pleura, ribs, count, fade_db_per_cm=(0.0, 3.0), ringdown=None, mirror=None):
  """B-lines (interstitial syndrome): ring-down resonators at the pleura, fluid trapped among air bubbles;
  the physics turns each into a vertical line from the pleura to the bottom of the image (`physics.envelope`).
  The per-bounce ratio is set so the displayed line fades by `fade_db_per_cm` (drawn from the range): the
  TGC's gain rise, which the ring-down echo gets without the tissue loss, is what keeps it bright. A B-line
  erases the A-lines under it (the pleura is no longer a clean mirror there). Returns the ring-down map."""
  ringdown = np.zeros((cv.size, cv.size), np.float32) if ringdown is None else ringdown
  p = cv.probe
  tgc_db_per_bounce = 2 * p.f0_mhz * p.nominal_atten * p.tgc / 10.0 * physics.RINGDOWN_SPACING_MM
  margin = 0.1 * (ribs[1] - ribs[0])
  rows = np.abs(cv.yy[:, 0] - pleura) < 1.5
  for x in rng.uniform(ribs[0] + margin, ribs[1] - margin, count):
    w = cv.px(rng.uniform(0.008, 0.016))
    cols = np.abs(cv.xx[0] - x) < w
    fade = rng.uniform(*fade_db_per_cm) / 10.0 * physics.RINGDOWN_SPACING_MM
    ringdown[np.ix_(rows, cols)] = 10.0 ** (-(tgc_db_per_bounce + fade) / 10.0)
    if mirror is not None:
      mirror[:, np.abs(cv.xx[0] - x) < 2 * w] = 0.0
  return ringdown


def consolidation(cv: Canvas, rng, echo, atten, pleura, ribs, mirror=None):
  """Consolidated lung under the pleura: hypoechoic, tissue-like (fluid-filled alveoli), with bright air
  bronchograms and a bright, shredded deep border where it meets aerated lung; over it the pleura is no
  longer an air interface, so it is fainter and no mirror (no A-lines under it)."""
  s = cv.size
  cx = rng.uniform(ribs[0] + 0.3 * (ribs[1] - ribs[0]), ribs[1] - 0.3 * (ribs[1] - ribs[0]))
  a = rng.uniform(0.2, 0.3) * (ribs[1] - ribs[0]) * 1.6
  b = s * rng.uniform(0.14, 0.25)
  rho = blob(cv, rng, cx, pleura + b * 0.9, a, b, 0.0, wobble=0.25)
  clear = s * 0.115  # off the ribs' shadows (half-width 0.09 of the image, blurred by the beam)
  beside = (cv.xx > ribs[0] + clear) & (cv.xx < ribs[1] - clear)
  below = cv.yy > pleura + 2
  region = (rho < 1) & below & beside
  thick = cv.px(rng.uniform(0.028, 0.036)) / b * (1.0 + 0.2 * np.clip(smooth_noise(cv, rng, 30), -1.5, 1.5))
  edge = cv.px(0.03)  # the lateral edges (kept off the ribs' shadows) meet aerated lung as well
  around = (cv.xx > ribs[0] + clear - edge) & (cv.xx < ribs[1] - clear + edge)
  shred = (rho < 1 + thick) & ~((rho < 1) & beside) & below & around & (cv.yy > pleura + 4)
  echo[shred] = 10.0 + 3.0 * smooth_noise(cv, rng, 40)[shred]
  echo[region] = -9.0 + 1.5 * smooth_noise(cv, rng, 20)[region]
  dots = region & (smooth_noise(cv, rng, 40) > 1.8)
  echo[dots] = 12.0
  cols = region.any(axis=0)
  over = (np.abs(cv.yy - pleura) < 1.5) & cols[None, :]
  echo[over] = 8.0
  if mirror is not None:
    mirror[:, cols] = 0.0
  return region


def apical_4ch(cv: Canvas, rng, echo, atten):
  """Adult apical four-chamber view (phased array): the chest wall in the near field; the left ventricle on
  the right of the image with its apex under the probe, the right ventricle beside it across the septum,
  the atria below the atrioventricular plane with the closed mitral and tricuspid leaflets, atrial walls and
  the interatrial septum; the bright pericardium around the heart and lung (air: dark, hazy) beyond it.
  Returns labels: 1 LV cavity, 2 LV myocardium (the septum to the RV blood included), 3 left atrium."""
  s = cv.size
  chest = cv.depth_mm < rng.uniform(7.0, 12.0)
  apex = np.array([s * rng.uniform(0.5, 0.55), s * rng.uniform(0.11, 0.15)], np.float32)
  tilt = rng.uniform(0.03, 0.25)  # long axis from vertical; the base swings to the right
  u = np.array([math.sin(tilt), math.cos(tilt)], np.float32)  # apex -> base
  v = np.array([u[1], -u[0]], np.float32)  # towards the LV lateral wall (image right)
  length, width = s * rng.uniform(0.36, 0.42), s * rng.uniform(0.09, 0.115)
  wall = s * rng.uniform(0.035, 0.048)
  peri = s * rng.uniform(0.018, 0.026)
  al = (cv.xx - apex[0]) * u[0] + (cv.yy - apex[1]) * u[1]  # along the axis from the LV apex
  ac = (cv.xx - apex[0]) * v[0] + (cv.yy - apex[1]) * v[1]  # across, + lateral

  def rho(c_al, c_ac, h_al, h_ac):
    return np.sqrt(((al - c_al) / np.float32(h_al)) ** 2 + ((ac - c_ac) / np.float32(h_ac)) ** 2)

  above = al < length
  lv_c, lv_h = 0.75 * length, 0.75 * length
  lv = (rho(lv_c, 0.0, lv_h, width) < 1) & above
  lv_out = (rho(lv_c, 0.0, lv_h + wall, width + wall) < 1) & above
  rv_w, rv_len = width * rng.uniform(0.75, 0.95), length * rng.uniform(0.42, 0.5)
  rv_c = -(width + wall + 0.7 * rv_w)
  rv_wall = wall * 0.6
  rv = (rho(length - rv_len, rv_c, rv_len, rv_w) < 1) & above & ~lv_out
  rv_out = (rho(length - rv_len, rv_c, rv_len + rv_wall, rv_w + rv_wall) < 1) & above
  la_len, la_w = length * rng.uniform(0.4, 0.5), width * rng.uniform(0.95, 1.15)
  ra_len, ra_w = length * rng.uniform(0.36, 0.46), rv_w * rng.uniform(1.0, 1.2)
  below = ~above
  la_rho = rho(length, 0.1 * width, la_len, la_w)
  ra_rho = rho(length, rv_c, ra_len, ra_w)
  la = (la_rho < 1) & below
  ra = (ra_rho < 1) & below & ~la
  atria_out = ((rho(length, 0.1 * width, la_len + 0.5 * rv_wall, la_w + 0.5 * rv_wall) < 1)
               | (rho(length, rv_c, ra_len + 0.5 * rv_wall, ra_w + 0.5 * rv_wall) < 1)) & below
  heart = lv_out | rv_out | atria_out
  pericardium = ((((rho(lv_c, 0.0, lv_h + wall + peri, width + wall + peri) < 1)
                   | (rho(length - rv_len, rv_c, rv_len + rv_wall + peri, rv_w + rv_wall + peri) < 1)) & above)
                 | (((rho(length, 0.1 * width, la_len + peri, la_w + peri) < 1)
                     | (rho(length, rv_c, ra_len + peri, ra_w + peri) < 1)) & below)) & ~heart
  echo[~heart & ~pericardium & ~chest] = -10.0 + echo[~heart & ~pericardium & ~chest]  # lung, mediastinum
  echo[chest] += 3.0
  echo[pericardium] = 12.0 + echo[pericardium]
  echo[heart] = MUSCLE_DB + 0.5 * echo[heart]
  blood = lv | rv | la | ra
  echo[blood] = BLOOD_DB
  atten[blood] = BLOOD_ATTEN
  leaf = cv.px(rng.uniform(0.01, 0.014))
  bow = cv.px(rng.uniform(0.0, 0.012))
  for chamber, h_ac, c_ac in ((la, la_w, 0.1 * width), (ra, ra_w, rv_c)):  # closed mitral / tricuspid leaflets
    curve = length + leaf + bow * np.maximum(0.0, 1.0 - ((ac - c_ac) / np.float32(h_ac)) ** 2)
    echo[chamber & (al < curve)] = 10.0
  labels = np.zeros((s, s), np.uint8)
  labels[lv_out & ~lv] = 2
  labels[lv] = 1
  labels[la] = 3
  return labels
