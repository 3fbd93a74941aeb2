"""Adult abdominal anatomy in context for sonosynth's organ_cls (convex probe).

The six organ views share one abdominal field, as a sonographer sees them: skin, subcutaneous fat (sparse
scatterers), the rectus / flank muscle between bright fascia and the peritoneum (`wall`), then the organs with
their neighbours: the kidney seen through the liver or the spleen as acoustic window, with echogenic perirenal
fat and the psoas below it; the gallbladder inside liver parenchyma beside the portal vein; the spleen under the
diaphragm with lung beyond it and a kidney pole below; the aorta in front of the vertebral body with the IVC
beside it, the pancreas and splenic vein in front and bowel gas above; the bladder behind the lower abdominal
wall with the uterus or the prostate behind it and the rectum deeper. Rib shadows (subcostal / intercostal
windows) and bowel gas (a bright surface, a shadow behind it and reverberation: the physics' mirror map) come
at random where they are plausible. What a view is labelled is its central subject; nothing is shifted
image-wide per class (`measure.task_shortcut` checks that global statistics do not tell the classes apart).

Each view draws into the scene maps in place and returns nothing; `view` dispatches by class. Echo levels are
dB re soft tissue, attenuation dB/cm/MHz, sizes fractions of the image size unless named _mm.
"""

from __future__ import annotations

import math

import numpy as np

from m2dino_jax.data.sonosynth import obstetric as O
from m2dino_jax.data.sonosynth.shapes import (
  BLOOD_DB,
  BONE_ATTEN,
  BONE_DB,
  CAPSULE_FLOOR_DB,
  FAT_DB,
  FLUID_ATTEN,
  FLUID_DB,
  MUSCLE_DB,
  MUSCLE_DENSITY,
  WALL_DB,
  Canvas,
  blob,
  ellipse,
  ellipse_at,
  ellipse_normal,
  segment_distance,
  smooth_noise,
  specular_db,
)

LIVER_DB = 0.0
SPLEEN_DB = 1.5  # slightly more echogenic than the liver, homogeneous
CORTEX_DB = -6.0  # renal cortex (exactly: realism.capsule_ratio_db finds the kidney by it)
PYRAMID_DB = -14.0  # medullary pyramids
SINUS_DB = 9.0  # renal sinus fat
PERIRENAL_DB = 3.0  # echogenic perirenal fat
PANCREAS_DB = 3.0
BOWEL_DB = 2.0
LUNG_DB = -4.0  # aerated lung beyond the diaphragm: artefacts, mirror image
GAS_DB, GAS_ATTEN, GAS_MIRROR_DB = 14.0, 40.0, -14.0  # a gas surface: bright, opaque, reverberating


class Field:
  """One abdominal scene's shared state: the maps, the region below the wall and the reverberation map."""

  def __init__(self, cv: Canvas, rng, echo, atten):
    self.cv, self.rng, self.echo, self.atten = cv, rng, echo, atten
    self.mirror: np.ndarray | None = None
    self.deep, self.top = wall(cv, rng, echo, atten)

  def px(self, f):
    return self.cv.px(f)

  def organ(self, c, a, b, ang, level, tex=1.0, cells=16, wobble=0.05, capsule=0.0, region=None):
    """A parenchymal organ (blob) below the wall: level + texture inside, with a specular capsule `capsule` px
    thick when > 0 (bright where the beam meets it square on). Returns its rho."""
    cv = self.cv
    rho = blob(cv, self.rng, c[0], c[1], a, b, ang, wobble=wobble) if wobble else ellipse(cv, c[0], c[1], a, b, ang)
    keep = self.deep if region is None else region
    inside = (rho < 1) & keep
    self.echo[inside] = level + tex * smooth_noise(cv, self.rng, cells)[inside]
    self.atten[inside] = cv.probe.nominal_atten
    if capsule > 0:
      ring = (rho >= 1) & (rho < 1 + capsule / min(a, b)) & keep
      self.echo[ring] = WALL_DB + specular_db(cv, *ellipse_normal(cv, c[0], c[1], a, b, ang), CAPSULE_FLOOR_DB)[ring]
    return rho

  def vessel(self, p0, p1, r, walls=0.0, region=None):
    """A vessel along p0-p1 (radius r px): blood, with bright walls `walls` dB over WALL_DB - 4 if not None
    (the distance to the segment computed in its bounding window only)."""
    cv = self.cv
    p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
    mid, half = (p0 + p1) / 2, float(np.abs(p1 - p0).max()) / 2 + r + 2
    win = cv.window(mid[0], mid[1], half)  # the distance only where the vessel can be
    d = segment_distance(cv, p0, p1, win)
    keep = (self.deep if region is None else region)[win]
    echo, atten = self.echo[win], self.atten[win]
    if walls is not None:
      echo[(d >= r) & (d < r + 1.3) & keep] = WALL_DB - 4 + walls
    lumen = (d < r) & keep
    echo[lumen] = BLOOD_DB
    atten[lumen] = FLUID_ATTEN

  def fluid(self, region):
    self.echo[region] = FLUID_DB
    self.atten[region] = FLUID_ATTEN

  def gas(self, c, r):
    """A bowel gas pocket: bright curved front surface, opaque (a shadow behind it), reverberating (the physics'
    mirror map) when it lies just under the wall."""
    cv = self.cv
    w, rho = ellipse_at(cv, c[0], c[1], r, 0.55 * r, self.rng.uniform(-0.3, 0.3))
    pocket = rho < 1
    front = pocket & (cv.yy[w] < c[1])
    self.echo[w][pocket] = GAS_DB
    self.atten[w][pocket & ~front] = GAS_ATTEN
    if c[1] > self.top + self.px(0.15):  # deeper pockets' reverberations fade into their shadow: not simulated
      return
    if self.mirror is None:
      self.mirror = np.zeros_like(self.echo)
    self.mirror[w][front] = 10.0 ** (GAS_MIRROR_DB / 10.0)

  def bowel(self, c, r):
    """A bowel loop: echogenic wall (mucosa) around fluid or gas contents."""
    cv = self.cv
    w, rho = ellipse_at(cv, c[0], c[1], r, 0.7 * r, self.rng.uniform(0, math.pi))
    keep = self.deep[w]
    self.echo[w][(rho < 1) & keep] = BOWEL_DB + 4.0 * (rho[(rho < 1) & keep] > 0.7)
    if self.rng.random() < 0.6:
      self.gas((c[0], c[1] - 0.2 * r), 0.6 * r)
    else:
      inner = (rho < 0.65) & keep
      self.echo[w][inner] = FLUID_DB
      self.atten[w][inner] = FLUID_ATTEN

  def ribs(self, count):
    """Rib cross-sections in the wall (intercostal / subcostal window): bright cortex, a shadow behind."""
    cv = self.cv
    y = self.top - self.px(0.03)
    cols = np.flatnonzero(cv.fov[int(np.clip(y, 0, cv.size - 1))])
    lo, hi = (float(cols[0]), float(cols[-1])) if cols.size else (0.0, float(cv.size))
    for _ in range(count):  # in the outer quarters of the fan at that depth, flanking the subject
      x = lo + (hi - lo) * self.rng.choice([self.rng.uniform(0.0, 0.25), self.rng.uniform(0.75, 1.0)])
      w, rho = ellipse_at(cv, x, y, self.px(0.04), self.px(0.025))  # ~12 mm wide
      self.echo[w][(rho < 1) & (cv.yy[w] < y)] = BONE_DB
      self.atten[w][rho < 1] = BONE_ATTEN * 3

  def kidney(self, c, a, b, ang, capsule=True):
    """Kidney, long axis: hypoechoic cortex, darker pyramids, bright sinus fat, a specular capsule, echogenic
    perirenal fat around it. Returns its rho."""
    cv, rng = self.cv, self.rng
    rho = ellipse(cv, c[0], c[1], a, b, ang)
    fat = (rho >= 1) & (rho < 1.0 + self.px(rng.uniform(0.02, 0.05)) / b) & self.deep
    self.echo[fat] = PERIRENAL_DB + smooth_noise(cv, rng, 16)[fat]
    inside = (rho < 1) & self.deep
    self.echo[inside] = CORTEX_DB
    u = np.array([math.cos(ang), math.sin(ang)], np.float32)
    v = np.array([-u[1], u[0]], np.float32)
    for t in np.linspace(-0.6, 0.6, int(rng.integers(3, 6))):  # pyramids on both sides of the sinus
      for side in (-1, 1):
        p = np.asarray(c, np.float32) + t * a * u + side * 0.55 * b * v
        w, r = ellipse_at(cv, p[0], p[1], 0.12 * a, 0.22 * b, ang)
        self.echo[w][(r < 1) & inside[w]] = PYRAMID_DB
    sinus = (blob(cv, rng, c[0], c[1], 0.55 * a, 0.3 * b, ang, wobble=0.2) < 1) & inside
    self.echo[sinus] = SINUS_DB + 2.0 * smooth_noise(cv, rng, 30)[sinus]
    if capsule:
      ring = (rho >= 1) & (rho < 1.06) & self.deep
      self.echo[ring] = WALL_DB + specular_db(cv, *ellipse_normal(cv, c[0], c[1], a, b, ang), CAPSULE_FLOOR_DB)[ring]
    return rho

  def vertebra(self, c, half):
    """A vertebral body deep in the field: bright curved front surface, an acoustic shadow behind it."""
    cv = self.cv
    w, rho = ellipse_at(cv, c[0], c[1], half, 0.65 * half)
    front = (rho < 1) & (rho > 0.85) & (cv.yy[w] < c[1]) & self.deep[w]
    self.echo[w][front] = BONE_DB
    self.atten[w][(rho < 1) & (cv.yy[w] >= c[1] - 0.4 * half)] = BONE_ATTEN

  def muscle(self, c, a, b, ang):
    """A deep muscle (psoas, quadratus lumborum): hypoechoic, fewer scatterers per cell (MUSCLE_DENSITY)."""
    rho = ellipse(self.cv, c[0], c[1], a, b, ang)
    m = (rho < 1) & self.deep
    self.echo[m] = MUSCLE_DB + smooth_noise(self.cv, self.rng, 30)[m]
    self.cv.density_map()[m] = MUSCLE_DENSITY


def wall(cv: Canvas, rng, echo, atten):
  """The anterior abdominal wall along the beam: skin, subcutaneous fat (sparse scatterers), fascia, muscle,
  the peritoneum, with a gentle undulation. Returns (the region below it, its depth in pixels at the centre)."""
  n = cv.size
  k = np.float32(2 * math.pi * rng.uniform(0.4, 1.5) / n)
  wave = rng.uniform(0.0, 2.0) * np.sin(np.arange(n, dtype=np.float32) * k + np.float32(rng.uniform(0, 2 * math.pi)))
  depth = cv.depth_mm + wave[None, :].astype(np.float32)
  thick = [rng.uniform(1.5, 2.5), rng.uniform(4.0, 20.0), 0.7, rng.uniform(4.0, 11.0), 0.7]
  bounds = [float(b) for b in np.cumsum(thick)]
  idx = O._layers(cv, rng, echo, atten, depth, bounds, [8.0, FAT_DB, WALL_DB, MUSCLE_DB, WALL_DB, 0.0],
                  ["add", "fat", "add", "muscle", "add", "add"])
  deep = idx == len(bounds)
  col = deep[:, n // 2]
  top = float(np.argmax(col)) if col.any() else 0.3 * n
  return deep, top


# ---- the six views (organ_cls classes) -------------------------------------------------------------------

def _centre(f: Field, y_below: float, jitter=0.05, depth_jitter=0.1):
  """A subject centre: mid-field laterally, about `y_below` (fraction of the size) under the peritoneum (as deep
  as the patient and the window put it: the depth varies more than the lateral position)."""
  rng = f.rng
  return np.array([f.px(0.5 + rng.uniform(-jitter, jitter)),
                   f.top + f.px(y_below + rng.uniform(-depth_jitter, depth_jitter))], np.float32)


def _liver_field(f: Field, ang):
  """Liver parenchyma filling the window below the wall, its deep surface the diaphragm (specular, bright)
  with lung beyond it; hepatic veins (no walls) and portal branches (bright walls)."""
  rng = f.rng
  c = np.array([f.px(0.5 + rng.uniform(-0.1, 0.1)), f.top + f.px(rng.uniform(0.3, 0.4))], np.float32)
  a, b = f.px(rng.uniform(0.6, 0.75)), f.px(rng.uniform(0.38, 0.48))
  rho = f.organ(c, a, b, ang, LIVER_DB, tex=1.0, cells=16, wobble=0.03)
  beyond = (rho >= 1.03) & f.deep & (f.cv.yy > c[1])
  f.echo[beyond] = LUNG_DB + 2.0 * smooth_noise(f.cv, rng, 16)[beyond]
  dia = (rho >= 1) & (rho < 1.03) & f.deep & (f.cv.yy > c[1])
  f.echo[dia] = WALL_DB + 4 + specular_db(f.cv, *ellipse_normal(f.cv, c[0], c[1], a, b, ang), CAPSULE_FLOOR_DB)[dia]
  liver = (rho < 1) & f.deep
  for k in range(int(rng.integers(2, 6))):
    p0 = c + np.array([rng.uniform(-0.5, 0.5) * a, rng.uniform(-0.6, 0.2) * b], np.float32)
    p1 = p0 + f.px(rng.uniform(0.1, 0.25)) * np.array([math.cos(t := rng.uniform(0, 2 * math.pi)), math.sin(t)])
    f.vessel(p0, p1, f.px(rng.uniform(0.008, 0.02)), walls=None if k % 2 else 2.0, region=liver)
  return c, rho


def liver(f: Field):
  """Liver (right subcostal / epigastric): the parenchyma with its vessels fills the view; in transverse
  sections the IVC and a vertebral body deep to it, the echogenic ligamentum teres, gas at the flexure."""
  rng = f.rng
  c, _ = _liver_field(f, rng.uniform(-0.4, 0.4))
  if rng.random() < 0.5:  # transverse: IVC behind the liver, the spine deeper
    x = f.px(0.5 + rng.uniform(-0.15, 0.15))
    y = f.top + f.px(rng.uniform(0.28, 0.42))
    f.fluid((ellipse(f.cv, x, y, f.px(rng.uniform(0.05, 0.08)), f.px(rng.uniform(0.03, 0.05))) < 1) & f.deep)
    f.vertebra((x + f.px(rng.uniform(-0.08, 0.08)), y + f.px(rng.uniform(0.1, 0.14))), f.px(0.14))
  if rng.random() < 0.5:  # ligamentum teres: a bright dot of fat
    w, rr = ellipse_at(f.cv, c[0] + f.px(rng.uniform(-0.2, 0.2)), c[1] - f.px(rng.uniform(0.0, 0.1)),
                       f.px(0.03), f.px(0.022))
    f.echo[w][(rr < 1) & f.deep[w]] = WALL_DB
  if rng.random() < 0.3:  # hepatic flexure gas at the edge
    f.gas((f.px(rng.choice([0.2, 0.8])), f.top + f.px(rng.uniform(0.1, 0.3))), f.px(0.05))
  if rng.random() < 0.5:
    f.ribs(int(rng.integers(1, 3)))
  if f.rng.random() < 0.3:  # the upper pole of the right kidney deep at the edge
    side = f.rng.choice([-1.0, 1.0])
    f.kidney((f.px(0.5 + side * 0.35), f.top + f.px(0.55)), f.px(0.15), f.px(0.08), f.rng.uniform(-0.6, 0.6))


def kidney(f: Field):
  """Kidney, long axis, through the liver (right) or the spleen (left) as acoustic window; psoas behind."""
  rng = f.rng
  ang = rng.uniform(-0.5, 0.5)
  c = _centre(f, 0.3)
  a, b = f.px(rng.uniform(0.16, 0.28)), f.px(rng.uniform(0.08, 0.14))
  wc = (c[0] + f.px(rng.uniform(-0.15, 0.15)), c[1] - f.px(rng.uniform(0.1, 0.2)))
  level = LIVER_DB if rng.random() < 0.6 else SPLEEN_DB
  f.organ(wc, f.px(rng.uniform(0.4, 0.6)), f.px(rng.uniform(0.18, 0.25)), rng.uniform(-0.3, 0.3), level,
          capsule=1.5)
  f.muscle((c[0] + f.px(rng.uniform(-0.1, 0.1)), c[1] + b + f.px(rng.uniform(0.08, 0.14))), f.px(0.3),
           f.px(rng.uniform(0.06, 0.1)), ang + rng.uniform(-0.2, 0.2))
  f.kidney(c, a, b, ang)
  if rng.random() < 0.6:  # the spine deep on the medial side (coronal flank view)
    f.vertebra((c[0] + f.px(rng.choice([-0.25, 0.25])), c[1] + b + f.px(rng.uniform(0.06, 0.14))), f.px(0.12))
  if rng.random() < 0.6:  # intercostal window
    f.ribs(int(rng.integers(1, 3)))
  if rng.random() < 0.5:  # colon at the lower pole
    f.bowel((c[0] + f.px(rng.choice([-0.3, 0.3])), c[1] - f.px(0.05)), f.px(rng.uniform(0.04, 0.07)))


def spleen(f: Field):
  """Spleen, left intercostal coronal: a homogeneous crescent, the diaphragm over its convex side with lung
  beyond, the splenic vein at the hilum, a kidney pole below, often rib shadows."""
  rng = f.rng
  ang = rng.uniform(-0.5, 0.5)
  c = _centre(f, 0.25)
  a, b = f.px(rng.uniform(0.22, 0.36)), f.px(rng.uniform(0.12, 0.2))
  u = np.array([math.cos(ang), math.sin(ang)], np.float32)
  n = np.array([-u[1], u[0]], np.float32)
  if rng.random() < 0.7:  # the upper pole of the left kidney below the spleen
    f.kidney(c + n * (b + f.px(0.08)) + u * a * rng.uniform(-0.3, 0.3), f.px(0.15), f.px(0.085), ang)
  lung = (ellipse(f.cv, c[0], c[1], a * 1.6, b * 1.6, ang) >= 1.0) & f.deep & (f.cv.yy < c[1] + 0.3 * b)
  f.echo[lung] = LUNG_DB + 2.0 * smooth_noise(f.cv, rng, 16)[lung]
  rho = f.organ(c, a, b, ang, SPLEEN_DB, tex=0.7, cells=16, wobble=0.04, capsule=2.0)
  hilum = (ellipse(f.cv, *(c + n * 0.9 * b), 0.7 * a, 0.45 * b, ang) < 1) & (rho < 1) & f.deep
  f.echo[hilum] = LIVER_DB + smooth_noise(f.cv, rng, 16)[hilum]  # the concave hilar side: fat, vessels
  for _ in range(int(rng.integers(1, 4))):  # splenic vein and artery branches at the hilum
    p = c + n * 0.7 * b + u * rng.uniform(-0.3, 0.3) * a
    t = rng.uniform(-0.8, 0.8)
    f.vessel(p, p + (n * math.cos(t) + u * math.sin(t)) * f.px(rng.uniform(0.08, 0.16)), f.px(rng.uniform(0.01, 0.02)))
  if rng.random() < 0.6:
    f.ribs(int(rng.integers(1, 3)))
  if rng.random() < 0.5:  # the stomach medially: gas or fluid contents
    f.bowel((c[0] + f.px(rng.choice([-0.3, 0.3])), c[1] + f.px(0.15)), f.px(rng.uniform(0.05, 0.09)))


def bladder(f: Field):
  """Bladder, suprapubic transverse: a fluid-filled rounded box behind the lower abdominal wall (posterior
  enhancement from the physics), the uterus or the prostate behind it, the rectum deeper, bowel loops above."""
  rng = f.rng
  cv = f.cv
  ang = rng.uniform(-0.3, 0.3)
  a, b = f.px(rng.uniform(0.09, 0.24)), f.px(rng.uniform(0.06, 0.15))
  c = np.array([f.px(0.5 + rng.uniform(-0.06, 0.06)), f.top + b + f.px(rng.uniform(0.02, 0.15))], np.float32)
  if rng.random() < 0.6:  # the iliac bones deep at the sides
    for side in (-1, 1):
      f.vertebra((c[0] + side * f.px(rng.uniform(0.3, 0.4)), c[1] + f.px(rng.uniform(0.2, 0.3))), f.px(0.1))
  if rng.random() < 0.5:  # uterus behind the bladder, with its endometrial stripe
    uc = (c[0] + f.px(rng.uniform(-0.05, 0.05)), c[1] + b + f.px(rng.uniform(0.08, 0.12)))
    rho = f.organ(uc, f.px(rng.uniform(0.15, 0.22)), f.px(rng.uniform(0.07, 0.1)), rng.uniform(-0.3, 0.3), -1.0,
                  tex=1.5, cells=16, capsule=1.2)
    stripe = (np.abs(cv.yy - uc[1]) < f.px(0.008)) & (rho < 0.75) & f.deep
    f.echo[stripe] = 7.0
  else:  # prostate: rounded, hypoechoic, a few calcifications
    pc = (c[0], c[1] + b + f.px(rng.uniform(0.06, 0.1)))
    r = f.px(rng.uniform(0.07, 0.1))
    f.organ(pc, r, 0.85 * r, 0.0, -4.0, tex=1.5, cells=30, capsule=1.2)
    for _ in range(int(rng.integers(0, 3))):
      w, rr = ellipse_at(cv, pc[0] + rng.uniform(-0.4, 0.4) * r, pc[1] + rng.uniform(-0.3, 0.3) * r, 1.5, 1.5)
      f.echo[w][rr < 1] = BONE_DB
  if rng.random() < 0.6:  # rectum with gas, deep
    f.gas((c[0] + f.px(rng.uniform(-0.08, 0.08)), c[1] + b + f.px(rng.uniform(0.2, 0.28))), f.px(0.05))
  for _ in range(int(rng.integers(0, 3))):  # bowel loops beside and above
    f.bowel((f.px(rng.choice([0.2, 0.8]) + rng.uniform(-0.05, 0.05)), f.top + f.px(rng.uniform(0.03, 0.12))),
            f.px(rng.uniform(0.04, 0.07)))
  u, v = cv.xx - c[0], cv.yy - c[1]
  cs, sn = np.float32(math.cos(ang)), np.float32(math.sin(ang))
  p = np.float32(rng.uniform(3.0, 4.5))
  rho = (np.abs((cs * u + sn * v) / np.float32(a)) ** p + np.abs((-sn * u + cs * v) / np.float32(b)) ** p) ** (1 / p)
  f.echo[(rho >= 1) & (rho < 1 + 2.0 / b) & f.deep] = WALL_DB
  f.fluid((rho < 1) & f.deep)


def gallbladder(f: Field):
  """Gallbladder inside the liver (right subcostal): a fluid pear with a thin bright wall beside the portal
  vein, stones at its dependent side (bright, shadowing) in half the scenes, duodenal gas medially."""
  rng = f.rng
  cv = f.cv
  ang = rng.uniform(-0.5, 0.5)
  _liver_field(f, rng.uniform(-0.4, 0.4))
  c = _centre(f, 0.22)
  a, b = f.px(rng.uniform(0.08, 0.18)), f.px(rng.uniform(0.04, 0.08))
  u = np.array([math.cos(ang), math.sin(ang)], np.float32)
  n = np.array([-u[1], u[0]], np.float32) * (1 if math.cos(ang) > 0 else -1)
  pv = c + n * (b + f.px(rng.uniform(0.04, 0.07))) - u * 0.5 * a
  f.vessel(pv - u * f.px(0.1), pv + u * f.px(0.08), f.px(rng.uniform(0.015, 0.022)), walls=3.0)
  along = ((cv.xx - c[0]) * u[0] + (cv.yy - c[1]) * u[1]) / np.float32(a)
  rho = blob(cv, rng, c[0], c[1], a, b, ang, wobble=0.06) * (1 + 0.25 * np.clip(along, -1, 1))  # a pear: neck at +u
  f.echo[(rho >= 1) & (rho < 1 + 1.5 / b) & f.deep] = WALL_DB
  f.fluid((rho < 1) & f.deep)
  if rng.random() < 0.5:
    for _ in range(int(rng.integers(1, 4))):
      s = c + u * rng.uniform(-0.5, 0.3) * a + np.array([0, 0.55 * b], np.float32)
      w, rr = ellipse_at(cv, s[0], s[1], f.px(rng.uniform(0.012, 0.02)), f.px(0.012))
      f.echo[w][rr < 1] = BONE_DB
      f.atten[w][rr < 1] = BONE_ATTEN * 2
  if rng.random() < 0.4:
    f.gas((c[0] + f.px(rng.choice([-0.25, 0.25])), c[1] + f.px(0.12)), f.px(0.045))
  if rng.random() < 0.3:  # oblique-transverse: the spine deep
    f.vertebra((f.px(0.5 + rng.uniform(-0.2, 0.2)), c[1] + f.px(rng.uniform(0.2, 0.3))), f.px(0.13))
  if rng.random() < 0.3:
    f.ribs(1)


def aorta(f: Field):
  """Aorta, epigastric transverse: the left liver lobe under the wall, the pancreas with the splenic vein
  behind it, the SMA in its fat collar, the aorta (bright specular wall) on the vertebral body (bright front,
  shadow behind) with the IVC beside it (image left), the crura and psoas muscles, bowel gas above."""
  rng = f.rng
  cv = f.cv
  c = _centre(f, 0.3, jitter=0.08)
  r = f.px(rng.uniform(0.035, 0.07))
  if rng.random() < 0.4:
    return _aorta_long(f, c, r)
  if rng.random() < 0.7:  # left lobe of the liver
    f.organ((c[0] + f.px(rng.uniform(-0.2, 0.1)), f.top), f.px(rng.uniform(0.3, 0.5)), f.px(rng.uniform(0.08, 0.14)),
            rng.uniform(-0.2, 0.2), LIVER_DB, capsule=1.5)
  vb = (c[0], c[1] + r + f.px(rng.uniform(0.07, 0.1)))
  for side in (-1, 1):
    f.muscle((vb[0] + side * f.px(0.2), vb[1]), f.px(0.09), f.px(0.06), side * 0.5)
  pan = (c[0] + f.px(rng.uniform(-0.05, 0.05)), c[1] - r - f.px(rng.uniform(0.06, 0.09)))
  f.organ(pan, f.px(rng.uniform(0.22, 0.3)), f.px(rng.uniform(0.035, 0.05)), rng.uniform(-0.2, 0.2), PANCREAS_DB,
          tex=1.5, cells=30, wobble=0.1)
  f.vessel((pan[0] - f.px(0.15), pan[1] + f.px(0.045)), (pan[0] + f.px(0.15), pan[1] + f.px(0.04)), f.px(0.012))
  w, rr = ellipse_at(cv, c[0], c[1] - r - f.px(0.02), f.px(0.025), f.px(0.025))  # SMA in its fat collar
  f.echo[w][rr < 1] = WALL_DB - 2
  w, rr = ellipse_at(cv, c[0], c[1] - r - f.px(0.02), f.px(0.012), f.px(0.012))
  f.echo[w][rr < 1] = BLOOD_DB
  f.vertebra(vb, f.px(0.14))
  ivc = ellipse(cv, c[0] - r - f.px(rng.uniform(0.08, 0.12)), c[1] + f.px(0.01), r * rng.uniform(1.0, 1.5),
                r * rng.uniform(0.5, 0.8), rng.uniform(-0.2, 0.2)) < 1
  f.fluid(ivc & f.deep)
  shape = (c[0], c[1], r, r * rng.uniform(0.92, 1.0), 0.0)
  rho = ellipse(cv, *shape)
  ring = (rho >= 1) & (rho < 1 + 2.0 / r)
  f.echo[ring] = WALL_DB + 2 + specular_db(cv, *ellipse_normal(cv, *shape), CAPSULE_FLOOR_DB)[ring]
  f.echo[rho < 1] = BLOOD_DB
  f.atten[rho < 1] = FLUID_ATTEN
  for _ in range(int(rng.integers(1, 3))):  # bowel (transverse colon, stomach) with gas above
    f.bowel((f.px(rng.uniform(0.25, 0.75)), f.top + f.px(rng.uniform(0.04, 0.1))), f.px(rng.uniform(0.04, 0.07)))


def _aorta_long(f: Field, c, r):
  """Aorta, sagittal: a tube with bright walls (square on to the beam: specular) across the field, the
  vertebral bodies behind it as a row of bright fronts with shadows and discs between, bowel gas above."""
  rng = f.rng
  ang = rng.uniform(-0.25, 0.25)
  u = np.array([math.cos(ang), math.sin(ang)], np.float32)
  n = np.array([-u[1], u[0]], np.float32)
  if rng.random() < 0.6:  # left lobe of the liver over it
    f.organ((c[0] - f.px(rng.uniform(0.1, 0.3)), f.top + f.px(0.02)), f.px(rng.uniform(0.3, 0.45)),
            f.px(rng.uniform(0.08, 0.13)), ang, LIVER_DB, capsule=1.5)
  step = f.px(rng.uniform(0.13, 0.17))  # one vertebra + disc: ~30 mm
  depth = r + f.px(rng.uniform(0.02, 0.05))  # the aorta lies on the spine
  x0 = rng.uniform(-1.0, 0.0) * step
  for k in range(-5, 6):  # vertebral bodies: a flat bright front (square on to the beam), shadow behind; discs
    p = c + u * (x0 + k * step) + n * depth
    w = f.cv.window(p[0], p[1], 0.75 * step)
    dx, dy = f.cv.xx[w] - np.float32(p[0]), f.cv.yy[w] - np.float32(p[1])
    along, across = dx * u[0] + dy * u[1], dx * n[0] + dy * n[1]
    body = (np.abs(along) < 0.38 * step) & (across >= 0) & (across < 0.7 * step) & f.deep[w]
    f.echo[w][body & (across < 2.0)] = BONE_DB
    f.atten[w][body & (across >= 1.0)] = BONE_ATTEN
  d = np.abs((f.cv.xx - c[0]) * n[0] + (f.cv.yy - c[1]) * n[1])
  ring = (d >= r) & (d < r + 2.0) & f.deep
  f.echo[ring] = WALL_DB + 2 + specular_db(f.cv, float(n[0]), float(n[1]), CAPSULE_FLOOR_DB)[ring]
  lumen = (d < r) & f.deep
  f.echo[lumen] = BLOOD_DB
  f.atten[lumen] = FLUID_ATTEN
  if rng.random() < 0.5:  # the SMA leaving it towards the probe
    p = c - n * r + u * f.px(rng.uniform(-0.1, 0.1))
    f.vessel(p, p - n * f.px(0.1) + u * f.px(0.25), f.px(0.012), walls=2.0)
  for _ in range(int(rng.integers(1, 3))):
    f.bowel((f.px(rng.uniform(0.25, 0.75)), f.top + f.px(rng.uniform(0.04, 0.1))), f.px(rng.uniform(0.04, 0.07)))


VIEWS = (liver, kidney, spleen, bladder, gallbladder, aorta)  # organ_cls class order
