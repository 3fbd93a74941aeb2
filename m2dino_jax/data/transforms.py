"""Target-consistent image transforms, looked up by name, that turn a Record into a model-ready example.

A pipeline is a list of spec strings, big_vision style: `"letterbox"`, `"affine(rotate=30, p=0.5)"`,
`"gamma(range=(0.7, 1.5))"`, `"normalize"`. `Pipeline(specs, image_size, channels)` builds them and
`pipeline(record, rng)` returns the `records.EXAMPLE_KEYS` dict (plus 'valid').

Geometry is lazy: geometric transforms (resize / letterbox / affine / flip) only compose a 3x3 matrix
that maps source pixel coordinates to output pixel coordinates, and the image is resampled ONCE
(bilinear; mask nearest) when the first pixel transform or the end needs it. Boxes and points go
through the same matrix, so targets cannot drift from the image. Coordinates are continuous: pixel
(row i, col j) covers [j, j+1) x [i, i+1). Geometric transforms must come before pixel transforms.

Random transforms draw only from the per-example `np.random.Generator` they are given, so an example
is a pure function of (record, seed) whatever the worker count.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from m2dino_jax.data import records
from m2dino_jax.errors import ConfigError
from m2dino_jax.tasks import registry

# UltraDINO normalisation of [0, 1] grey ultrasound (REFERENCE.md: mean/std x 255 on uint8).
ULTRADINO_MEAN = 0.1842924807
ULTRADINO_STD = 0.2187705424
# Downscales stronger than this are pre-resized with PIL's antialiasing filter before the warp.
_PRESCALE_BELOW = 0.7


@dataclasses.dataclass
class Work:
  """An example in flight: the source pixels, the composed geometry and (once realised) the output."""
  src: np.ndarray  # uint8 [H0, W0] or [H0, W0, 3] (or float32 [H0, W0] in [0, 1])
  task: str
  label: int
  mask: np.ndarray | None  # source mask until realised, then output mask
  box: np.ndarray | None  # source pixels
  points: np.ndarray | None  # source pixels
  matrix: np.ndarray  # 3x3, source coords -> output coords
  size: tuple[int, int]  # output (H, W)
  image: np.ndarray | None = None  # float32 [H, W] or [H, W, 3] in [0, 1] once realised

  @property
  def orig_size(self) -> tuple[int, int]:
    return self.src.shape[0], self.src.shape[1]


# ----------------------------------------------------------------------------- geometry helpers


def _translate(tx, ty):
  return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)


def _scale(sx, sy):
  return np.diag([sx, sy, 1.0])


def canvas_matrix(orig_size: Sequence[int], image_size: int, mode: str = "letterbox") -> np.ndarray:
  """Matrix mapping source pixel coords of an (H, W) image to the square canvas of `image_size`.

  'resize' stretches to the square; 'letterbox' keeps the aspect ratio and centres the image
  with zero padding. The evaluator inverts this to map predictions back to original pixels.
  """
  h, w = float(orig_size[0]), float(orig_size[1])
  if mode == "resize":
    return _scale(image_size / w, image_size / h)
  if mode == "letterbox":
    s = image_size / max(h, w)
    return _translate((image_size - w * s) / 2, (image_size - h * s) / 2) @ _scale(s, s)
  raise ConfigError("transforms", f"unknown canvas mode '{mode}'; use 'resize' or 'letterbox'")


def apply_matrix(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
  """Applies a 3x3 affine matrix to [N, 2] (x, y) points."""
  xy = np.asarray(xy, np.float64)
  return xy @ matrix[:2, :2].T + matrix[:2, 2]


def transform_box(matrix: np.ndarray, box, size: tuple[int, int]) -> np.ndarray:
  """Bounds of the four transformed corners of (x0, y0, x1, y1), clipped to the (H, W) canvas."""
  x0, y0, x1, y1 = np.asarray(box, np.float64)
  corners = apply_matrix(matrix, np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]))
  lo, hi = corners.min(0), corners.max(0)
  h, w = size
  return np.array([np.clip(lo[0], 0, w), np.clip(lo[1], 0, h), np.clip(hi[0], 0, w), np.clip(hi[1], 0, h)])


def points_to_original(points01, orig_size, image_size: int, mode: str = "letterbox") -> np.ndarray:
  """Normalised [0, 1] canvas points (as the model predicts them) -> original-image pixels."""
  inv = np.linalg.inv(canvas_matrix(orig_size, image_size, mode))
  return apply_matrix(inv, np.asarray(points01, np.float64) * image_size)


def mask_to_original(mask: np.ndarray, orig_size, mode: str = "letterbox") -> np.ndarray:
  """A square canvas mask (class map) -> the (H, W) original-image grid, nearest neighbour."""
  back = np.linalg.inv(canvas_matrix(orig_size, mask.shape[0], mode))  # canvas -> original
  return _warp(mask.astype(np.uint8), back, (int(orig_size[0]), int(orig_size[1])), Image.NEAREST)


def _warp(arr: np.ndarray, matrix: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
  """Resamples `arr` so that output pixel p shows source point matrix^-1 p (PIL: pixel centres at +0.5)."""
  inv = np.linalg.inv(matrix)
  coeffs = tuple(inv[:2].ravel().tolist())
  if arr.dtype == np.uint8:
    out = Image.fromarray(arr).transform((size[1], size[0]), Image.AFFINE, coeffs, resample=resample)
    return np.asarray(out)
  chans = arr[..., None] if arr.ndim == 2 else arr
  outs = [np.asarray(Image.fromarray(np.ascontiguousarray(chans[..., c], np.float32), "F").transform(
      (size[1], size[0]), Image.AFFINE, coeffs, resample=resample)) for c in range(chans.shape[-1])]
  return outs[0] if arr.ndim == 2 else np.stack(outs, -1)


def realise(work: Work) -> Work:
  """Resamples image and mask through the composed matrix (once); a no-op when already done."""
  if work.image is not None:
    return work
  src, matrix = work.src, work.matrix
  if src.ndim == 3 and src.shape[2] == 1:
    src = src[..., 0]
  scale = math.sqrt(abs(np.linalg.det(matrix[:2, :2])))
  if scale < _PRESCALE_BELOW and src.dtype == np.uint8:
    # Antialias strong downscales: PIL's resize filter widens with the scale factor; the warp's
    # bilinear sampling alone would alias the speckle.
    h, w = src.shape[:2]
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    src = np.asarray(Image.fromarray(src).resize((nw, nh), Image.BILINEAR))
    matrix = matrix @ np.linalg.inv(_scale(nw / w, nh / h))
  img = _warp(src, matrix, work.size, Image.BILINEAR)
  work.image = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
  if work.mask is not None:
    work.mask = _warp(np.asarray(work.mask, np.uint8), work.matrix, work.size, Image.NEAREST)
  return work


# ----------------------------------------------------------------------------- the registry

_REGISTRY: dict[str, Callable[..., Transform]] = {}


def register(name: str):
  def deco(cls):
    _REGISTRY[name] = cls
    return cls
  return deco


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


class Transform:
  """Base: `geometric` transforms edit work.matrix; the others edit realised pixels."""
  geometric = False

  def __call__(self, work: Work, rng: np.random.Generator) -> Work:
    raise NotImplementedError


def _coin(rng: np.random.Generator, p: float) -> bool:
  return p >= 1 or rng.random() < p


def _uniform(rng, lo_hi) -> float:
  lo, hi = lo_hi
  return float(rng.uniform(lo, hi))


@register("resize")
class Resize(Transform):
  """Stretch to the square canvas (aspect ratio not kept)."""
  geometric = True
  mode = "resize"

  def __init__(self, image_size: int):
    self.image_size = image_size

  def __call__(self, work, rng):
    s = self.image_size
    work.matrix = canvas_matrix(work.size, s, self.mode) @ work.matrix
    work.size = (s, s)
    return work


@register("letterbox")
class Letterbox(Resize):
  """Scale the long side to the canvas, keep the aspect ratio, centre with zero padding."""
  mode = "letterbox"


@register("affine")
class RandomAffine(Transform):
  """Random scale / rotation (degrees) / shear (degrees) / translation (fraction of size) about the centre."""
  geometric = True

  def __init__(self, scale=(0.8, 1.2), rotate=30.0, shear=0.0, translate=0.1, p=0.5):
    self.scale, self.rotate, self.shear, self.translate, self.p = tuple(scale), rotate, shear, translate, p

  def __call__(self, work, rng):
    if not _coin(rng, self.p):
      return work
    s = _uniform(rng, self.scale)
    theta = math.radians(_uniform(rng, (-self.rotate, self.rotate)))
    shear = math.tan(math.radians(_uniform(rng, (-self.shear, self.shear))))
    h, w = work.size
    tx, ty = (rng.uniform(-self.translate, self.translate, size=2) * np.array([w, h])).tolist()
    c, sn = math.cos(theta), math.sin(theta)
    linear = np.array([[c, -sn, 0], [sn, c, 0], [0, 0, 1]]) @ np.array([[1, shear, 0], [0, 1, 0], [0, 0, 1]])
    m = _translate(w / 2 + tx, h / 2 + ty) @ linear @ _scale(s, s) @ _translate(-w / 2, -h / 2)
    work.matrix = m @ work.matrix
    return work


@register("flip")
class HorizontalFlip(Transform):
  """Mirror left-right with probability p, only for tasks whose labels survive it (Task.flip_ok)."""
  geometric = True

  def __init__(self, p=0.5):
    self.p = p

  def __call__(self, work, rng):
    flip = _coin(rng, self.p)  # drawn for every task so the stream of draws does not depend on it
    if flip and (not work.task or registry.get(work.task).flip_ok):
      w = work.size[1]
      work.matrix = np.array([[-1, 0, w], [0, 1, 0], [0, 0, 1]], np.float64) @ work.matrix
    return work


@register("gamma")
class Gamma(Transform):
  """x ** g with g uniform in `range`."""

  def __init__(self, range=(0.7, 1.5), p=0.5):  # noqa: A002 (config keyword)
    self.range, self.p = tuple(range), p

  def __call__(self, work, rng):
    if _coin(rng, self.p):
      g = _uniform(rng, self.range)
      img = realise(work).image
      work.image = np.power(np.clip(img, 0, 1), np.float32(g), dtype=np.float32)
    return work


@register("gain")
class Gain(Transform):
  """Overall gain (x * g, clipped to [0, 1]), like the scanner's gain knob."""

  def __init__(self, range=(0.8, 1.25), p=0.5):  # noqa: A002
    self.range, self.p = tuple(range), p

  def __call__(self, work, rng):
    if _coin(rng, self.p):
      g = _uniform(rng, self.range)
      work.image = np.clip(realise(work).image * np.float32(g), 0, 1)
    return work


@register("intensity")
class Intensity(Transform):
  """Contrast about the image mean (factor in 1 +- contrast) plus a brightness offset (+- brightness)."""

  def __init__(self, contrast=0.3, brightness=0.1, p=0.5):
    self.contrast, self.brightness, self.p = contrast, brightness, p

  def __call__(self, work, rng):
    if _coin(rng, self.p):
      c = _uniform(rng, (1 - self.contrast, 1 + self.contrast))
      b = _uniform(rng, (-self.brightness, self.brightness))
      img = realise(work).image
      mean = np.float32(img.mean())
      work.image = np.clip((img - mean) * np.float32(c) + mean + np.float32(b), 0, 1)
    return work


@register("speckle")
class Speckle(Transform):
  """Multiplicative speckle noise: x * (1 + sigma * n), n ~ N(0, 1), sigma uniform in `sigma`."""

  def __init__(self, sigma=(0.0, 0.15), p=0.5):
    self.sigma, self.p = tuple(sigma), p

  def __call__(self, work, rng):
    if _coin(rng, self.p):
      sigma = np.float32(_uniform(rng, self.sigma))
      img = realise(work).image
      noise = rng.standard_normal(img.shape, dtype=np.float32)
      work.image = np.clip(img * (1 + sigma * noise), 0, 1)
    return work


@register("normalize")
class Normalize(Transform):
  """(x - mean) / std on [0, 1] grey (UltraDINO statistics by default)."""

  def __init__(self, mean=ULTRADINO_MEAN, std=ULTRADINO_STD):
    self.mean, self.std = np.float32(mean), np.float32(std)

  def __call__(self, work, rng):
    work.image = (realise(work).image - self.mean) / self.std
    return work


def parse_spec(spec: str) -> tuple[str, dict]:
  """'name' or 'name(k=v, ...)' with Python literal values -> (name, kwargs)."""
  spec = spec.strip()
  try:
    call = ast.parse(spec if "(" in spec else spec + "()", mode="eval").body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
      raise ValueError("expected name(key=value, ...)")
    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
  except (SyntaxError, ValueError) as e:
    raise ConfigError("transforms", f"cannot parse transform spec '{spec}': {e}") from None
  return call.func.id, kwargs


def build(spec: str, *, image_size: int) -> Transform:
  """One transform from its spec string; unknown names and bad arguments raise ConfigError."""
  name, kwargs = parse_spec(spec)
  if name not in _REGISTRY:
    raise ConfigError("transforms", f"unknown transform '{name}'; known: {', '.join(names())}")
  cls = _REGISTRY[name]
  if issubclass(cls, Resize):
    kwargs.setdefault("image_size", image_size)
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ConfigError("transforms", f"bad arguments in '{spec}': {e}") from None


# ----------------------------------------------------------------------------- record -> example


class Pipeline:
  """A list of specs applied to a Record; `__call__(record, rng)` returns a model-ready example.

  The first transform must set the square canvas (resize / letterbox); geometric transforms may
  not follow pixel transforms (the image is resampled once, when pixels are first needed).
  """

  def __init__(self, specs: Sequence[str], image_size: int, channels: int = 3):
    self.specs = tuple(specs)
    self.image_size, self.channels = int(image_size), int(channels)
    if self.channels not in (1, 3):
      raise ConfigError("channels", f"must be 1 or 3, got {channels}")
    self.transforms = [build(s, image_size=self.image_size) for s in self.specs]
    if not self.transforms or not isinstance(self.transforms[0], Resize):
      raise ConfigError("transforms", f"the first transform must be resize or letterbox, got {self.specs}")
    seen_pixel = False
    for spec, t in zip(self.specs, self.transforms):
      if t.geometric and seen_pixel:
        raise ConfigError("transforms", f"geometric transform '{spec}' follows a pixel transform in "
                          f"{list(self.specs)}; put resize/letterbox/affine/flip first")
      seen_pixel |= not t.geometric

  @property
  def canvas_mode(self) -> str:
    return self.transforms[0].mode

  def __call__(self, rec: records.Record, rng: np.random.Generator | None = None) -> dict:
    rng = rng if rng is not None else np.random.default_rng(0)
    work = Work(src=np.asarray(rec.image), task=rec.task, label=int(rec.label), mask=rec.mask,
                box=rec.box, points=rec.points, matrix=np.eye(3), size=tuple(np.shape(rec.image)[:2]))
    for t in self.transforms:
      work = t(work, rng)
    return to_example(realise(work), self.channels)


def _to_channels(img: np.ndarray, channels: int) -> np.ndarray:
  if img.ndim == 2:
    img = img[..., None]
  if img.shape[-1] == channels:
    return img
  if channels == 3:
    return np.repeat(img, 3, axis=-1)
  return (img @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]  # RGB -> grey (luma)


def to_example(work: Work, channels: int) -> dict:
  """The records.py model-ready layout; every key present whatever the task (one pytree structure)."""
  h, w = work.size
  scale = np.array([w, h], np.float64)
  task = registry.BY_NAME.get(work.task)
  mask = np.zeros((h, w), np.uint8) if work.mask is None else np.asarray(work.mask, np.uint8)
  box = np.zeros(4, np.float32)
  if work.box is not None:
    box = (transform_box(work.matrix, work.box, work.size) / np.tile(scale, 2)).astype(np.float32)
  points = np.zeros((records.MAX_POINTS, 2), np.float32)
  if work.points is not None:
    p = np.asarray(work.points, np.float64).reshape(-1, 2)
    points[:len(p)] = np.clip(apply_matrix(work.matrix, p) / scale, 0, 1)
  return {
      "image": np.ascontiguousarray(_to_channels(work.image, channels), np.float32),
      "task_id": np.int32(task.task_id if task else -1),
      "label": np.int32(work.label),
      "mask": mask,
      "box": box,
      "points": points,
      "orig_size": np.array(work.orig_size, np.int32),
      "valid": np.bool_(True),
  }


def padding_example(example: dict) -> dict:
  """An all-zero example shaped like `example`, marked valid=False (pads the last eval batch)."""
  out = {k: np.zeros_like(v) for k, v in example.items()}
  out["label"] = np.int32(-1)
  out["task_id"] = example["task_id"]
  out["valid"] = np.bool_(False)
  return out
