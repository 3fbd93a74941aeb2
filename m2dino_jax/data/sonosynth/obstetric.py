"""Obstetric anatomy for sonosynth: the maternal field a fetal part is seen in, and the fetal parts.

A transabdominal obstetric image is mostly context: maternal skin, subcutaneous fat and rectus muscle, the
uterine wall, often a placenta, amniotic fluid around the fetus, other fetal parts (limbs, trunk, cord)
and the posterior uterine wall deep down. `maternal_context` draws that field, `fetal_parts` the loose
parts floating in the fluid; the labelled structures (`skull`, `thorax` with `heart_4ch`, `abdomen`,
`thigh`) are drawn on top and return their regions / landmarks. Echo levels are dB re soft tissue,
attenuation dB/cm/MHz; sizes are fractions of the image size unless named _mm.
"""

from __future__ import annotations

import math

import numpy as np

from m2dino_jax.data.sonosynth.shapes import (
  BLOOD_DB,
  BONE_ATTEN,
  BONE_DB,
  FAT_DB,
  FAT_DENSITY,
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

SKULL_DB, SKULL_FLOOR_DB, SKULL_ATTEN = 20.0, -13.0, 1.5  # a skull edge-on still scatters above soft tissue
BRAIN_DB = -9.0
PLACENTA_DB = 4.0
MYOMETRIUM_DB = -2.0
LUNG_DB = 4.0  # fetal lungs: homogeneous, brighter than the heart and the liver
MYOCARDIUM_DB = -4.0
FETAL_TISSUE_DB = -1.0


def _layers(cv: Canvas, rng, echo, atten, depth, bounds, levels, kinds):
  """Paints depth layers in one pass: layer k lies between bounds[k - 1] and bounds[k] (mm along the beam).
  kinds[k]: 'add' (level added to the texture already in echo), 'fluid', 'fat' or 'muscle' (added, with
  FAT_DENSITY / MUSCLE_DENSITY scatterers: pre-Rayleigh speckle)."""
  idx = np.searchsorted(np.asarray(bounds, np.float32), depth)
  level = np.asarray(levels, np.float32)[idx]
  fluid_k = np.array([k == "fluid" for k in kinds])
  fluid = fluid_k[idx]
  echo[...] = np.where(fluid, np.float32(FLUID_DB), echo + level)
  atten[fluid] = FLUID_ATTEN
  for kind, density in (("fat", FAT_DENSITY), ("muscle", MUSCLE_DENSITY)):
    ks = [i for i, k in enumerate(kinds) if k == kind]
    if ks:
      cv.density_map()[np.isin(idx, ks)] = density
  return idx


def maternal_context(cv: Canvas, rng, echo, atten, clear_mm: float, placenta_p: float = 0.45):
  """The transabdominal field around a fetus: maternal skin, subcutaneous fat (sparse scatterers), rectus
  muscle between bright fascia, the anterior uterine wall, an anterior placenta when there is room for it,
  amniotic fluid, and deep down a posterior placenta or the posterior wall. The layers follow the skin
  (depth along the beam) with a gentle undulation and stop a fluid gap above `clear_mm` (the depth of the
  fetal part drawn next). Returns the amniotic cavity (bool map), where fetal parts go."""
  n = cv.size
  amp = rng.uniform(0.0, 2.5)
  wave = amp * np.sin(np.arange(n, dtype=np.float32) * np.float32(2 * math.pi * rng.uniform(0.4, 1.5) / n)
                      + np.float32(rng.uniform(0, 2 * math.pi)))
  depth = cv.depth_mm + wave[None, :].astype(np.float32)
  wall = [rng.uniform(1.5, 2.5), rng.uniform(4.0, 14.0), 0.6, rng.uniform(4.0, 8.0), 0.5, rng.uniform(4.0, 9.0)]
  wall_lv = [8.0, FAT_DB, WALL_DB, MUSCLE_DB, WALL_DB, MYOMETRIUM_DB]
  wall_kind = ["add", "fat", "add", "muscle", "add", "add"]
  room = clear_mm - rng.uniform(1.5, 8.0)
  placenta = [1.5, rng.uniform(16.0, 30.0), 1.0]  # basal (retroplacental) zone, placenta, chorionic plate
  where = rng.choice(["front", "back", "none"], p=[placenta_p, placenta_p, 1 - 2 * placenta_p])
  if where == "front" and sum(wall) + sum(placenta) <= room:
    wall += placenta
    wall_lv += [-6.0, PLACENTA_DB, WALL_DB]
    wall_kind += ["add"] * 3
  elif where == "front":
    where = "back"
  scale = min(1.0, max(room, 6.0) / sum(wall))
  bounds = [float(b) for b in np.cumsum(np.asarray(wall) * scale)]
  levels, kinds = list(wall_lv), list(wall_kind)
  back = max(float(cv.depth_mm.max()) * rng.uniform(0.75, 1.15), bounds[-1] + 8.0)  # posterior wall
  if where == "back" and back - 24.0 > bounds[-1] + 8.0:  # posterior placenta above it
    bounds += [back - 24.0, back - 23.0, back - 1.5, back]
    levels += [FLUID_DB, WALL_DB, PLACENTA_DB, -6.0]
    kinds += ["fluid", "add", "add", "add"]
  else:
    bounds.append(back)
    levels.append(FLUID_DB)
    kinds.append("fluid")
  bounds.append(back + rng.uniform(5.0, 9.0))  # posterior myometrium, then maternal tissue
  levels += [MYOMETRIUM_DB, 0.0]
  kinds += ["add", "add"]
  idx = _layers(cv, rng, echo, atten, depth, bounds, levels, kinds)
  return idx == len(wall)  # the first fluid layer: the amniotic cavity


def _clear_depth(cv: Canvas, centre, radius) -> float:
  """Depth (mm) of the shallowest point of a disc: where the context above a fetal part must stop."""
  x = int(np.clip(round(float(centre[0])), 0, cv.size - 1))
  y = int(np.clip(round(float(centre[1])), 0, cv.size - 1))
  return float(cv.depth_mm[y, x]) - radius * cv.spacing_mm[1]


def limb(cv: Canvas, rng, echo, atten, centre, radius, angle):
  """A fetal limb cut across or obliquely: soft tissue with skin and a bright bone with its shadow."""
  w, rho = ellipse_at(cv, centre[0], centre[1], radius, radius * rng.uniform(0.5, 0.8), angle)
  inside = rho < 1
  echo[w][inside] = FETAL_TISSUE_DB + 6.0 * (rho[inside] > 0.85)
  bw, brho = ellipse_at(cv, centre[0], centre[1], radius * 0.45, radius * 0.18, angle)
  echo[bw][brho < 1] = BONE_DB
  atten[bw][brho < 1] = BONE_ATTEN


def cord(cv: Canvas, rng, echo, centre, radius):
  """Umbilical cord loop in cross-section: two arteries and a vein (fluid) in Wharton's jelly."""
  w, rho = ellipse_at(cv, centre[0], centre[1], radius, radius)
  echo[w][rho < 1] = -6.0
  echo[w][(rho >= 0.85) & (rho < 1)] = 4.0
  for k, r in enumerate((0.38, 0.25, 0.25)):
    t = rng.uniform(0, 2 * math.pi) + k * 2.1
    p = (centre[0] + 0.4 * radius * math.cos(t), centre[1] + 0.4 * radius * math.sin(t))
    vw, vr = ellipse_at(cv, p[0], p[1], r * radius, r * radius)
    echo[vw][vr < 1] = FLUID_DB


def fetal_parts(cv: Canvas, rng, echo, atten, cavity, avoid, count: int | None = None):
  """Loose fetal parts in the amniotic fluid (limbs, cord loops), kept off the disc `avoid` = (centre, radius)
  and off the beams above it (a bone there would shadow the labelled part)."""
  count = int(rng.integers(1, 4)) if count is None else count
  (ax, ay), ar = avoid
  for _ in range(count):
    for _try in range(6):
      x, y = rng.uniform(0.05, 0.95) * cv.size, rng.uniform(0.2, 0.95) * cv.size
      r = cv.px(rng.uniform(0.03, 0.07))
      above = y < ay and abs(x - ax) < ar + r
      if math.hypot(x - ax, y - ay) > ar + 1.3 * r and not above and cavity[int(y), int(x)]:
        break
    else:
      continue
    if rng.random() < 0.6:
      limb(cv, rng, echo, atten, (x, y), r, rng.uniform(0, math.pi))
    else:
      cord(cv, rng, echo, (x, y), r * 0.7)


def trunk_beside(cv: Canvas, rng, echo, atten, centre, radius, direction):
  """The rest of the fetus beside a part: a large soft-tissue body with skin, `direction` (unit x, y) from
  the part's centre, touching it (a head's neck and trunk)."""
  length = radius * rng.uniform(1.2, 1.7)
  c = np.asarray(centre, np.float32) + direction * (radius + 0.8 * length)
  rho = ellipse(cv, c[0], c[1], length, radius * rng.uniform(0.8, 1.0), math.atan2(direction[1], direction[0]))
  body = rho < 1
  echo[body] = FETAL_TISSUE_DB + 2.0 * smooth_noise(cv, rng, 10)[body]
  echo[body & (rho > 0.94)] = 6.0
  atten[body] = cv.probe.nominal_atten
  return body


def obstetric_field(cv: Canvas, rng, echo, atten, centre, radius, parts: bool = True, trunk: bool = False,
                    top: float | None = None):
  """maternal_context above a fetal part at `centre` (radius in pixels; `top`: how far above the centre it
  reaches, default the radius), loose fetal parts and, with `trunk`, the fetal body touching it.
  Returns the amniotic cavity."""
  cavity = maternal_context(cv, rng, echo, atten, _clear_depth(cv, centre, radius if top is None else top))
  if trunk:
    t = rng.uniform(0, 2 * math.pi)
    trunk_beside(cv, rng, echo, atten, centre, radius, np.array([math.cos(t), math.sin(t)], np.float32))
  if parts:
    fetal_parts(cv, rng, echo, atten, cavity, (centre, radius * (3.2 if trunk else 1.0)))
  return cavity


def skull(cv: Canvas, rng, echo, atten, centre, a, b, angle, front: float | None = None):
  """Fetal head in the transventricular / transthalamic plane: a specular skull ring (bright where the beam
  meets it square on, fainter edge-on, never below the surrounding tissue), hypoechoic brain, the midline
  falx interrupted by the cavum septi pellucidi, the thalami behind it and the choroid plexus. Returns
  the filled head (outer skull edge), the region the fetal-head and HC labels take. `front` (+1 / -1): the
  forehead lies along +angle / -angle (None: either)."""
  cx, cy = centre
  rho = ellipse(cv, cx, cy, a, b, angle)
  thick = cv.px(0.012) / min(a, b) * 1.4
  head = rho < 1
  ring = head & (rho > 1 - thick)
  brain = head & ~ring
  echo[brain] = BRAIN_DB + 1.5 * smooth_noise(cv, rng, 12)[brain]
  u = np.array([math.cos(angle), math.sin(angle)], np.float32)
  v = np.array([-u[1], u[0]], np.float32)
  c = np.array([cx, cy], np.float32)
  front = float(rng.choice([-1.0, 1.0])) if front is None else front  # which end is the forehead
  mid = segment_distance(cv, c - 0.8 * a * u, c + 0.8 * a * u)
  echo[head & (mid < cv.px(0.004) + 0.5)] = 4.0
  csp = c + front * 0.35 * a * u  # cavum septi pellucidi: a small fluid box across the midline
  w, r = ellipse_at(cv, csp[0], csp[1], 0.1 * a, 0.07 * b, angle)
  echo[w][r < 1] = FLUID_DB
  for side in (-1, 1):
    t = c + side * 0.16 * b * v  # thalami, heart-shaped pair behind the cavum
    w, r = ellipse_at(cv, t[0], t[1], 0.16 * a, 0.13 * b, angle)
    echo[w][r < 1] = BRAIN_DB - 4.0
    p = c - front * 0.35 * a * u + side * 0.32 * b * v  # choroid plexus in the lateral ventricle atrium
    w, r = ellipse_at(cv, p[0], p[1], 0.2 * a, 0.08 * b, angle)
    echo[w][r < 1] = 6.0
  nx, ny = ellipse_normal(cv, cx, cy, a, b, angle)
  echo[ring] = SKULL_DB + specular_db(cv, nx, ny, SKULL_FLOOR_DB)[ring]
  atten[ring] = SKULL_ATTEN
  return head


def thigh(cv: Canvas, rng, echo, atten, p0, p1):
  """Fetal thigh along its femur: soft tissue around the ossified diaphysis p0-p1 (flat, slightly flared
  ends: the landmarks of the femur length sit on them), bright where the beam meets it, with its shadow.
  Returns the bone region."""
  p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
  d = p1 - p0
  length = float(np.hypot(*d))
  u = d / length
  c = (p0 + p1) / 2
  ang = math.atan2(u[1], u[0])
  rho = ellipse(cv, c[0], c[1], 0.5 * length * rng.uniform(1.25, 1.45), 0.5 * length * rng.uniform(0.28, 0.4), ang)
  leg = rho < 1
  echo[leg] = FETAL_TISSUE_DB + 1.5 * smooth_noise(cv, rng, 16)[leg]
  echo[leg & (rho > 0.93)] = 6.0
  atten[leg] = cv.probe.nominal_atten
  half_w = cv.px(rng.uniform(0.008, 0.013))
  t = (cv.xx - p0[0]) * u[0] + (cv.yy - p0[1]) * u[1]  # along the shaft, 0 .. length
  n = np.abs(-(cv.xx - p0[0]) * u[1] + (cv.yy - p0[1]) * u[0])
  flare = 1.0 + 0.35 * np.maximum(0.0, 1.0 - np.minimum(t, length - t) / (0.1 * length))
  bone = (t >= 0) & (t <= length) & (n < half_w * flare)
  echo[bone] = BONE_DB + 2.0 + specular_db(cv, float(-u[1]), float(u[0]), -10.0)[bone]
  atten[bone] = BONE_ATTEN
  return bone


def spine_dots(cv: Canvas, echo, atten, start, direction, length, n=6, size0=0.02, taper=0.5):
  """A chain of bright vertebral ossification centres from `start` along `direction`."""
  for i in range(n):
    t = i / max(n - 1, 1)
    c = np.asarray(start) + direction * length * t
    r = cv.px(size0) * (1 - taper * t)
    w, rho = ellipse_at(cv, c[0], c[1], r, r * 0.8)
    echo[w][rho < 1] = BONE_DB
    atten[w][rho < 1] = BONE_ATTEN * 0.6


def vertebra(cv: Canvas, echo, atten, centre, back, size):
  """A vertebra in cross-section: the body's and the two laminae's ossification centres (a triangle
  opening away from the body), with their shadows. `back` (unit) points from the body to the laminae."""
  side = np.array([-back[1], back[0]], np.float32)
  for p, r in ((centre, size), (centre + back * 1.6 * size + side * 1.1 * size, 0.7 * size),
               (centre + back * 1.6 * size - side * 1.1 * size, 0.7 * size)):
    w, rho = ellipse_at(cv, p[0], p[1], r, r * 0.85)
    echo[w][rho < 1] = BONE_DB
    atten[w][rho < 1] = BONE_ATTEN * 0.6


def body_outline(cv: Canvas, rng, echo, centre, a, b, angle, inner_db=FETAL_TISSUE_DB):
  """A fetal trunk cross-section: echogenic skin ring around soft-tissue contents. Returns its rho."""
  rho = ellipse(cv, centre[0], centre[1], a, b, angle)
  inside = rho < 1
  echo[inside] = inner_db + 1.5 * smooth_noise(cv, rng, 12)[inside]
  echo[inside & (rho > 0.95)] = 8.0
  return rho


def abdomen(cv: Canvas, rng, echo, atten, centre, radius):
  """Fetal abdomen at the abdominal-circumference plane: skin over a hypoechoic muscle wall, a homogeneous
  liver with the umbilical vein curving into it, the stomach bubble on the other side, the aorta in front
  of a vertebra, hypoechoic kidneys / adrenals and echogenic bowel specks in the rest.
  Returns an integer map: 1 aorta, 2 liver, 3 stomach, 4 umbilical vein."""
  angle = rng.uniform(0, 2 * math.pi)
  rho = body_outline(cv, rng, echo, centre, radius, radius * rng.uniform(0.85, 1.0), angle, inner_db=-5.0)
  back = np.array([math.cos(angle), math.sin(angle)], np.float32)  # direction of the spine
  side = np.array([-back[1], back[0]], np.float32) * rng.choice([-1.0, 1.0])
  c = np.asarray(centre, np.float32)
  labels = np.zeros((cv.size, cv.size), np.uint8)
  echo[(rho >= 0.86) & (rho < 0.95)] = -8.0  # abdominal wall muscle
  liver_c = c - back * 0.25 * radius + side * 0.2 * radius
  liver = (ellipse(cv, *liver_c, 0.8 * radius, 0.55 * radius, angle + math.pi / 2) < 1) & (rho < 0.86)
  echo[liver] = 3.0 + 1.0 * smooth_noise(cv, rng, 20)[liver]
  labels[liver] = 2
  st_c = c - side * rng.uniform(0.35, 0.45) * radius
  stomach = blob(cv, rng, *st_c, 0.22 * radius, 0.15 * radius, angle, wobble=0.1) < 1
  labels[stomach] = 3
  uv0 = c - back * 0.75 * radius + side * 0.1 * radius
  uv = segment_distance(cv, uv0, c - back * 0.05 * radius + side * 0.25 * radius) < cv.px(0.012)
  labels[uv & (rho < 0.86)] = 4
  ao_c = c + back * 0.45 * radius - side * 0.1 * radius
  w, ao = ellipse_at(cv, ao_c[0], ao_c[1], 0.07 * radius, 0.07 * radius)
  labels[w][ao < 1] = 1
  for _ in range(int(rng.integers(2, 5))):  # echogenic bowel specks away from the liver
    p = c + back * rng.uniform(-0.1, 0.4) * radius - side * rng.uniform(0.0, 0.5) * radius
    w, r = ellipse_at(cv, p[0], p[1], cv.px(0.01), cv.px(0.008), rng.uniform(0, 3))
    keep = (r < 1) & (labels[w] == 0)
    echo[w][keep] = 6.0
  fluid = (labels == 1) | (labels == 3) | (labels == 4)
  echo[fluid] = FLUID_DB
  atten[fluid] = FLUID_ATTEN
  vertebra(cv, echo, atten, c + back * 0.62 * radius, back, cv.px(0.016))
  return labels


def heart_4ch(cv: Canvas, rng, echo, centre, a, b, angle):
  """Fetal four-chamber heart: myocardium around two ventricles (apex side, +u) and two atria, the
  interventricular septum, the atrioventricular valves at the crux and the foramen ovale in the atrial
  septum, inside a bright pericardial line. `angle` points from the base to the apex. Returns the heart."""
  rho = ellipse(cv, centre[0], centre[1], a, b, angle)
  heart = rho < 1
  echo[heart] = MYOCARDIUM_DB + 1.0 * smooth_noise(cv, rng, 20)[heart]
  echo[(rho >= 1) & (rho < 1.07)] = 9.0  # pericardium
  u = np.array([math.cos(angle), math.sin(angle)], np.float32)
  v = np.array([-u[1], u[0]], np.float32)
  c = np.asarray(centre, np.float32)
  septum = cv.px(0.006) + 0.5
  for sv in (-1, 1):
    scale = rng.uniform(0.9, 1.1, 2)
    for su, (ca, cb, la, lb) in ((1, (0.32, 0.43, 0.5, 0.34)), (-1, (0.5, 0.4, 0.3, 0.34))):
      p = c + su * ca * a * u + sv * cb * b * v
      w, r = ellipse_at(cv, p[0], p[1], la * a * scale[0], lb * b * scale[1], angle)
      inside = (r < 1) & (rho[w] < 0.8)
      echo[w][inside] = BLOOD_DB
  # septa and atrioventricular valves (the crux): a cross of myocardium, the atrial septum open at the foramen
  along = (cv.xx - c[0]) * u[0] + (cv.yy - c[1]) * u[1]
  across = (cv.xx - c[0]) * v[0] + (cv.yy - c[1]) * v[1]
  cross = heart & (rho < 0.85) & ((np.abs(across) < septum) | (np.abs(along + 0.15 * a) < septum * 0.8))
  foramen = (along < -0.3 * a) & (along > -0.55 * a)
  echo[cross & ~foramen] = MYOCARDIUM_DB + 6.0
  return heart


def thorax(cv: Canvas, rng, echo, atten, c, r):
  """Fetal thorax at the four-chamber plane: skin, echogenic lungs, ribs with shadows, a vertebra, the
  descending aorta in front of it and the heart in the anterior left, its apex pointing about 45 degrees off
  the antero-posterior axis, filling about a third of the chest. Returns the heart."""
  angle = rng.uniform(0, 2 * math.pi)
  rho = body_outline(cv, rng, echo, c, r, r * rng.uniform(0.9, 1.0), angle)
  lungs = rho < 0.9
  echo[lungs] = LUNG_DB + 1.0 * smooth_noise(cv, rng, 16)[lungs]
  back = np.array([math.cos(angle), math.sin(angle)], np.float32)
  left = np.array([-back[1], back[0]], np.float32) * rng.choice([-1.0, 1.0])
  for k in (-1, 1):
    rib_dir = np.array([math.cos(angle + k * 1.1), math.sin(angle + k * 1.1)], np.float32)
    rib = segment_distance(cv, c + 0.8 * r * rib_dir, c + 0.95 * r * rib_dir) < cv.px(0.008)
    echo[rib] = BONE_DB
    atten[rib] = BONE_ATTEN
  vertebra(cv, echo, atten, c + 0.62 * r * back, back, cv.px(0.016))
  ao = c + 0.42 * r * back + 0.15 * r * left
  w, rr = ellipse_at(cv, ao[0], ao[1], 0.07 * r, 0.07 * r)
  echo[w][rr < 1] = BLOOD_DB
  hc = c - 0.12 * r * back + 0.1 * r * left
  apex = -back * math.cos(math.pi / 4) + left * math.sin(math.pi / 4)
  axis = math.atan2(apex[1], apex[0]) + rng.uniform(-0.25, 0.25)
  return heart_4ch(cv, rng, echo, hc, 0.5 * r, 0.4 * r, axis)
