"""Trivial baselines (tasks/baselines.py) against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from m2dino_jax.data import pipeline
from m2dino_jax.data.records import Record
from m2dino_jax.tasks import baselines


def _img(h, w):
  return np.zeros((h, w), np.uint8)


def _mask(shape, cells):
  m = np.zeros(shape, np.uint8)
  for r, c in cells:
    m[r, c] = 1
  return m


def test_nearest_resize_repeats_up_and_samples_pixel_centres_down():
  a = np.arange(16).reshape(4, 4)
  np.testing.assert_array_equal(baselines.nearest_resize(a, (8, 8)), np.repeat(np.repeat(a, 2, 0), 2, 1))
  b = np.arange(64).reshape(8, 8)
  np.testing.assert_array_equal(baselines.nearest_resize(b, (4, 4)), b[1::2, 1::2])


def test_segmentation_is_the_per_pixel_majority_label_scored_officially():
  top_left = [(0, 0), (0, 1), (1, 0), (1, 1)]
  train = [Record(_img(4, 4), "fetal_head", mask=_mask((4, 4), top_left)),
           Record(_img(4, 4), "fetal_head", mask=_mask((4, 4), [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])),
           Record(_img(4, 4), "fetal_head", mask=_mask((4, 4), [(1, 1), (1, 2), (2, 1), (2, 2)]))]
  base = baselines.fit("fetal_head", train)
  # foreground where 2 or 3 of the 3 masks have it
  np.testing.assert_array_equal(base, _mask((4, 4), top_left + [(1, 2)]))
  # a tie (1 of 2) goes to background
  np.testing.assert_array_equal(baselines.fit("fetal_head", train[:1] + [Record(
      _img(4, 4), "fetal_head", mask=np.zeros((4, 4), np.uint8))]), np.zeros((4, 4)))
  quadrant = np.zeros((8, 8), np.uint8)
  quadrant[:4, :4] = 1
  val = [Record(_img(8, 8), "fetal_head", mask=quadrant),
         Record(_img(8, 8), "fetal_head", mask=np.zeros((8, 8), np.uint8))]
  # image 1: prediction = the quadrant (16 px) + rows 2-3, cols 4-5 (4 px): Dice 32/36, HD 2 (col 5 -> col 3);
  # image 2: empty target, non-empty prediction: Dice 0, HD = the diagonal sqrt(128)
  got = baselines.score("fetal_head", base, val)
  assert got["n"] == 2
  assert got["dice"] == pytest.approx((32 / 36 + 0) / 2)
  assert got["hd"] == pytest.approx((2 + math.sqrt(128)) / 2)


def test_classification_is_the_majority_class_with_auc_one_half():
  train = [Record(_img(4, 4), "lung_2cls", label=y) for y in (0, 1, 1, 1, 0)]
  val = [Record(_img(4, 4), "lung_2cls", label=y) for y in (0, 1, 1, 0, 1, 1)]
  base = baselines.fit("lung_2cls", train)
  np.testing.assert_allclose(base, [0.4, 0.6])
  got = baselines.score("lung_2cls", base, val)
  # always class 1: accuracy 4/6; F1 class 1 = 2 * (4/6) * 1 / (4/6 + 1) = 0.8, class 0 = 0; MCC 0
  assert got["auc"] == pytest.approx(0.5)
  assert got["accuracy"] == pytest.approx(4 / 6)
  assert got["f1_macro"] == pytest.approx(0.4)
  assert got["f1_weighted"] == pytest.approx(0.8 * 4 / 6)
  assert got["mcc"] == 0.0
  three = baselines.evaluate("breast_3cls", [Record(_img(4, 4), "breast_3cls", label=y) for y in (2, 2, 1, 0)],
                             [Record(_img(4, 4), "breast_3cls", label=y) for y in (0, 1, 2, 2)])
  assert three["auc"] == pytest.approx(0.5) and three["accuracy"] == pytest.approx(0.5)
  # a class missing from the labels: AUC undefined (n/a), 0.0 as the official script scores it
  one = [Record(_img(4, 4), "lung_2cls", label=1)] * 3
  assert math.isnan(baselines.evaluate("lung_2cls", train, one)["auc"])
  assert baselines.evaluate("lung_2cls", train, one, convention="official")["auc"] == 0.0
  # a tie in the training labels goes to the lower class
  assert baselines.evaluate("lung_2cls", train[:2], val)["accuracy"] == pytest.approx(2 / 6)


def test_detection_is_the_mean_relative_box_mapped_to_each_image():
  train = [Record(_img(100, 200), "thyroid_nodule_det", box=np.array([20, 10, 60, 50], np.float32)),
           Record(_img(100, 100), "thyroid_nodule_det", box=np.array([30, 20, 50, 40], np.float32))]
  # relative boxes (0.1, 0.1, 0.3, 0.5) and (0.3, 0.2, 0.5, 0.4): mean (0.2, 0.15, 0.4, 0.45)
  base = baselines.fit("thyroid_nodule_det", train)
  rec = Record(_img(200, 200), "thyroid_nodule_det", box=np.array([40, 30, 80, 70], np.float32))
  np.testing.assert_allclose(baselines.predict("thyroid_nodule_det", base, rec), [40, 30, 80, 90])
  # intersection 40 x 40, union 40 x 60
  assert baselines.score("thyroid_nodule_det", base, [rec])["iou"] == pytest.approx(1600 / 2400)


def test_regression_is_the_mean_relative_points():
  train = [Record(_img(100, 100), "fetal_femur", points=np.array([[10, 20], [30, 40]], np.float32)),
           Record(_img(100, 100), "fetal_femur", points=np.array([[30, 40], [50, 60]], np.float32))]
  base = baselines.fit("fetal_femur", train)
  val = [Record(_img(100, 100), "fetal_femur", points=np.array([[20, 30], [40, 55]], np.float32)),
         Record(_img(100, 200), "fetal_femur", points=np.array([[40, 30], [80, 50]], np.float32))]
  # image 1: errors 0 and 5 -> 2.5; image 2 (W = 200): prediction (40, 30), (80, 50) exactly -> 0
  assert baselines.score("fetal_femur", base, val)["mre"] == pytest.approx(1.25)


def test_no_training_records_is_an_error():
  with pytest.raises(ValueError, match="fetal_femur: no training records"):
    baselines.fit("fetal_femur", [])


def test_beats_follows_the_primary_metric_direction():
  assert baselines.beats("segmentation", {"dice": 0.6}, {"dice": 0.5})
  assert not baselines.beats("regression", {"mre": 6.0}, {"mre": 5.0})
  assert baselines.beats("regression", {"mre": 4.0}, {"mre": 5.0})
  assert not baselines.beats("classification", {"auc": 0.5}, {"auc": 0.5})  # strictly better
  assert baselines.beats("classification", {"auc": math.nan}, {"auc": 0.5}) is None


def test_for_config_fits_on_the_used_train_rows_and_scores_the_eval_split():
  cfg = pipeline.default_data_config()
  cfg.source.synthetic_count = 8
  cfg.source.synthetic_size = 64
  cfg.train_per_task = "lung_2cls=3"  # the data-scale knob: the baseline sees the model's 3 rows
  got = baselines.for_config(cfg, ["lung_2cls"])["lung_2cls"]
  train = pipeline.train_subset(cfg, ["lung_2cls"], pipeline.load_sources(cfg, ["lung_2cls"], "train"))["lung_2cls"]
  labels = [pipeline.as_record(train[i]).label for i in range(len(train))]
  assert len(labels) == 3
  majority = int(np.argmax(np.bincount(labels, minlength=2)))
  val = [pipeline.as_record(r).label for r in pipeline.load_sources(cfg, ["lung_2cls"], "val")["lung_2cls"]]
  assert got["n"] == len(val) == 8
  assert got["accuracy"] == pytest.approx(np.mean(np.array(val) == majority))
