"""Opt-in nuisances of real ultrasound datasets: what scanners and sonographers add to the images.

    generator.sample("fetal_femur", 0, seed=0, nuisance=("gain", "tgc", "text", "jpeg"))

- gain: the overall gain knob, -8..+8 dB on the displayed echo (before log compression).
- tgc:  a bank of 8 TGC sliders, -6..+6 dB each, interpolated over depth.
- crop: the saved frame is a zoomed part of the field (80-100% of the side, a random offset that keeps the
        label inside), resized back to the output size; masks, boxes and points follow it exactly.
- text: burnt-in annotations (gestational age, frequency, gain, frame rate, a date) in the top corners and
        depth-scale ticks along the right edge.
- calipers: measurement calipers as a sonographer leaves them: '+' marks, joined by a dotted line, ON the
        measured structure (the landmarks, the ends of a box or mask's long axis). They leak the label, as
        they do in real data; never on by default.
- jpeg: lossy export at quality 30..90 (8x8 blocks, ringing).

All are off by default: `sample` is unchanged unless asked. They draw from their own random stream, so the
scene and the speckle stay those of the plain sample.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from m2dino_jax.data.records import Record
from m2dino_jax.errors import ConfigError

NUISANCES = ("gain", "tgc", "crop", "text", "calipers", "jpeg")


def parse(spec) -> tuple[str, ...]:
  """'gain,jpeg' / ['gain', 'jpeg'] / None -> a validated tuple in canonical order ('all' = every one)."""
  if spec is None:
    return ()
  items = spec.split(",") if isinstance(spec, str) else [s for item in spec for s in str(item).split(",")]
  names = {s.strip() for s in items if s.strip()}
  if "all" in names:
    names = (names - {"all"}) | set(NUISANCES)
  unknown = sorted(names - set(NUISANCES))
  if unknown:
    raise ConfigError("nuisance", f"unknown nuisance {', '.join(map(repr, unknown))}; known: {', '.join(NUISANCES)}")
  return tuple(n for n in NUISANCES if n in names)


def gain_map(names, rng, depth_mm: np.ndarray) -> np.ndarray | None:
  """The operator's gain (dB, per pixel) for 'gain' and 'tgc', or None when neither is asked for."""
  if "gain" not in names and "tgc" not in names:
    return None
  out = np.zeros(depth_mm.shape, np.float32)
  if "gain" in names:
    out += np.float32(rng.uniform(-8.0, 8.0))
  if "tgc" in names:
    knots = np.linspace(0.0, float(depth_mm.max()), 8)
    out += np.interp(depth_mm, knots, rng.uniform(-6.0, 6.0, 8)).astype(np.float32)
  return out


def apply(rec: Record, names, rng, fov: np.ndarray) -> Record:
  """The post-display nuisances (crop, text, calipers, jpeg) applied to a record, labels kept consistent."""
  if "crop" in names:
    rec = _crop(rec, rng)
  if "text" in names or "calipers" in names:
    img = Image.fromarray(rec.image)
    draw = ImageDraw.Draw(img)
    if "calipers" in names:
      _calipers(draw, rec, rng)
    if "text" in names:
      _text(draw, rec.image.shape[0], rng, fov)
    rec.image = np.asarray(img, np.uint8).copy()
  if "jpeg" in names:
    buf = io.BytesIO()
    Image.fromarray(rec.image).save(buf, format="JPEG", quality=int(rng.integers(30, 91)))
    rec.image = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"), np.uint8).copy()
  rec.extra["nuisance"] = list(names)
  return rec


def _label_extent(rec: Record, size: int):
  """(x0, y0, x1, y1) continuous bounds the crop must keep (the whole image when there is no spatial label)."""
  if rec.points is not None:
    p = np.asarray(rec.points, np.float64)
    return p[:, 0].min() - 2, p[:, 1].min() - 2, p[:, 0].max() + 2, p[:, 1].max() + 2
  if rec.box is not None:
    return tuple(float(v) for v in rec.box)
  if rec.mask is not None and (rec.mask > 0).any():
    ys, xs = np.nonzero(rec.mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
  return size * 0.3, size * 0.3, size * 0.7, size * 0.7


def _crop(rec: Record, rng) -> Record:
  size = rec.image.shape[0]
  x0, y0, x1, y1 = _label_extent(rec, size)
  side = max(rng.uniform(0.8, 1.0) * size, x1 - x0 + 2, y1 - y0 + 2)
  side = min(side, size)
  ox = rng.uniform(max(0.0, x1 - side), max(0.0, min(x0, size - side)) + 1e-6)
  oy = rng.uniform(max(0.0, y1 - side), max(0.0, min(y0, size - side)) + 1e-6)
  ox, oy = min(max(ox, 0.0), size - side), min(max(oy, 0.0), size - side)
  box = (ox, oy, ox + side, oy + side)
  scale = size / side
  rec.image = np.asarray(Image.fromarray(rec.image).resize((size, size), Image.BILINEAR, box=box), np.uint8)
  if rec.mask is not None:
    rec.mask = np.asarray(Image.fromarray(rec.mask).resize((size, size), Image.NEAREST, box=box), np.uint8)
  if rec.points is not None:
    rec.points = ((np.asarray(rec.points, np.float64) - [ox, oy]) * scale).astype(np.float32)
  if rec.box is not None:
    b = (np.asarray(rec.box, np.float64) - [ox, oy, ox, oy]) * scale
    rec.box = np.clip(b, 0, size).astype(np.float32)
  if rec.spacing_mm is not None:
    rec.spacing_mm = tuple(float(s) / scale for s in rec.spacing_mm)
  rec.extra["crop_box"] = [float(v) for v in box]  # (x0, y0, x1, y1) of the saved frame in the simulated one
  return rec


def _caliper_points(rec: Record, rng):
  """Where a sonographer's calipers sit: the landmarks, the ends of a box's or a mask's long axis."""
  if rec.points is not None:
    return [tuple(p) for p in np.asarray(rec.points, np.float64)]
  if rec.box is not None:
    x0, y0, x1, y1 = (float(v) for v in rec.box)
    if x1 - x0 >= y1 - y0:
      return [(x0, (y0 + y1) / 2), (x1, (y0 + y1) / 2)]
    return [((x0 + x1) / 2, y0), ((x0 + x1) / 2, y1)]
  if rec.mask is not None and (rec.mask > 0).any():
    ys, xs = np.nonzero(rec.mask)
    pts = np.stack([xs, ys], 1).astype(np.float64) + 0.5
    c = pts.mean(0)
    u, _, _ = np.linalg.svd(np.cov((pts - c).T))
    t = (pts - c) @ u[:, 0]
    return [tuple(pts[np.argmin(t)]), tuple(pts[np.argmax(t)])]
  size = rec.image.shape[0]
  c = rng.uniform(0.3, 0.7, 2) * size
  d = rng.uniform(0.05, 0.15) * size
  return [(c[0] - d, c[1]), (c[0] + d, c[1])]


def _calipers(draw: ImageDraw.ImageDraw, rec: Record, rng):
  pts = [(int(np.floor(x)), int(np.floor(y))) for x, y in _caliper_points(rec, rng)]  # the pixels they lie in
  arm = max(2, rec.image.shape[0] // 64)
  grey = int(rng.integers(200, 256))
  for a, b in zip(pts[:-1], pts[1:]):
    n = int(np.hypot(b[0] - a[0], b[1] - a[1]) // 4)
    for k in range(1, n):  # dotted measurement line
      t = k / n
      x, y = a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])
      draw.point((x, y), fill=grey)
  for x, y in pts:
    draw.line([(x - arm, y), (x + arm, y)], fill=grey)
    draw.line([(x, y - arm), (x, y + arm)], fill=grey)


def _text(draw: ImageDraw.ImageDraw, size: int, rng, fov: np.ndarray):
  grey = int(rng.integers(180, 256))
  lines_left = [f"GA {rng.integers(12, 40)}w{rng.integers(0, 7)}d", f"{rng.choice([2.5, 3.5, 5.0, 7.5])}MHz",
                f"Gn {rng.integers(40, 80)}"]
  lines_right = [f"FR {rng.integers(15, 60)}Hz", f"DR {rng.integers(50, 70)}",
                 f"20{rng.integers(10, 25)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"]
  keep = int(rng.integers(1, 4))
  for k, line in enumerate(lines_left[:keep]):
    draw.text((2, 2 + 11 * k), line, fill=grey)
  for k, line in enumerate(lines_right[:keep]):
    draw.text((size - 6 * len(line) - 2, 2 + 11 * k), line, fill=grey)
  cols = np.flatnonzero(fov.any(axis=0))
  x = int(min(size - 3, cols.max() + 2)) if cols.size else size - 3
  step = max(4, size // 16)
  for y in range(step, size - 2, step):  # depth scale ticks
    draw.line([(x - (3 if (y // step) % 2 else 1), y), (x, y)], fill=grey)
