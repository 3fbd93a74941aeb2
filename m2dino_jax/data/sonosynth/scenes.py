"""The 27 FMC_UIA task scenes: for each task a builder that draws one random scene and its label,
the probe it is imaged with, and how many images the task has (data-rich vs data-scarce).

Label conventions (ours; the simulator defines them, so they hold exactly):
- breast_2cls: 0 benign, 1 malignant. breast_3cls: 0 normal, 1 benign, 2 malignant.
- fetal_head_pos_cls / fetal_sacral_pos_cls: k = direction of the face (orbits) / the sacrum from
  the centre, k * 45 degrees clockwise from 12 o'clock. A horizontal flip changes the class.
- fetal_plane_cls: 0 abdomen, 1 brain, 2 femur, 3 thorax, 4 maternal cervix (transabdominal), 5 other.
- liver_lesion_2cls: 0 benign (hyperechoic), 1 malignant (target lesion). lung_2cls: 0 A-lines,
  1 B-lines. lung_disease_3cls: 0 normal, 1 interstitial (B-lines), 2 consolidation.
- organ_cls: 0 liver, 1 kidney, 2 spleen, 3 bladder, 4 gallbladder, 5 aorta.
- cardiac_multi (apical four-chamber): 1 LV cavity, 2 LV myocardium (the whole septum, to the RV blood),
  3 left atrium (from the mitral annulus; the closed leaflets lie on its side). cervix: the whole cervix.
  cervix_multi: 1 anterior lip, 2 posterior lip (the stroma either side of the canal's glandular zone,
  which is background). fetal_abdomen_multi: 1 aorta, 2 liver, 3 stomach, 4 umbilical vein.
  head_symphysis_multi: 1 pubic symphysis, 2 fetal head (to the outer skull edge).
- FUGC points: internal os, external os (the ends of the canal, on the cervix's ends). IUGC: symphysis
  upper end, lower end (the ends of its long axis), tangent point on the fetal skull (the angle of
  progression). fetal_femur: the two ends of the ossified shaft, left one first.
- Points are continuous pixel coordinates, pixel (i, j) covering [j, j + 1) x [i, i + 1) as in the
  FMC_UIA reader and `data.transforms` (a landmark on the centre of pixel (i, j) is (j + 0.5, i + 0.5));
  boxes are pixel edges [min, max + 1). Builders draw on pixel indices; `generator.sample` adds the 0.5.

Every builder that images a fetus draws it in its obstetric field (`obstetric.obstetric_field`: maternal
wall, placenta, amniotic fluid, other fetal parts); `measure.border_cnr` checks that labelled borders show.
organ_cls draws its six views in one abdominal field (`abdomen`: wall layers, neighbouring organs, ribs, bowel
gas); `measure.task_shortcut` checks that no classification task is told apart by image-wide statistics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from m2dino_jax.data.sonosynth import abdomen as AB
from m2dino_jax.data.sonosynth import anatomy as A
from m2dino_jax.data.sonosynth import obstetric as O
from m2dino_jax.data.sonosynth import views as V
from m2dino_jax.data.sonosynth.physics import Probe
from m2dino_jax.data.sonosynth.shapes import (
  BLOOD_DB,
  BONE_ATTEN,
  BONE_DB,
  FLUID_ATTEN,
  FLUID_DB,
  WALL_DB,
  Canvas,
  background,
  blob,
  ellipse,
  ellipse_at,
  polar_dir,
  segment_distance,
  smooth_noise,
)

# Apertures: a convex array's ~64 active elements at 3.5 MHz span ~24 mm, a phased array's ~20 mm,
# an endocavity array's ~12 mm; beyond depth = aperture * F# the beam widens with depth.
# The operator's TGC sliders undo most of the depth-wise enhancement below wide fluid (AUTO_TGC).
CLUTTER_DB = -27.0  # clutter floor re tissue: anechoic fluid reads about -22 dB, hazier near the probe
AUTO_TGC = 0.8
LINEAR = Probe("linear", depth_mm=40.0, width_mm=40.0, f0_mhz=7.5, focus_mm=18.0, clutter_db=CLUTTER_DB,
               auto_tgc=AUTO_TGC)
CONVEX = Probe("sector", depth_mm=110.0, angle_deg=55.0, apex_mm=45.0, f0_mhz=3.5, f_number=2.5,
               focus_mm=60.0, aperture_mm=24.0, clutter_db=CLUTTER_DB, auto_tgc=AUTO_TGC)
PHASED = Probe("sector", depth_mm=140.0, angle_deg=75.0, apex_mm=0.0, f0_mhz=2.5, f_number=2.5,
               focus_mm=70.0, aperture_mm=20.0, clutter_db=CLUTTER_DB, auto_tgc=AUTO_TGC)
ENDOCAVITY = Probe("sector", depth_mm=60.0, angle_deg=80.0, apex_mm=6.0, f0_mhz=6.5, focus_mm=30.0,
                   aperture_mm=12.0, clutter_db=CLUTTER_DB, auto_tgc=AUTO_TGC)


@dataclasses.dataclass
class Scene:
  """What a builder returns: scene maps on the image grid and the label in pixel space."""
  echo: np.ndarray
  atten: np.ndarray
  label: int = -1
  mask: np.ndarray | None = None
  box: np.ndarray | None = None
  points: np.ndarray | None = None
  mirror: np.ndarray | None = None  # per-bounce reverberation ratio of specular plates (physics.envelope)
  ringdown: np.ndarray | None = None  # per-bounce ratio of ring-down resonators, B-lines (physics.envelope)


@dataclasses.dataclass(frozen=True)
class Spec:
  build: Callable[[Canvas, np.random.Generator, int], Scene]
  probe: Probe
  base_size: int  # images at scale 1 (train + val)


# ---- regression -------------------------------------------------------------------------------

def fugc(cv, rng, label):
  echo, atten, _, _, _, internal, external = V.cervix(cv, rng)
  return Scene(echo, atten, points=np.stack([internal, external]))


def iugc(cv, rng, label):
  echo, atten, _, _, points = V.symphysis_and_head(cv, rng)
  return Scene(echo, atten, points=points)


def fetal_femur(cv, rng, label):
  echo, atten = background(cv, rng, layers=False)
  c = np.array(V.centre(cv, rng, y=0.4, jitter=0.06), np.float32)
  half = cv.px(rng.uniform(0.14, 0.24))
  ang = rng.uniform(-0.45, 0.45)
  d = np.array([math.cos(ang), math.sin(ang)], np.float32) * half
  O.obstetric_field(cv, rng, echo, atten, c, half, top=half * (abs(math.sin(ang)) + 0.45))
  O.thigh(cv, rng, echo, atten, c - d, c + d)  # the landmarks sit on the ends of the ossified shaft
  return Scene(echo, atten, points=np.stack([c - d, c + d]))


# ---- classification ---------------------------------------------------------------------------

def breast_2cls(cv, rng, label):
  echo, atten, _ = V.breast(cv, rng, 1 + label)
  return Scene(echo, atten, label=label)


def breast_3cls(cv, rng, label):
  echo, atten, _ = V.breast(cv, rng, label)
  return Scene(echo, atten, label=label)


def fetal_head_pos_cls(cv, rng, label):
  echo, atten = background(cv, rng, layers=False)
  c = np.array(V.centre(cv, rng, y=0.42, jitter=0.04), np.float32)
  direction = label * 45.0 + rng.uniform(-10, 10)
  d = polar_dir(direction)
  a, b = cv.px(rng.uniform(0.17, 0.22)), cv.px(rng.uniform(0.14, 0.16))
  O.obstetric_field(cv, rng, echo, atten, c, a)
  O.skull(cv, rng, echo, atten, c, a, b, math.atan2(d[1], d[0]), front=1.0)
  n = np.array([-d[1], d[0]], np.float32)
  for side in (-1, 1):  # the orbits mark where the face is
    o = c + 0.62 * a * d + side * 0.3 * b * n
    orbit = ellipse(cv, *o, 0.13 * b, 0.13 * b)
    echo[orbit < 1] = FLUID_DB
    echo[(orbit >= 1) & (orbit < 1.3)] = WALL_DB
  return Scene(echo, atten, label=label)


def fetal_sacral_pos_cls(cv, rng, label):
  echo, atten = background(cv, rng, layers=False)
  c = np.array(V.centre(cv, rng, y=0.42, jitter=0.04), np.float32)
  d = polar_dir(label * 45.0 + rng.uniform(-10, 10))
  r = cv.px(rng.uniform(0.2, 0.25))
  O.obstetric_field(cv, rng, echo, atten, c, r)
  O.body_outline(cv, rng, echo, c, r, r * rng.uniform(0.8, 0.95), rng.uniform(0, math.pi))
  O.spine_dots(cv, echo, atten, c - 0.2 * r * d, d, 0.85 * r, n=7, size0=0.022, taper=0.6)
  n = np.array([-d[1], d[0]], np.float32)
  for side in (-1, 1):  # iliac wings flanking the sacrum
    p0 = c + 0.35 * r * d + side * 0.25 * r * n
    wing = segment_distance(cv, p0, p0 + 0.3 * r * d + side * 0.15 * r * n) < cv.px(0.008)
    echo[wing] = BONE_DB - 2
  return Scene(echo, atten, label=label)


def _extent_up(a, b, ang):
  """How far an ellipse (semi-axes a along `ang`, b across) reaches above its centre."""
  return math.hypot(a * math.sin(ang), b * math.cos(ang))


def _fetal_other(cv, rng, echo, atten, c, r):
  """fetal_plane_cls 'other': a plane none of the five standard ones, in the same obstetric field: the
  spine in a sagittal section, a face profile, or a forearm with its two bones."""
  kind = rng.integers(3)
  ang = rng.uniform(-0.4, 0.4)
  u = np.array([math.cos(ang), math.sin(ang)], np.float32)
  n = np.array([-u[1], u[0]], np.float32)
  top = r * (0.3 + abs(math.sin(ang)) * (1.1, 0.6, 0.8)[kind])  # the part's top: the maternal wall ends above it
  O.obstetric_field(cv, rng, echo, atten, c, r * 1.1, top=top)
  if kind == 0:  # spine, sagittal: skin line over two rows of ossification centres converging to the sacrum
    O.body_outline(cv, rng, echo, c + 0.6 * r * n, 1.4 * r, 0.8 * r, ang)
    for side, gap in ((-1, 0.12), (1, 0.12)):
      O.spine_dots(cv, echo, atten, c - 1.1 * r * u + side * gap * r * n, u, 2.0 * r, n=10, size0=0.014, taper=0.3)
  elif kind == 1:  # face profile: forehead, nose and lips as a bright skin line, the mandible below
    O.body_outline(cv, rng, echo, c + 0.9 * r * n, 1.1 * r, 0.95 * r, ang)
    for t, bump in ((-0.2, 0.16), (0.25, 0.08), (0.45, 0.07)):
      p = c - 0.05 * r * n + t * r * u - bump * r * n
      w, rho = ellipse_at(cv, p[0], p[1], 0.1 * r, bump * r, ang)
      echo[w][rho < 1] = 2.0
    jaw = segment_distance(cv, c + 0.5 * r * u + 0.25 * r * n, c + 0.9 * r * u + 0.6 * r * n) < cv.px(0.007)
    echo[jaw] = BONE_DB
    atten[jaw] = BONE_ATTEN
  else:  # forearm: soft tissue around two parallel bones
    O.thigh(cv, rng, echo, atten, c - 0.8 * r * u - 0.08 * r * n, c + 0.8 * r * u - 0.08 * r * n)
    bone = segment_distance(cv, c - 0.7 * r * u + 0.1 * r * n, c + 0.75 * r * u + 0.1 * r * n) < cv.px(0.007)
    echo[bone] = BONE_DB
    atten[bone] = BONE_ATTEN


def _maternal_cervix(cv, rng, echo, atten, c, r):
  """fetal_plane_cls 'maternal cervix', transabdominal (the probe of the other planes), in the same obstetric
  field: maternal wall, amniotic fluid with loose fetal parts, and the cervix in the lower uterine segment
  (myometrium around it), the bladder in front and the presenting part beyond the internal os (A.cervix)."""
  a, b, ang = r * rng.uniform(1.0, 1.3), r * rng.uniform(0.65, 0.9), rng.uniform(-0.4, 0.4)
  cavity = O.obstetric_field(cv, rng, echo, atten, c, a, top=_extent_up(a, b, ang))
  seg = (blob(cv, rng, *c, a, b, ang, wobble=0.1) < 1) & cavity
  echo[seg] = O.MYOMETRIUM_DB + 1.5 * smooth_noise(cv, rng, 16)[seg]
  atten[seg] = cv.probe.nominal_atten
  A.cervix(cv, rng, echo, atten, c, r * 1.1, r * 0.45, rng.uniform(-0.4, 0.4))


def fetal_plane_cls(cv, rng, label):
  """Every plane sits in the obstetric field, the maternal wall ending just above the imaged part (its own top:
  a thin femur has no more fluid above it than a head)."""
  echo, atten = background(cv, rng, layers=False)
  c = np.array(V.centre(cv, rng, y=0.45, jitter=0.07), np.float32)
  r = cv.px(rng.uniform(0.15, 0.26))  # gestational age and the operator's depth setting
  trunk = rng.random() < 0.6  # the rest of the fetus beside the imaged part
  if label in (0, 3):
    O.obstetric_field(cv, rng, echo, atten, c, r * 1.1, top=r, trunk=trunk)
    (O.abdomen if label == 0 else O.thorax)(cv, rng, echo, atten, c, r)
  elif label == 1:
    ang = rng.uniform(-0.6, 0.6)
    O.obstetric_field(cv, rng, echo, atten, c, r * 1.1, top=_extent_up(1.1 * r, 0.9 * r, ang), trunk=trunk)
    O.skull(cv, rng, echo, atten, c, r * 1.1, r * 0.9, ang)
  elif label == 2:
    ang = rng.uniform(-0.4, 0.4)
    d = np.array([math.cos(ang), math.sin(ang)], np.float32) * r
    O.obstetric_field(cv, rng, echo, atten, c, r * 1.1, top=r * (abs(math.sin(ang)) + 0.45))
    if trunk:  # the buttock and trunk beyond the hip end of the thigh
      hip = float(rng.choice([-1.0, 1.0]))
      t = math.atan2(hip * d[1], hip * d[0]) + rng.uniform(-0.6, 0.6)
      O.trunk_beside(cv, rng, echo, atten, c + hip * 1.1 * d, 0.5 * r, np.array([math.cos(t), math.sin(t)], np.float32))
    O.thigh(cv, rng, echo, atten, c - d, c + d)
  elif label == 4:
    _maternal_cervix(cv, rng, echo, atten, c, r)
  else:
    _fetal_other(cv, rng, echo, atten, c, r)
  return Scene(echo, atten, label=label)


def liver_lesion_2cls(cv, rng, label):
  echo, atten = background(cv, rng, layers=False, texture_db=1.5)
  for _ in range(rng.integers(1, 4)):  # hepatic vessels
    p0 = V.centre(cv, rng, y=0.45, jitter=0.3)
    p1 = V.centre(cv, rng, y=0.45, jitter=0.3)
    vessel = segment_distance(cv, p0, p1) < cv.px(rng.uniform(0.008, 0.02))
    echo[vessel] = BLOOD_DB
  c = V.centre(cv, rng, y=0.45, jitter=0.1)
  r = cv.px(rng.uniform(0.05, 0.11))
  rho = blob(cv, rng, *c, r, r * rng.uniform(0.8, 1.0), rng.uniform(0, 3), wobble=0.06)
  if label == 0:  # haemangioma-like: bright, homogeneous, sharp
    echo[rho < 1] = 9.0 + smooth_noise(cv, rng, 24)[rho < 1]
  else:  # target lesion: dark halo around a heterogeneous core
    echo[(rho >= 0.6) & (rho < 1.1)] = -12.0
    core = rho < 0.6
    echo[core] = 3.0 + 4.0 * smooth_noise(cv, rng, 30)[core]
  return Scene(echo, atten, label=label)


def lung_2cls(cv, rng, label):
  echo, atten, _, mirror, ringdown = V.lung(cv, rng, label)
  return Scene(echo, atten, label=label, mirror=mirror, ringdown=ringdown)


def lung_disease_3cls(cv, rng, label):
  echo, atten, _, mirror, ringdown = V.lung(cv, rng, label)
  return Scene(echo, atten, label=label, mirror=mirror, ringdown=ringdown)


def organ_cls(cv, rng, label):
  """The six organs in one abdominal field (`abdomen`): the class is the view's central subject."""
  echo, atten = background(cv, rng, layers=False)
  field = AB.Field(cv, rng, echo, atten)
  AB.VIEWS[label](field)
  return Scene(echo, atten, label=label, mirror=field.mirror)


# ---- detection --------------------------------------------------------------------------------

def spinal_cord_injury_loc(cv, rng, label):
  echo, atten = background(cv, rng)
  top = cv.px(rng.uniform(0.35, 0.45))
  thick = cv.px(rng.uniform(0.12, 0.18))
  tilt = rng.uniform(-0.1, 0.1)
  y0 = top + tilt * (cv.xx - cv.size / 2)
  cord = (cv.yy > y0) & (cv.yy < y0 + thick)
  echo[cord] = -12.0
  for y in (y0, y0 + thick):
    echo[np.abs(cv.yy - y) < 1.5] = WALL_DB + 4  # dura
  echo[np.abs(cv.yy - (y0 + thick / 2)) < 0.8] = 2.0  # central echo complex
  cx = cv.px(rng.uniform(0.25, 0.75))
  length = cv.px(rng.uniform(0.08, 0.25))
  cy = top + tilt * (cx - cv.size / 2) + thick / 2
  lesion = (blob(cv, rng, cx, cy, length / 2, thick * 0.45, tilt, wobble=0.2) < 1) & cord
  echo[lesion] = 6.0 + 2.0 * smooth_noise(cv, rng, 30)[lesion]
  return Scene(echo, atten, box=V.box_of(lesion))


def thyroid_nodule_det(cv, rng, label):
  echo, atten, region = V.thyroid_with_nodule(cv, rng)
  return Scene(echo, atten, box=V.box_of(region))


def uterine_fibroid_det(cv, rng, label):
  echo, atten = background(cv, rng, layers=False)
  c = np.array(V.centre(cv, rng, y=0.42, jitter=0.04), np.float32)
  a, b, ang = cv.px(rng.uniform(0.26, 0.32)), cv.px(rng.uniform(0.15, 0.19)), rng.uniform(-0.4, 0.4)
  uterus = ellipse(cv, *c, a, b, ang) < 1
  echo[uterus] = 1.0 + 1.5 * smooth_noise(cv, rng, 16)[uterus]
  u = np.array([math.cos(ang), math.sin(ang)], np.float32)
  echo[(segment_distance(cv, c - 0.7 * a * u, c + 0.7 * a * u) < cv.px(0.012)) & uterus] = 7.0
  r = cv.px(rng.uniform(0.06, 0.12))
  fc = c + u * rng.uniform(-0.5, 0.5) * a + np.array([-u[1], u[0]]) * rng.uniform(-0.6, 0.6) * b
  rho = blob(cv, rng, *fc, r, r * rng.uniform(0.85, 1.0), rng.uniform(0, 3), wobble=0.05)
  fibroid = rho < 1
  echo[fibroid] = -6.0 + 3.0 * np.sin(rho[fibroid] * 14.0 + smooth_noise(cv, rng, 20)[fibroid])
  atten[fibroid] = 1.0
  return Scene(echo, atten, box=V.box_of(fibroid & cv.fov))


# ---- segmentation -----------------------------------------------------------------------------

def breast_lesion(cv, rng, label):
  echo, atten, mask = V.breast(cv, rng, int(rng.integers(1, 3)))
  return Scene(echo, atten, mask=mask.astype(np.uint8))


def cardiac_multi(cv, rng, label):
  echo, atten = background(cv, rng, layers=False)
  return Scene(echo, atten, mask=A.apical_4ch(cv, rng, echo, atten))


def carotid_artery(cv, rng, label):
  echo, atten = background(cv, rng)
  s = cv.size
  if rng.random() < 0.6:  # transverse
    c = V.centre(cv, rng, y=0.5, jitter=0.08)
    r = s * rng.uniform(0.08, 0.13)
    rho = ellipse(cv, *c, r, r * rng.uniform(0.9, 1.0))
    lumen = rho < 1
    echo[(rho >= 1) & (rho < 1.12)] = WALL_DB
    jv = ellipse(cv, c[0] + rng.choice([-1, 1]) * r * 1.6, c[1] - r * 1.1, r * 1.2, r * 0.5) < 1
    echo[jv & ~lumen] = FLUID_DB
  else:  # longitudinal
    y0 = s * rng.uniform(0.35, 0.5) + 4 * smooth_noise(cv, rng, 4)
    width = s * rng.uniform(0.12, 0.2)
    lumen = (cv.yy > y0) & (cv.yy < y0 + width)
    echo[(np.abs(cv.yy - y0) < 2) | (np.abs(cv.yy - y0 - width) < 2)] = WALL_DB
  echo[lumen] = FLUID_DB
  atten[lumen] = FLUID_ATTEN
  return Scene(echo, atten, mask=lumen.astype(np.uint8))


def cervix_seg(cv, rng, label):
  echo, atten, tissue, _, _, _, _ = V.cervix(cv, rng)
  return Scene(echo, atten, mask=tissue.astype(np.uint8))


def cervix_multi(cv, rng, label):
  echo, atten, _, ant, post, _, _ = V.cervix(cv, rng)
  return Scene(echo, atten, mask=ant.astype(np.uint8) + 2 * post.astype(np.uint8))


def fetal_abdomen_multi(cv, rng, label):
  echo, atten = background(cv, rng, layers=False)
  c, r = V.centre(cv, rng, y=0.42, jitter=0.05), cv.px(rng.uniform(0.2, 0.26))
  O.obstetric_field(cv, rng, echo, atten, c, r)
  return Scene(echo, atten, mask=O.abdomen(cv, rng, echo, atten, c, r))


def fetal_head(cv, rng, label):
  echo, atten = background(cv, rng, layers=False)
  c, a, b = V.centre(cv, rng, y=0.42, jitter=0.05), cv.px(rng.uniform(0.18, 0.25)), cv.px(rng.uniform(0.14, 0.18))
  O.obstetric_field(cv, rng, echo, atten, c, a, trunk=rng.random() < 0.7)
  head = O.skull(cv, rng, echo, atten, c, a, b, rng.uniform(-0.6, 0.6))
  return Scene(echo, atten, mask=head.astype(np.uint8))


def fetal_heart(cv, rng, label):
  echo, atten = background(cv, rng, layers=False)
  c, r = np.array(V.centre(cv, rng, y=0.42, jitter=0.05), np.float32), cv.px(rng.uniform(0.2, 0.26))
  O.obstetric_field(cv, rng, echo, atten, c, r)
  return Scene(echo, atten, mask=O.thorax(cv, rng, echo, atten, c, r).astype(np.uint8))


def head_symphysis_multi(cv, rng, label):
  echo, atten, ps, head, _ = V.symphysis_and_head(cv, rng)
  return Scene(echo, atten, mask=ps.astype(np.uint8) + 2 * head.astype(np.uint8))


def lung_seg(cv, rng, label):
  echo, atten, region, mirror, ringdown = V.lung(cv, rng, 2)
  return Scene(echo, atten, mask=region.astype(np.uint8), mirror=mirror, ringdown=ringdown)


def ovary_tumor(cv, rng, label):
  echo, atten = background(cv, rng, layers=False)
  c = np.array(V.centre(cv, rng, y=0.42, jitter=0.05), np.float32)
  r = cv.px(rng.uniform(0.13, 0.22))
  tumour = blob(cv, rng, *c, r, r * rng.uniform(0.75, 0.95), rng.uniform(0, 3), wobble=0.08) < 1
  echo[tumour] = FLUID_DB
  atten[tumour] = FLUID_ATTEN
  for _ in range(rng.integers(0, 4)):  # septa
    p0 = c + rng.uniform(-r, r, 2)
    p1 = c + rng.uniform(-r, r, 2)
    echo[(segment_distance(cv, p0, p1) < 1.2) & tumour] = WALL_DB
  if rng.random() < 0.5:  # solid papillary projection from the wall
    t = rng.uniform(0, 2 * math.pi)
    p = c + 0.75 * r * np.array([math.cos(t), math.sin(t)])
    solid = (ellipse(cv, *p, 0.3 * r, 0.25 * r, t) < 1) & tumour
    echo[solid] = 0.0
    atten[solid] = 0.7
  for _ in range(rng.integers(2, 6)):  # follicles of the remaining ovary
    p = c + rng.uniform(-1.6, 1.6, 2) * r
    f = (ellipse(cv, *p, cv.px(0.025), cv.px(0.022)) < 1) & ~tumour
    echo[f] = FLUID_DB
  return Scene(echo, atten, mask=tumour.astype(np.uint8))


def thyroid_nodule(cv, rng, label):
  echo, atten, region = V.thyroid_with_nodule(cv, rng)
  return Scene(echo, atten, mask=region.astype(np.uint8))


# Base sizes span 80..1200 images (15x): data-rich (fetal planes, fetal head, breast, thyroid, cardiac)
# and data-scarce tasks (spinal cord, femur, liver, lung), the regime the M2DINO study is about.
SPECS: dict[str, Spec] = {
    "FUGC": Spec(fugc, ENDOCAVITY, 500),
    "IUGC": Spec(iugc, CONVEX, 600),
    "fetal_femur": Spec(fetal_femur, CONVEX, 100),
    "breast_2cls": Spec(breast_2cls, LINEAR, 600),
    "breast_3cls": Spec(breast_3cls, LINEAR, 780),
    "fetal_head_pos_cls": Spec(fetal_head_pos_cls, CONVEX, 320),
    "fetal_plane_cls": Spec(fetal_plane_cls, CONVEX, 1200),
    "fetal_sacral_pos_cls": Spec(fetal_sacral_pos_cls, CONVEX, 240),
    "liver_lesion_2cls": Spec(liver_lesion_2cls, CONVEX, 100),
    "lung_2cls": Spec(lung_2cls, LINEAR, 150),
    "lung_disease_3cls": Spec(lung_disease_3cls, LINEAR, 120),
    "organ_cls": Spec(organ_cls, CONVEX, 180),
    "spinal_cord_injury_loc": Spec(spinal_cord_injury_loc, LINEAR, 80),
    "thyroid_nodule_det": Spec(thyroid_nodule_det, LINEAR, 600),
    "uterine_fibroid_det": Spec(uterine_fibroid_det, CONVEX, 120),
    "breast_lesion": Spec(breast_lesion, LINEAR, 780),
    "cardiac_multi": Spec(cardiac_multi, PHASED, 800),
    "carotid_artery": Spec(carotid_artery, LINEAR, 200),
    "cervix": Spec(cervix_seg, ENDOCAVITY, 150),
    "cervix_multi": Spec(cervix_multi, ENDOCAVITY, 500),
    "fetal_abdomen_multi": Spec(fetal_abdomen_multi, CONVEX, 400),
    "fetal_head": Spec(fetal_head, CONVEX, 1000),
    "fetal_heart": Spec(fetal_heart, CONVEX, 120),
    "head_symphysis_multi": Spec(head_symphysis_multi, CONVEX, 1000),
    "lung": Spec(lung_seg, LINEAR, 100),
    "ovary_tumor": Spec(ovary_tumor, ENDOCAVITY, 150),
    "thyroid_nodule": Spec(thyroid_nodule, LINEAR, 900),
}
