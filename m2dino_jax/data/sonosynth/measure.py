"""Measurements of images against their labels: is every labelled border visible? Can a classifier tell the
classes apart without the anatomy (the shortcut measure, at the end)? (used by the realism and shortcut tests and
`m2dino bench sonosynth`; `border_cnr`, `global_features` and `shortcut_accuracy` work on any labelled images,
simulated or real).

Border contrast-to-noise ratio (CNR) of a labelled class c against a neighbouring label n (background 0
included), on the grey levels as displayed (speckle included):
  inner band = pixels of class c at most `band` pixels from the nearest pixel of label n,
  outer band = pixels of label n at most `band` pixels from the nearest pixel of class c,
both inside the imaged field. n is a neighbour when c and n touch (8-connectivity) and both bands hold at
least `min_pixels` pixels.

- `border_cnr_global`: |mean(inner) - mean(outer)| / sqrt(var(inner) + var(outer)) over the whole border.
  A neighbour label that is brighter on one side and darker on another (background 0 is often both: a
  myocardium has dark right-ventricular blood beside its septum and a bright pericardium beside its
  lateral wall) averages its contrasts away, so this one understates borders a reader sees.
- `border_cnr` (the measure the targets use): the same, locally. The border is cut into tiles of
  `tile` x `tile` pixels (8 bands); in each tile holding both sides the mean difference is taken, then
  CNR = (pixel-weighted mean of |mean(inner) - mean(outer)| over tiles) / sqrt(mean within-tile var(inner)
  + mean within-tile var(outer)). Speckle alone (no true contrast) reads about 0.2 on it; 0.8 is a border
  a reader can trace all round, 1.5 a sharp one.

A class's border CNR is its smallest over its neighbours: every labelled border must be visible, not only
the easy side.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), bool)


def default_band(size: int) -> int:
  """Band width in pixels: 4 at 256 px, at least 2."""
  return max(2, int(round(size / 64)))


def pair_bands(mask: np.ndarray, cls: int, other: int, fov: np.ndarray | None = None, band: int | None = None):
  """(inner, outer): pixels of `cls` within `band` of `other`, and pixels of `other` within `band` of `cls`."""
  band = default_band(mask.shape[0]) if band is None else band
  fov = np.ones(mask.shape, bool) if fov is None else fov
  a, b = mask == cls, mask == other
  near_b = ndimage.distance_transform_edt(~b) <= band
  near_a = ndimage.distance_transform_edt(~a) <= band
  return a & near_b & fov, b & near_a & fov


def _pairs(mask, min_pixels, fov, band):
  """Yields (cls, other, inner, outer) for every touching pair whose bands are large enough."""
  for cls in (int(c) for c in np.unique(mask) if c != 0):
    touching = np.unique(mask[ndimage.binary_dilation(mask == cls, _EIGHT) & (mask != cls)])
    for other in (int(n) for n in touching):
      inner, outer = pair_bands(mask, cls, other, fov, band)
      if inner.sum() >= min_pixels and outer.sum() >= min_pixels:
        yield cls, other, inner, outer


def _global(img, inner, outer, band) -> float:
  a, b = img[inner], img[outer]
  return float(abs(a.mean() - b.mean()) / np.sqrt(a.var() + b.var() + 1e-12))


def _local(img, inner, outer, band, tile=None, min_pixels=None) -> float:
  tile = 8 * band if tile is None else tile
  min_pixels = band * band if min_pixels is None else min_pixels
  h, w = img.shape
  nx = -(-w // tile)
  ids = (np.arange(h)[:, None] // tile) * nx + (np.arange(w)[None, :] // tile)
  n_tiles = -(-h // tile) * nx

  def stats(region):
    i, v = ids[region], img[region]
    n = np.bincount(i, minlength=n_tiles).astype(np.float64)
    s = np.bincount(i, v, minlength=n_tiles)
    ss = np.bincount(i, v * v, minlength=n_tiles)
    mean = s / np.maximum(n, 1)
    return n, mean, ss / np.maximum(n, 1) - mean ** 2

  n_a, m_a, v_a = stats(inner)
  n_b, m_b, v_b = stats(outer)
  ok = (n_a >= min_pixels) & (n_b >= min_pixels)
  if not ok.any():
    return float("nan")
  n_a, m_a, v_a, n_b, m_b, v_b = (x[ok] for x in (n_a, m_a, v_a, n_b, m_b, v_b))
  contrast = np.sum((n_a + n_b) * np.abs(m_a - m_b)) / np.sum(n_a + n_b)
  noise = np.sqrt(np.sum(n_a * v_a) / n_a.sum() + np.sum(n_b * v_b) / n_b.sum())
  return float(contrast / (noise + 1e-12))


def border_cnr_pairs(image, mask, fov=None, band=None, min_pixels=None, local=True) -> dict[tuple[int, int], float]:
  """CNR of every (class, neighbour) border in `mask` (classes > 0; neighbours include 0), see the docstring."""
  img = np.asarray(image, np.float64)
  band = default_band(mask.shape[0]) if band is None else band
  min_pixels = band * band if min_pixels is None else min_pixels
  fn = _local if local else _global
  return {(c, n): fn(img, inner, outer, band) for c, n, inner, outer in _pairs(mask, min_pixels, fov, band)}


def _per_class(pairs, mask):
  out = {}
  for cls in (int(c) for c in np.unique(mask) if c != 0):
    vals = [v for (c, _), v in pairs.items() if c == cls and np.isfinite(v)]
    out[cls] = min(vals) if vals else float("nan")
  return out


def border_cnr(image, mask, fov=None, band=None, min_pixels=None) -> dict[int, float]:
  """Per class (> 0): the smallest local border CNR over its neighbours (NaN when no border is long enough)."""
  return _per_class(border_cnr_pairs(image, mask, fov, band, min_pixels, local=True), mask)


def border_cnr_global(image, mask, fov=None, band=None, min_pixels=None) -> dict[int, float]:
  """Per class (> 0): the smallest whole-border CNR over its neighbours (see the module docstring)."""
  return _per_class(border_cnr_pairs(image, mask, fov, band, min_pixels, local=False), mask)


# ---- shortcut measure: can a classifier tell the classes apart without looking at anatomy? -----------------
#
# A classification scene is a caricature when its classes differ in image-wide statistics (one class darker
# overall, another with a black lower half): a network then learns the shortcut, not the anatomy. The measure:
# features of each image that carry no anatomy, its grey-level histogram inside the imaged field (`bins` bins
# over 0..255, as fractions) and the mean grey level of `bands` equal depth (row) bands of the field, and the
# stratified k-fold cross-validated accuracy of a standardised logistic regression on them, next to chance
# (1 / classes). Anatomy in context keeps it near chance: the classes share their field and differ in which
# structure is the subject.

SHORTCUT_BINS = 32
SHORTCUT_BANDS = 16
SHORTCUT_FRACTION = 2 / 3  # the bound: of the gap from chance to perfect, a shortcut classifier may close this much


def shortcut_bound(chance: float) -> float:
  """chance + SHORTCUT_FRACTION * (1 - chance): the most a global-statistics classifier may reach (the reasons are
  in tests/test_sonosynth_shortcuts.py)."""
  return chance + SHORTCUT_FRACTION * (1.0 - chance)


def global_features(image: np.ndarray, fov: np.ndarray, bins: int = SHORTCUT_BINS,
                    bands: int = SHORTCUT_BANDS) -> np.ndarray:
  """[bins + bands] float64: the histogram of the uint8 grey levels inside `fov` (fractions, `bins` equal bins
  over 0..255) and the mean grey level inside `fov` of each of `bands` equal row bands (0 where a band holds no
  field pixel)."""
  img = np.asarray(image)
  h = img.shape[0]
  vals = img[fov].astype(np.int64)
  hist = np.bincount(vals * bins // 256, minlength=bins)[:bins] / max(vals.size, 1)
  band = (np.arange(h) * bands // h)[:, None] * np.ones(img.shape[1], np.int64)[None, :]
  n = np.bincount(band[fov], minlength=bands)
  s = np.bincount(band[fov], img[fov].astype(np.float64), minlength=bands)
  return np.concatenate([hist, s / np.maximum(n, 1)])


def shortcut_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> float:
  """Stratified `folds`-fold cross-validated accuracy of a standardised logistic regression (scikit-learn,
  fixed seed) predicting `labels` from `features` [n, f]."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import StratifiedKFold, cross_val_score
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
  cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
  return float(cross_val_score(model, np.asarray(features, np.float64), np.asarray(labels), cv=cv).mean())


def task_shortcut(task_name: str, per_class: int = 48, size: int = 128, seed: int = 0) -> dict:
  """The shortcut measure of a simulated classification task: `per_class` images per class at `size` px
  (samples 0 .. classes * per_class - 1: balanced), their `global_features` and `shortcut_accuracy`.
  Returns {'accuracy', 'chance', 'images'}."""
  from m2dino_jax.data.sonosynth import generator, physics, scenes
  from m2dino_jax.tasks import registry
  task = registry.get(task_name)
  fov = physics.geometry(scenes.SPECS[task.name].probe, size, size).fov
  feats, labels = [], []
  for i in range(task.num_classes * per_class):
    rec = generator.sample(task.name, i, seed=seed, size=size)
    feats.append(global_features(rec.image, fov))
    labels.append(rec.label)
  return {"accuracy": shortcut_accuracy(np.stack(feats), np.asarray(labels)), "chance": 1.0 / task.num_classes,
          "images": len(labels)}
