"""The FMC_UIA challenge's official metrics, computed on the host in NumPy / SciPy.

Definitions follow the challenge's `evaluate.py` (which the M2DINO paper also uses); all inputs are in
the ORIGINAL image's pixel space.

Segmentation (masks of class ids, [H, W]):
  For every image and every non-background class c, Dice and the full Hausdorff distance (HD, the
  maximum of the two directed distances between the pixel sets `pred == c` and `target == c`, as
  SimpleITK's HausdorffDistanceImageFilter computes it; not HD95) in pixels, or in physical units when a
  spacing (row, col) is given. A task's `dice` / `hd` is the mean over images per class, then the mean
  over the non-background classes. Empty-mask conventions, per image and class:
    both empty        -> Dice 1, HD 0;
    exactly one empty -> Dice 0, HD = the image diagonal (sqrt(H^2 + W^2), spacing-scaled).
Classification (probabilities [C], integer label):
  predicted class = argmax of the probabilities; `accuracy`; `f1_macro` and `f1_weighted` over the
  labels seen in targets or predictions (sklearn's default label set, zero_division=0); `mcc` (the
  multiclass Matthews correlation, 0 when undefined); `auc`: binary tasks use the probability of class 1
  (roc_auc_score(y, p[:, 1])), multiclass tasks the unweighted mean of one-vs-rest AUCs.
  AUC conventions: ties count one half (the Mann-Whitney statistic, as sklearn). With one class only in
  the labels the AUC is undefined and is NaN (the official script reports 0 there, a number that reads
  as "worst" rather than "unknown"). For multiclass tasks the one-vs-rest mean is taken over the classes
  present in the labels; sklearn refuses when a class is absent, the official script then reports 0.
Detection (one box per image, xyxy pixels): `iou`, the mean over images of the box IoU. Widths and
  heights are clamped at 0, so a malformed predicted box (x_max < x_min) scores 0 instead of the
  official script's unclamped (possibly negative) area; a zero-area union scores 0 as there.
Regression (landmarks [K, 2] pixels): `mre`, the mean radial error: the Euclidean distance per point,
  averaged over points and then over images.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, stats

from m2dino_jax.tasks import registry

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
  """The headline metric of a task type and whether higher is better (seg dice, cls auc, det iou, reg mre)."""
  if task_type not in METRICS_BY_TYPE:
    raise ValueError(f"unknown task type '{task_type}'; known: {', '.join(METRICS_BY_TYPE)}")
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
  pred, target = pred[box], target[box]
  # distance_transform_edt(~M) is, at each pixel, the distance to the nearest pixel of M.
  to_target = ndimage.distance_transform_edt(~target, sampling=spacing)
  to_pred = ndimage.distance_transform_edt(~pred, sampling=spacing)
  return float(max(to_target[pred].max(), to_pred[target].max()))


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

def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC of scores for labels in {0, 1} by the rank-sum statistic (ties count half); NaN if one class."""
  labels = np.asarray(labels).astype(bool)
  n_pos = int(labels.sum())
  n_neg = labels.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return math.nan
  ranks = stats.rankdata(np.asarray(scores, float))  # average ranks for ties
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
  """Binary: AUC of probs[:, 1]; multiclass: mean one-vs-rest AUC over the classes present in labels."""
  labels, probs = np.asarray(labels), np.asarray(probs, float)
  if np.unique(labels).size < 2:
    return math.nan
  if probs.shape[1] == 2:
    return binary_auc(labels == 1, probs[:, 1])
  return float(np.mean([binary_auc(labels == c, probs[:, c]) for c in np.unique(labels)]))


def classification_scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
  """AUC, accuracy, macro / weighted F1 and MCC of a task's labels [N] and class probabilities [N, C]."""
  labels = np.asarray(labels, np.int64)
  probs = np.asarray(probs, float)
  preds = probs.argmax(axis=1)
  classes = np.union1d(labels, preds)
  # Confusion matrix over the seen labels: rows = truth, columns = prediction.
  index = np.searchsorted(classes, labels), np.searchsorted(classes, preds)
  cm = np.zeros((classes.size, classes.size), np.int64)
  np.add.at(cm, index, 1)
  tp = np.diag(cm).astype(float)
  support, predicted = cm.sum(axis=1).astype(float), cm.sum(axis=0).astype(float)
  denom = support + predicted  # = 2tp + fp + fn, > 0 for every seen label
  f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
  n = float(labels.size)
  mcc_den = math.sqrt((n * n - predicted @ predicted) * (n * n - support @ support))
  mcc = (tp.sum() * n - support @ predicted) / mcc_den if mcc_den > 0 else 0.0
  return {
      "auc": auc(labels, probs),
      "accuracy": float(tp.sum() / n),
      "f1_macro": float(f1.mean()),
      "f1_weighted": float(f1 @ support / support.sum()),
      "mcc": float(mcc),
  }


# ------------------------------------------------------------------------------ detection and regression

def box_iou(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """IoU of xyxy boxes [..., 4] (element-wise); negative widths clamp to 0; a zero union gives 0."""
  pred, target = np.asarray(pred, float), np.asarray(target, float)

  def area(b):
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)

  lo = np.maximum(pred[..., :2], target[..., :2])
  hi = np.minimum(pred[..., 2:], target[..., 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
  union = area(pred) + area(target) - inter
  return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def radial_errors(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Euclidean distance per landmark of [..., K, 2] point arrays."""
  return np.linalg.norm(np.asarray(pred, float) - np.asarray(target, float), axis=-1)


# ----------------------------------------------------------------------------------------- accumulator

class TaskEvaluator:
  """Accumulates one task's per-example predictions and targets; `result()` gives the task's metrics.

  `add(pred, target)` takes one example in original pixel space:
    segmentation:   int masks [H, W] (and optionally `spacing=(row, col)`);
    classification: probabilities [C] and an int label;
    detection:      boxes [4] xyxy pixels;
    regression:     points [K, 2] (x, y) pixels.
  """

  def __init__(self, task: registry.Task, spacing=None):
    if isinstance(task, str):
      task = registry.get(task)
    self.task = task
    self.spacing = spacing
    self._preds: list = []
    self._targets: list = []

  def __len__(self) -> int:
    return len(self._targets)

  def add(self, pred, target, spacing=None) -> None:
    t = self.task
    if t.type == registry.SEGMENTATION:
      spacing = self.spacing if spacing is None else spacing
      self._preds.append(segmentation_scores(pred, target, t.num_classes, spacing))
      self._targets.append(None)
      return
    pred = np.asarray(pred, float)
    want = {registry.CLASSIFICATION: (t.num_classes,), registry.DETECTION: (4,),
            registry.REGRESSION: (t.num_points, 2)}[t.type]
    if pred.shape != want:
      raise ValueError(f"task {t.name}: prediction shape {pred.shape}, expected {want}")
    if t.type == registry.CLASSIFICATION:
      target = int(target)
      if not 0 <= target < t.num_classes:
        raise ValueError(f"task {t.name}: label {target} outside [0, {t.num_classes})")
    elif np.shape(target) != want:
      raise ValueError(f"task {t.name}: target shape {np.shape(target)}, expected {want}")
    self._preds.append(pred)
    self._targets.append(np.asarray(target, float) if t.type != registry.CLASSIFICATION else target)

  def add_batch(self, preds, targets) -> None:
    """Adds every example of a batch (leading axis)."""
    for p, y in zip(preds, targets, strict=True):
      self.add(p, y)

  def per_class(self) -> dict[str, list[float]]:
    """Segmentation only: mean Dice and HD per non-background class (classes 1..C-1)."""
    if self.task.type != registry.SEGMENTATION or not self._preds:
      return {}
    d = np.stack([s[0] for s in self._preds]).mean(axis=0)
    h = np.stack([s[1] for s in self._preds]).mean(axis=0)
    return {"dice": d.tolist(), "hd": h.tolist()}

  def result(self) -> dict[str, float]:
    """The task's metrics (NaN when nothing was added) and `n`, the number of examples."""
    t, n = self.task, len(self._targets)
    out = {name: math.nan for name in METRICS_BY_TYPE[t.type]}
    if n:
      if t.type == registry.SEGMENTATION:
        per_class = self.per_class()
        out = {"dice": float(np.mean(per_class["dice"])), "hd": float(np.mean(per_class["hd"]))}
      elif t.type == registry.CLASSIFICATION:
        out = classification_scores(np.array(self._targets), np.stack(self._preds))
      elif t.type == registry.DETECTION:
        out = {"iou": float(box_iou(np.stack(self._preds), np.stack(self._targets)).mean())}
      else:
        errors = radial_errors(np.stack(self._preds), np.stack(self._targets))
        out = {"mre": float(errors.mean(axis=1).mean())}
    out["n"] = n
    return out
