"""Reusable anatomy for sonosynth scenes: each function draws one structure into the backscatter
(`echo`, dB) and attenuation (`atten`, dB/cm/MHz) maps in place and returns its region(s) or
landmarks. Sizes are fractions of the image size; every shape is randomised by `rng`.
"""

from __future__ import annotations

import math

import numpy as np

from m2dino_jax.data.sonosynth.shapes import (
  BONE_ATTEN,
  BONE_DB,
  FLUID_ATTEN,
  FLUID_DB,
  WALL_DB,
  Canvas,
  blob,
  ellipse,
  ellipse_normal,
  segment_distance,
  smooth_noise,
  specular_db,
)

BLOOD_DB = -32.0


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


def skull(cv: Canvas, rng, echo, atten, centre, a, b, angle):
  """Fetal head: bright skull ring with mild bone attenuation, hypoechoic brain, midline echo along
  the long axis, choroid plexus. Returns the filled head (outer skull edge)."""
  cx, cy = centre
  rho = ellipse(cv, cx, cy, a, b, angle)
  thick = cv.px(0.012) / min(a, b) * 1.4
  head = rho < 1
  ring = head & (rho > 1 - thick)
  echo[head] = -9.0 + 1.5 * smooth_noise(cv, rng, 12)[head]
  u = np.array([math.cos(angle), math.sin(angle)], np.float32)
  c = np.array([cx, cy], np.float32)
  mid = segment_distance(cv, c - 0.8 * a * u, c + 0.8 * a * u)
  echo[head & (mid < cv.px(0.004) + 0.5)] = 4.0
  for side in (-1, 1):  # choroid plexus, either side of the midline
    n = np.array([-u[1], u[0]]) * side * 0.3 * b
    p = c + n + 0.2 * a * u
    plexus = ellipse(cv, p[0], p[1], 0.22 * a, 0.08 * b, angle) < 1
    echo[plexus] = 6.0
  nx, ny = ellipse_normal(cv, cx, cy, a, b, angle)
  echo[ring] = BONE_DB + specular_db(cv, nx, ny)[ring]  # bright where the beam meets it square on
  atten[ring] = 5.0
  return head


def femur(cv: Canvas, rng, echo, atten, p0, p1):
  """Bright ossified femur shaft between p0 and p1, with the acoustic shadow bone leaves behind it."""
  width = cv.px(rng.uniform(0.01, 0.018))
  bone = segment_distance(cv, p0, p1) < width
  echo[bone] = BONE_DB + 2.0
  atten[bone] = BONE_ATTEN
  return bone


def spine_dots(cv: Canvas, echo, atten, start, direction, length, n=6, size0=0.02, taper=0.5):
  """A chain of bright vertebral ossification centres from `start` along `direction`."""
  for i in range(n):
    t = i / max(n - 1, 1)
    c = np.asarray(start) + direction * length * t
    r = cv.px(size0) * (1 - taper * t)
    dot = ellipse(cv, c[0], c[1], r, r * 0.8) < 1
    echo[dot] = BONE_DB
    atten[dot] = BONE_ATTEN * 0.6


def body_outline(cv: Canvas, rng, echo, centre, a, b, angle):
  """A fetal trunk cross-section: echogenic skin ring around slightly hypoechoic contents."""
  rho = ellipse(cv, centre[0], centre[1], a, b, angle)
  inside = rho < 1
  echo[inside] -= 2.0
  echo[inside & (rho > 0.95)] += 8.0
  return rho


def fetal_abdomen(cv: Canvas, rng, echo, atten, centre, radius):
  """Fetal abdomen (FASS-like): liver, stomach bubble, umbilical vein, aorta and spine.
  Returns an integer map: 1 aorta, 2 liver, 3 stomach, 4 umbilical vein."""
  angle = rng.uniform(0, 2 * math.pi)
  rho = body_outline(cv, rng, echo, centre, radius, radius * rng.uniform(0.85, 1.0), angle)
  back = np.array([math.cos(angle), math.sin(angle)], np.float32)  # direction of the spine
  side = np.array([-back[1], back[0]], np.float32) * rng.choice([-1.0, 1.0])
  c = np.asarray(centre, np.float32)
  labels = np.zeros((cv.size, cv.size), np.uint8)
  liver_c = c - back * 0.25 * radius + side * 0.2 * radius
  liver = (ellipse(cv, *liver_c, 0.8 * radius, 0.55 * radius, angle + math.pi / 2) < 1) & (rho < 0.92)
  echo[(rho < 0.95) & ~liver] -= 3.0
  echo[liver] = 3.0 + 1.5 * smooth_noise(cv, rng, 20)[liver]
  labels[liver] = 2
  st_c = c - side * rng.uniform(0.35, 0.45) * radius
  stomach = blob(cv, rng, *st_c, 0.22 * radius, 0.15 * radius, angle, wobble=0.1) < 1
  labels[stomach] = 3
  uv0 = c - back * 0.75 * radius + side * 0.1 * radius
  uv = segment_distance(cv, uv0, c - back * 0.05 * radius + side * 0.25 * radius) < cv.px(0.012)
  labels[uv & (rho < 0.95)] = 4
  ao_c = c + back * 0.45 * radius - side * 0.1 * radius
  aorta = ellipse(cv, *ao_c, 0.07 * radius, 0.07 * radius) < 1
  labels[aorta] = 1
  fluid = (labels == 1) | (labels == 3) | (labels == 4)
  echo[fluid] = FLUID_DB
  atten[fluid] = FLUID_ATTEN
  spine_dots(cv, echo, atten, c + back * 0.7 * radius, side, 0.0, n=1, size0=0.035)
  return labels


def heart_4ch(cv: Canvas, rng, echo, centre, a, b, angle):
  """Four-chamber heart: myocardium ellipse with four blood-filled chambers. Returns the heart."""
  heart = ellipse(cv, centre[0], centre[1], a, b, angle) < 1
  echo[heart] = 1.0
  u = np.array([math.cos(angle), math.sin(angle)], np.float32)
  v = np.array([-u[1], u[0]], np.float32)
  for su in (-1, 1):
    for sv in (-1, 1):
      c = np.asarray(centre) + su * 0.45 * a * u + sv * 0.42 * b * v
      size = rng.uniform(0.85, 1.1, 2)
      ch = ellipse(cv, c[0], c[1], 0.4 * a * size[0], 0.38 * b * size[1], angle) < 1
      echo[ch & heart] = BLOOD_DB
  return heart


def cervix(cv: Canvas, rng, echo, atten, centre, length, thickness, angle):
  """Uterine cervix with a bright mucosal canal along its axis; amniotic fluid beyond the internal os.
  Returns (anterior lip, posterior lip, internal os, external os)."""
  cx, cy = centre
  rho = blob(cv, rng, cx, cy, length, thickness, angle, wobble=0.04)
  tissue = rho < 1
  echo[(rho >= 1) & (rho < 1.25)] -= 6.0  # hypoechoic surroundings outline the cervix
  echo[tissue] = 6.0 + 1.5 * smooth_noise(cv, rng, 16)[tissue]
  u = np.array([math.cos(angle), math.sin(angle)], np.float32)
  v = np.array([-u[1], u[0]], np.float32)  # points down-ish for |angle| < 90 deg
  sign = rng.choice([-1.0, 1.0])  # which end is the internal os
  internal = np.array([cx, cy], np.float32) + sign * 0.85 * length * u
  external = np.array([cx, cy], np.float32) - sign * 0.85 * length * u
  fluid_c = internal + sign * 0.55 * length * u
  fluid = (ellipse(cv, fluid_c[0], fluid_c[1], 0.5 * length, 1.6 * thickness, angle) < 1) & ~tissue
  echo[fluid] = FLUID_DB
  atten[fluid] = FLUID_ATTEN
  canal = segment_distance(cv, internal, external) < cv.px(0.004) + 0.5
  echo[canal] = WALL_DB + 2.0
  side = (cv.xx - cx) * v[0] + (cv.yy - cy) * v[1]
  lips_sep = canal | (np.abs(side) < 1.0)
  anterior = tissue & (side < 0) & ~lips_sep
  posterior = tissue & (side >= 0) & ~lips_sep
  return anterior, posterior, internal, external


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


def b_lines(cv: Canvas, rng, echo, pleura, ribs, count, level=6.0):
  """Vertical comet-tail artefacts from the pleura to the bottom (interstitial syndrome)."""
  margin = 0.1 * (ribs[1] - ribs[0])
  for x in rng.uniform(ribs[0] + margin, ribs[1] - margin, count):
    w = cv.px(rng.uniform(0.01, 0.02))
    echo[(np.abs(cv.xx - x) < w) & (cv.yy > pleura)] = level + rng.uniform(-2, 2)


def consolidation(cv: Canvas, rng, echo, atten, pleura, ribs):
  """Hepatised lung under the pleura with air bronchograms and a shredded deep border."""
  s = cv.size
  cx = rng.uniform(ribs[0] + 0.3 * (ribs[1] - ribs[0]), ribs[1] - 0.3 * (ribs[1] - ribs[0]))
  a = rng.uniform(0.2, 0.3) * (ribs[1] - ribs[0]) * 1.6
  b = s * rng.uniform(0.14, 0.25)
  region = blob(cv, rng, cx, pleura + b * 0.9, a, b, 0.0, wobble=0.25) < 1
  region &= (cv.yy > pleura + 2) & (cv.xx > ribs[0] + s * 0.09) & (cv.xx < ribs[1] - s * 0.09)  # not under ribs
  echo[region] = 0.5 + 2.0 * smooth_noise(cv, rng, 20)[region]
  dots = region & (smooth_noise(cv, rng, 40) > 1.8)
  echo[dots] = 12.0
  return region
