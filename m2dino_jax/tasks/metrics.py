"""The FMC_UIA challenge's official metrics, computed on the host in NumPy / SciPy.

Definitions follow the challenge's `evaluate.py` (which the M2DINO paper also uses); all inputs are in
the ORIGINAL image's pixel space.

Segmentation (masks of class ids, [H, W]):
  For every image and every non-background class c, Dice and the full Hausdorff distance (HD, the
  maximum of the two directed distances between the pixel sets `pred == c` and `target == c`, computed by
  SimpleITK's HausdorffDistanceImageFilter as the official script does; not HD95) in pixels, or in physical units when a
  spacing (row, col) is given. A task's `dice` / `hd` is the mean over images per class, then the mean
  over the non-background classes. Empty-mask conventions, per image and class:
    both empty        -> Dice 1, HD 0;
    exactly one empty -> Dice 0, HD = the image diagonal (sqrt(H^2 + W^2), spacing-scaled).
Classification (probabilities [C], integer label):
  predicted class = argmax of the probabilities (or the class given with the example, as the official
  script reads `predicted_class`); `accuracy`; `f1_macro`, `f1_weighted` and `mcc` from scikit-learn as
  the official script calls them (sklearn's default label set, zero_division=0); `auc`: binary tasks use
  the probability of class 1 (roc_auc_score(y, p[:, 1])), multiclass tasks the macro one-vs-rest AUC.
  AUC conventions (`convention=`): the challenge pins scikit-learn 1.2.2, whose roc_auc_score raises when
  the labels hold one class only or a multiclass task misses a class; the official script then reports
  AUC 0.0. 'official' reproduces that 0.0; 'default' reports NaN there ("n/a": undefined, not "worst").
  Elsewhere both equal scikit-learn.
Detection (one box per image, xyxy pixels): `iou`, the mean over images of the box IoU. 'default' clamps
  widths and heights at 0, so a malformed predicted box (x_max < x_min) scores 0; 'official' keeps the
  official script's unclamped box areas. A zero-area union scores 0 in both.
Regression (landmarks [K, 2] pixels): `mre`, the mean radial error: the Euclidean distance per point,
  averaged over points and then over images.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk
from sklearn import metrics as skm

from m2dino_jax.tasks import registry

# 'default': undefined metrics are NaN (the report prints "n/a"); 'official': the challenge's numbers.
CONVENTIONS = ("default", "official")
CONVENTION_NOTE = {
    "default": "AUC n/a where undefined (one class in the labels, or a class missing); the official script "
               "scores 0.0 there",
    "official": "as the official evaluate.py: AUC 0.0 where undefined, unclamped box areas",
}

# Every metric and whether higher is better; the report uses this to sign its deltas.
HIGHER_IS_BETTER: dict[str, bool] = {
    "dice": True, "hd": False,
    "auc": True, "accuracy": True, "f1_macro": True, "f1_weighted": True, "mcc": True,
    "iou": True, "mre": False,
}
METRICS_BY_TYPE: dict[str, tuple[str, ...]] = {
    registry.SEGMENTATION: ("dice", "hd"),
    registry.CLASSIFICATION: ("auc", "accuracy", "f1_macro", "f1_weighted", "mcc"),
    registry.DETECTION: ("iou",),
    registry.REGRESSION: ("mre",),
}


def primary_metric(task_type: str) -> tuple[str, bool]:
  """The headline metric of a task type and whether higher is better (seg dice, cls auc, det iou, reg mre);
  an unknown type is registry.unknown_type's ConfigError."""
  if task_type not in METRICS_BY_TYPE:
    raise registry.unknown_type(task_type)
  name = METRICS_BY_TYPE[task_type][0]
  return name, HIGHER_IS_BETTER[name]


# ------------------------------------------------------------------------------------------ segmentation

def dice(pred: np.ndarray, target: np.ndarray) -> float:
  """Dice of two boolean masks; 1 when both are empty."""
  pred, target = np.asarray(pred, bool), np.asarray(target, bool)
  total = int(pred.sum()) + int(target.sum())
  if total == 0:
    return 1.0
  return 2.0 * int(np.logical_and(pred, target).sum()) / total


def hausdorff(pred: np.ndarray, target: np.ndarray, spacing=None) -> float:
  """Full (max) Hausdorff distance between the foreground pixel sets of two boolean masks.

  Both empty -> 0; one empty -> the image diagonal. `spacing` is per array axis (row, col); pixels if None.
  """
  pred, target = np.asarray(pred, bool), np.asarray(target, bool)
  spacing = np.ones(pred.ndim) if spacing is None else np.asarray(spacing, float)
  has_pred, has_target = pred.any(), target.any()
  if not has_pred and not has_target:
    return 0.0
  if not (has_pred and has_target):
    return float(np.sqrt(np.sum((np.asarray(pred.shape) * spacing) ** 2)))
  # Both sets lie inside the bounding box of their union, so distances computed on that crop are exact.
  box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in _bounds(pred | target))
  a, b = (sitk.GetImageFromArray(m[box].astype(np.uint8)) for m in (pred, target))
  for img in (a, b):
    img.SetSpacing([float(x) for x in spacing[::-1]])  # SimpleITK spacing is (x, y) = (col, row)
  f = sitk.HausdorffDistanceImageFilter()
  f.Execute(a, b)
  return float(f.GetHausdorffDistance())


def _bounds(mask: np.ndarray) -> list[tuple[int, int]]:
  """Per axis, the first and last index where `mask` has a True value (mask must not be empty)."""
  out = []
  for axis in range(mask.ndim):
    other = tuple(a for a in range(mask.ndim) if a != axis)
    idx = np.flatnonzero(np.any(mask, axis=other))
    out.append((idx[0], idx[-1]))
  return out


def segmentation_scores(pred: np.ndarray, target: np.ndarray, num_classes: int, spacing=None):
  """Per-class (Dice, HD) arrays for classes 1..num_classes-1 of one image's integer masks."""
  pred, target = np.asarray(pred), np.asarray(target)
  if pred.shape != target.shape:
    raise ValueError(f"prediction mask shape {pred.shape} != target mask shape {target.shape}")
  dices, hds = np.zeros(num_classes - 1), np.zeros(num_classes - 1)
  for c in range(1, num_classes):
    a, b = pred == c, target == c
    dices[c - 1], hds[c - 1] = dice(a, b), hausdorff(a, b, spacing)
  return dices, hds


# ---------------------------------------------------------------------------------------- classification

def _check_convention(convention: str) -> None:
  if convention not in CONVENTIONS:
    raise ValueError(f"unknown metric convention '{convention}'; known: {', '.join(CONVENTIONS)}")


def auc(labels: np.ndarray, probs: np.ndarray, convention: str = "default") -> float:
  """Binary: roc_auc_score(y, probs[:, 1]); multiclass: macro one-vs-rest. Where the challenge's pinned
  scikit-learn raises (one class in the labels, a multiclass task missing a class), NaN ('default') or
  0.0 ('official')."""
  _check_convention(convention)
  labels, probs = np.asarray(labels), np.asarray(probs, float)
  undefined = 0.0 if convention == "official" else math.nan
  present = np.unique(labels).size
  if present < 2 or (probs.shape[1] > 2 and present != probs.shape[1]):
    return undefined
  try:
    if probs.shape[1] == 2:
      return float(skm.roc_auc_score(labels, probs[:, 1]))
    return float(skm.roc_auc_score(labels, probs, average="macro", multi_class="ovr"))
  except ValueError:  # what the official script catches
    return undefined


def classification_scores(labels: np.ndarray, probs: np.ndarray, preds=None,
                          convention: str = "default") -> dict[str, float]:
  """AUC, accuracy, macro / weighted F1 and MCC of labels [N] and class probabilities [N, C]; `preds`
  (predicted classes) default to the argmax of the probabilities."""
  labels = np.asarray(labels, np.int64)
  probs = np.asarray(probs, float)
  preds = probs.argmax(axis=1) if preds is None else np.asarray(preds, np.int64)
  return {
      "auc": auc(labels, probs, convention),
      "accuracy": float(np.mean(labels == preds)),
      "f1_macro": float(skm.f1_score(labels, preds, average="macro", zero_division=0)),
      "f1_weighted": float(skm.f1_score(labels, preds, average="weighted", zero_division=0)),
      "mcc": float(skm.matthews_corrcoef(labels, preds)),
  }


# ------------------------------------------------------------------------------ detection and regression

def box_iou(pred: np.ndarray, target: np.ndarray, clamp: bool = True) -> np.ndarray:
  """IoU of xyxy boxes [..., 4] (element-wise); a zero union gives 0. `clamp`: negative widths count 0
  (the official script, clamp=False, multiplies them as they are)."""
  pred, target = np.asarray(pred, float), np.asarray(target, float)

  def area(b):
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    return np.clip(w, 0, None) * np.clip(h, 0, None) if clamp else w * h

  lo = np.maximum(pred[..., :2], target[..., :2])
  hi = np.minimum(pred[..., 2:], target[..., 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
  union = area(pred) + area(target) - inter
  return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def radial_errors(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Euclidean distance per landmark of [..., K, 2] point arrays."""
  return np.linalg.norm(np.asarray(pred, float) - np.asarray(target, float), axis=-1)


# ----------------------------------------------------------------------------------------- accumulator

def _seg_add(ev, pred, target, spacing=None, predicted_class=None):
  spacing = ev.spacing if spacing is None else spacing
  ev._preds.append(segmentation_scores(pred, target, ev.task.num_classes, spacing))
  ev._targets.append(None)


def _shape_checked(shape_of):
  def add(ev, pred, target, spacing=None, predicted_class=None):
    t, want = ev.task, shape_of(ev.task)
    pred = np.asarray(pred, float)
    if pred.shape != want:
      raise ValueError(f"task {t.name}: prediction shape {pred.shape}, expected {want}")
    if np.shape(target) != want:
      raise ValueError(f"task {t.name}: target shape {np.shape(target)}, expected {want}")
    ev._preds.append(pred)
    ev._targets.append(np.asarray(target, float))
  return add


def _cls_add(ev, pred, target, spacing=None, predicted_class=None):
  t = ev.task
  pred = np.asarray(pred, float)
  if pred.shape != (t.num_classes,):
    raise ValueError(f"task {t.name}: prediction shape {pred.shape}, expected {(t.num_classes,)}")
  target = int(target)
  if not 0 <= target < t.num_classes:
    raise ValueError(f"task {t.name}: label {target} outside [0, {t.num_classes})")
  ev._preds.append(pred)
  ev._targets.append(target)
  ev._classes.append(int(np.argmax(pred)) if predicted_class is None else int(predicted_class))


def _seg_result(ev):
  per_class = ev.per_class()
  return {"dice": float(np.mean(per_class["dice"])), "hd": float(np.mean(per_class["hd"]))}


def _seg_per_class(ev):
  d = np.stack([s[0] for s in ev._preds]).mean(axis=0)
  h = np.stack([s[1] for s in ev._preds]).mean(axis=0)
  return {"dice": d.tolist(), "hd": h.tolist()}


def _no_per_class(ev):
  return {}


def _cls_result(ev):
  return classification_scores(np.array(ev._targets), np.stack(ev._preds), np.array(ev._classes),
                               ev.convention)


def _det_result(ev):
  return {"iou": float(box_iou(np.stack(ev._preds), np.stack(ev._targets), ev.convention == "default").mean())}


def _reg_result(ev):
  return {"mre": float(radial_errors(np.stack(ev._preds), np.stack(ev._targets)).mean(axis=1).mean())}


@dataclasses.dataclass(frozen=True)
class Accumulator:
  """How a task type's TaskEvaluator collects examples: `add(ev, pred, target, spacing, predicted_class)`
  checks and stores one example, `result(ev)` gives the type's metrics from the stored examples (at least
  one), `per_class(ev)` the per-class scores where the type has them ({} otherwise). tasks/types.py's table
  names one per task type."""
  add: Callable
  result: Callable
  per_class: Callable = _no_per_class


SEGMENTATION_ACCUMULATOR = Accumulator(_seg_add, _seg_result, _seg_per_class)
CLASSIFICATION_ACCUMULATOR = Accumulator(_cls_add, _cls_result)
DETECTION_ACCUMULATOR = Accumulator(_shape_checked(lambda t: (4,)), _det_result)
REGRESSION_ACCUMULATOR = Accumulator(_shape_checked(lambda t: (t.num_points, 2)), _reg_result)


class TaskEvaluator:
  """Accumulates one task's per-example predictions and targets; `result()` gives the task's metrics.

  `add(pred, target)` takes one example in original pixel space:
    segmentation:   int masks [H, W] (and optionally `spacing=(row, col)`);
    classification: probabilities [C] and an int label (optionally `predicted_class`, else the argmax);
    detection:      boxes [4] xyxy pixels;
    regression:     points [K, 2] (x, y) pixels.
  `convention` is 'default' or 'official' (see the module docstring).
  """

  def __init__(self, task: registry.Task, spacing=None, convention: str = "default"):
    if isinstance(task, str):
      task = registry.get(task)
    _check_convention(convention)
    self.task = task
    self.spacing = spacing
    self.convention = convention
    # The table (tasks/types.py) refers to this module's accumulators, so it is read here, not at import.
    from m2dino_jax.tasks import types  # noqa: PLC0415
    self._kind = types.of(task)
    self._preds: list = []
    self._targets: list = []
    self._classes: list = []

  def __len__(self) -> int:
    return len(self._targets)

  def add(self, pred, target, spacing=None, predicted_class=None) -> None:
    self._kind.accumulator.add(self, pred, target, spacing, predicted_class)

  def add_batch(self, preds, targets) -> None:
    """Adds every example of a batch (leading axis)."""
    for p, y in zip(preds, targets, strict=True):
      self.add(p, y)

  def per_class(self) -> dict[str, list[float]]:
    """Per-class scores where the type has them (segmentation: mean Dice and HD per non-background class,
    classes 1..C-1); {} for other types or when nothing was added."""
    return self._kind.accumulator.per_class(self) if self._preds else {}

  def result(self) -> dict[str, float]:
    """The task's metrics (NaN when nothing was added) and `n`, the number of examples."""
    n = len(self._targets)
    out = self._kind.accumulator.result(self) if n else {name: math.nan for name in self._kind.metrics}
    out["n"] = n
    return out
