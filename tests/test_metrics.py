"""The challenge metrics against independent references: SimpleITK, scikit-learn and plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from sklearn import metrics as skm

from m2dino_jax.tasks import metrics, registry


def _blobs(rng, shape, num_classes):
  """A random integer mask with a few smooth blobs per class (several components, non-convex)."""
  noise = ndimage.gaussian_filter(rng.normal(size=(num_classes - 1, *shape)), sigma=(0, 3, 3))
  mask = noise.argmax(axis=0) + 1
  mask[noise.max(axis=0) < np.quantile(noise.max(axis=0), 0.5)] = 0
  return mask.astype(np.int32)


def _sitk_image(mask, spacing=None):
  img = sitk.GetImageFromArray(mask.astype(np.uint8))
  if spacing is not None:
    img.SetSpacing((float(spacing[1]), float(spacing[0])))  # SimpleITK spacing is (x, y) = (col, row)
  return img


def _sitk_hd(a, b, spacing=None):
  f = sitk.HausdorffDistanceImageFilter()
  f.Execute(_sitk_image(a, spacing), _sitk_image(b, spacing))
  return f.GetHausdorffDistance()


def _sitk_dice(pred, target, label):
  f = sitk.LabelOverlapMeasuresImageFilter()
  f.Execute(_sitk_image(target), _sitk_image(pred))
  return f.GetDiceCoefficient(label)


@pytest.mark.parametrize("shape,spacing", [((41, 67), None), ((64, 29), (0.7, 1.9)), ((50, 50), None)])
def test_dice_and_hausdorff_match_simpleitk(shape, spacing):
  rng = np.random.default_rng(shape[0])
  for _ in range(4):
    pred, target = _blobs(rng, shape, 3), _blobs(rng, shape, 3)
    for c in (1, 2):
      a, b = pred == c, target == c
      assert a.any() and b.any()
      assert metrics.hausdorff(a, b, spacing) == pytest.approx(_sitk_hd(a, b, spacing), rel=1e-6)
      assert metrics.dice(a, b) == pytest.approx(_sitk_dice(pred, target, c), rel=1e-6)


def test_hausdorff_sees_interior_points_not_just_boundaries():
  # B is a ring; A fills its hole. The farthest A pixel from B is at the centre, not on A's boundary.
  yy, xx = np.mgrid[:31, :31]
  r = np.hypot(yy - 15, xx - 15)
  a, b = r <= 9, (r > 9) & (r <= 12)
  assert metrics.hausdorff(a, b) == pytest.approx(_sitk_hd(a, b))
  assert metrics.hausdorff(a, b) > 9


def test_segmentation_empty_mask_conventions():
  shape = (30, 40)  # diagonal 50
  empty, blob = np.zeros(shape, bool), np.zeros(shape, bool)
  blob[5:9, 7:20] = True
  assert metrics.dice(empty, empty) == 1.0 and metrics.hausdorff(empty, empty) == 0.0
  for a, b in ((empty, blob), (blob, empty)):
    assert metrics.dice(a, b) == 0.0
    assert metrics.hausdorff(a, b) == pytest.approx(50.0)
  assert metrics.hausdorff(empty, blob, spacing=(2.0, 0.5)) == pytest.approx(math.hypot(60, 20))


def test_segmentation_evaluator_averages_images_then_foreground_classes():
  task = registry.get("cervix_multi")  # 3 classes incl. background
  rng = np.random.default_rng(0)
  ev = metrics.TaskEvaluator(task)
  dice_ref, hd_ref = [], []
  for i in range(5):
    shape = (36 + i, 48)
    pred, target = _blobs(rng, shape, 3), _blobs(rng, shape, 3)
    if i == 1:
      pred[pred == 2] = 0  # empty prediction for class 2
    if i == 2:
      target[target == 1] = 0  # empty ground truth for class 1
    if i == 3:
      pred[pred == 1] = 0
      target[target == 1] = 0  # class 1 empty in both
    ev.add(pred, target)
    row_d, row_h = [], []
    for c in (1, 2):
      a, b = pred == c, target == c
      if not a.any() and not b.any():
        row_d.append(1.0), row_h.append(0.0)
      elif not (a.any() and b.any()):
        row_d.append(0.0), row_h.append(math.hypot(*shape))
      else:
        row_d.append(_sitk_dice(pred, target, c)), row_h.append(_sitk_hd(a, b))
    dice_ref.append(row_d), hd_ref.append(row_h)
  res = ev.result()
  assert res["n"] == 5
  assert res["dice"] == pytest.approx(np.mean(dice_ref), rel=1e-6)
  assert res["hd"] == pytest.approx(np.mean(hd_ref), rel=1e-6)
  np.testing.assert_allclose(ev.per_class()["hd"], np.mean(hd_ref, axis=0), rtol=1e-6)
  with pytest.raises(ValueError, match="shape"):
    ev.add(np.zeros((4, 5), int), np.zeros((5, 4), int))


def _softmax(rng, n, c):
  z = rng.normal(size=(n, c)) * 2
  p = np.exp(z - z.max(1, keepdims=True))
  return p / p.sum(1, keepdims=True)


def _sk_scores(y, p):
  yhat = p.argmax(1)
  return {"accuracy": skm.accuracy_score(y, yhat),
          "f1_macro": skm.f1_score(y, yhat, average="macro", zero_division=0),
          "f1_weighted": skm.f1_score(y, yhat, average="weighted", zero_division=0),
          "mcc": skm.matthews_corrcoef(y, yhat)}


@pytest.mark.parametrize("num_classes", [2, 3, 6])
def test_classification_matches_sklearn(num_classes):
  rng = np.random.default_rng(num_classes)
  for n in (7, 40, 200):
    y = rng.integers(0, num_classes, n)
    y[:num_classes] = np.arange(num_classes)  # every class present
    p = _softmax(rng, n, num_classes)
    p[: n // 3] = np.round(p[: n // 3], 1)  # ties in the scores
    p /= p.sum(1, keepdims=True)
    got = metrics.classification_scores(y, p)
    want = _sk_scores(y, p)
    want["auc"] = (skm.roc_auc_score(y, p[:, 1]) if num_classes == 2
                   else skm.roc_auc_score(y, p, average="macro", multi_class="ovr"))
    for k, v in want.items():
      assert got[k] == pytest.approx(v, abs=1e-12), k


def test_classification_edge_cases():
  rng = np.random.default_rng(1)
  # One class present: AUC undefined (NaN), the rest as sklearn.
  y = np.full(10, 2)
  p = _softmax(rng, 10, 3)
  got = metrics.classification_scores(y, p)
  assert math.isnan(got["auc"])
  for k, v in _sk_scores(y, p).items():
    assert got[k] == pytest.approx(v, abs=1e-12), k
  # A multiclass task with one class absent: the pinned scikit-learn raises; n/a here, 0.0 officially.
  y = rng.integers(0, 3, 30)
  y[:3] = [0, 1, 2]
  y[y == 1] = 3
  p = _softmax(rng, 30, 4)
  assert math.isnan(metrics.auc(y, p)) and metrics.auc(y, p, "official") == 0.0
  # Constant predictions: MCC has a zero denominator; sklearn gives 0 too. Labels predicted but absent count.
  y = np.array([0, 1, 1, 0, 1])
  p = np.tile([0.1, 0.2, 0.7], (5, 1))
  got = metrics.classification_scores(y, p)
  for k, v in _sk_scores(y, p).items():
    assert got[k] == pytest.approx(v, abs=1e-12), k
  assert metrics.auc([1, 1, 0, 0], np.full((4, 2), 0.5)) == 0.5


def _official_auc(y, p, num_classes):
  """The official evaluate.py's AUC under scikit-learn 1.2.2, from its documented behaviour: roc_auc_score
  raises on one class (binary) or on a multiclass set whose classes differ from the score columns."""
  if np.unique(y).size < 2 or (num_classes > 2 and np.unique(y).size != num_classes):
    return 0.0
  return (skm.roc_auc_score(y, p[:, 1]) if num_classes == 2
          else skm.roc_auc_score(y, p, average="macro", multi_class="ovr"))


@pytest.mark.parametrize("num_classes", [2, 3, 8])
def test_official_auc_is_zero_where_the_pinned_sklearn_raises(num_classes):
  rng = np.random.default_rng(10 + num_classes)
  p = _softmax(rng, 24, num_classes)
  single = np.full(24, 1)
  missing = np.arange(24) % (num_classes - 1)  # class C-1 never appears (binary: single class 0)
  full = np.arange(24) % num_classes
  for y in (single, missing, full):
    want = _official_auc(y, p, num_classes)
    assert metrics.auc(y, p, "official") == want
    got = metrics.classification_scores(y, p, convention="official")["auc"]
    assert got == want
    assert math.isnan(metrics.auc(y, p)) if want == 0.0 else metrics.auc(y, p) == want
  assert metrics.auc(single, p, "official") == 0.0 and metrics.auc(missing, p, "official") == 0.0
  assert 0.0 < metrics.auc(full, p, "official") < 1.0
  with pytest.raises(ValueError, match="convention"):
    metrics.auc(full, p, "sklearn-1.9")


def test_official_box_areas_are_unclamped():
  a, b = np.array([10.0, 10, 0, 5]), np.array([0.0, 0, 10, 10])  # malformed prediction: w = -10
  assert metrics.box_iou(a, b) == 0.0
  assert metrics.box_iou(a, b, clamp=False) == pytest.approx(0.0 / (-50 + 100))
  c = np.array([4.0, 4, 2, 8])  # w = -2, h = 4; intersection 0; union -8 + 100
  assert metrics.box_iou(c, b, clamp=False) == 0.0
  ev = metrics.TaskEvaluator("thyroid_nodule_det", convention="official")
  ev.add([0, 0, 5, 10], b)
  ev.add([0, 0, 10, 10], b)
  assert ev.result()["iou"] == pytest.approx(0.75)


def test_hausdorff_matches_brute_force():
  from scipy.spatial.distance import cdist
  rng = np.random.default_rng(12)
  for spacing in (None, (0.5, 1.5)):
    a, b = _blobs(rng, (23, 31), 2) == 1, _blobs(rng, (23, 31), 2) == 1
    s = np.ones(2) if spacing is None else np.asarray(spacing)
    d = cdist(np.argwhere(a) * s, np.argwhere(b) * s)
    assert metrics.hausdorff(a, b, spacing) == pytest.approx(max(d.min(1).max(), d.min(0).max()), rel=1e-6)


def _loop_iou(a, b):
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _random_boxes(rng, n):
  xy = rng.uniform(0, 300, size=(n, 2, 2))
  return np.concatenate([xy.min(1), xy.max(1)], axis=1)


def test_box_iou_matches_loop():
  rng = np.random.default_rng(2)
  a, b = _random_boxes(rng, 200), _random_boxes(rng, 200)
  b[:20] = a[:20]  # identical
  b[20:40, :2] = a[20:40, 2:] + 1  # disjoint
  b[40:60, 2:] = b[40:60, :2] + 3  # small boxes
  b[60:62, 2:] = b[60:62, :2]  # zero-area target
  got = metrics.box_iou(a, b)
  want = np.array([_loop_iou(x, y) for x, y in zip(a, b)])
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
  assert np.all(got[:20] == 1) and np.all(got[20:40] == 0)
  assert metrics.box_iou([10, 10, 0, 0], [0, 0, 10, 10]) == 0  # malformed prediction
  assert metrics.box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0  # zero union


def test_detection_and_regression_evaluators():
  rng = np.random.default_rng(3)
  det = metrics.TaskEvaluator("thyroid_nodule_det")
  a, b = _random_boxes(rng, 13), _random_boxes(rng, 13)
  det.add_batch(a, b)
  assert det.result() == {"iou": pytest.approx(np.mean([_loop_iou(x, y) for x, y in zip(a, b)])), "n": 13}

  reg = metrics.TaskEvaluator(registry.get("IUGC"))  # 3 points
  pred, target = rng.uniform(0, 500, (9, 3, 2)), rng.uniform(0, 500, (9, 3, 2))
  reg.add_batch(pred, target)
  loop = [np.mean([math.dist(p, t) for p, t in zip(ps, ts)]) for ps, ts in zip(pred, target)]
  assert reg.result()["mre"] == pytest.approx(np.mean(loop), rel=1e-12)
  with pytest.raises(ValueError, match="expected"):
    reg.add(np.zeros((2, 2)), np.zeros((2, 2)))


def test_classification_evaluator_and_empty_results():
  rng = np.random.default_rng(4)
  ev = metrics.TaskEvaluator("breast_3cls")
  y, p = rng.integers(0, 3, 25), _softmax(rng, 25, 3)
  for probs, label in zip(p, y):
    ev.add(probs, label)
  res = ev.result()
  assert res["n"] == 25
  assert res["auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"), abs=1e-12)
  with pytest.raises(ValueError, match="label"):
    ev.add(p[0], 3)
  empty = metrics.TaskEvaluator("fetal_head").result()
  assert empty["n"] == 0 and math.isnan(empty["dice"]) and math.isnan(empty["hd"])


def test_primary_metric():
  assert metrics.primary_metric("segmentation") == ("dice", True)
  assert metrics.primary_metric("classification") == ("auc", True)
  assert metrics.primary_metric("detection") == ("iou", True)
  assert metrics.primary_metric("regression") == ("mre", False)
  assert metrics.HIGHER_IS_BETTER["hd"] is False
  with pytest.raises(ValueError):
    metrics.primary_metric("captioning")


def test_segmentation_evaluator_with_spacing():
  rng = np.random.default_rng(5)
  pred, target = _blobs(rng, (33, 45), 2), _blobs(rng, (33, 45), 2)
  spacing = np.array([0.5, 2.0])
  for ev, kwargs in ((metrics.TaskEvaluator("lung", spacing=spacing), {}),
                     (metrics.TaskEvaluator("lung"), {"spacing": spacing})):
    ev.add(pred, target, **kwargs)
    assert ev.result()["hd"] == pytest.approx(_sitk_hd(pred == 1, target == 1, spacing), rel=1e-6)
    assert ev.result()["dice"] == pytest.approx(_sitk_dice(pred, target, 1), rel=1e-6)
