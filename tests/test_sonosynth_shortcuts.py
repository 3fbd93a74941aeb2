"""sonosynth classification scenes are not separable by image-wide statistics (issue 18 item 4, "caricatures that
a classifier separates by shortcuts").

The measure (`measure.task_shortcut`): 48 images per class at 128 px (seed 0), for each the 32-bin histogram of
its grey levels inside the imaged field and the mean grey level of 16 depth bands: features that carry no
anatomy; the stratified 5-fold cross-validated accuracy of a standardised logistic regression on them.

The bound, and why: a classifier on anatomy-free statistics may close at most three quarters of the gap from
chance to perfect, accuracy <= chance + 0.75 * (1 - chance) (6 classes: 0.792; 8 classes: 0.781). Beyond that the
classes are told apart by their global look more than by the anatomy their label names. Not at chance: real views
differ globally too (a full bladder is a large anechoic area with enhancement behind it, a transverse aorta sits
on a vertebral shadow, a fetal skull is a bright ring around dark brain), so a bound at chance would fail real
images as well.

Measured (seed 0, 48 per class, 128 px; chance 0.167 for 6 classes, 0.125 for 8):
  task                   before   after   bound
  organ_cls              0.969    0.712   0.792   each organ alone in plain speckle before, the spleen class
                                                  shifted image-wide by -4 dB; now one abdominal field (abdomen.py)
  fetal_plane_cls        0.833    0.826   0.792   xfail: the cervix now sits in the obstetric field (it was the
                                                  one plane without it), but the brain (47 / 48 right: bright
                                                  ring, dark brain) and the cervix (43 / 48) stay separable
  fetal_sacral_pos_cls   0.323    0.323   0.781   unchanged (already in the obstetric field)
  fetal_head_pos_cls     0.406    0.406   0.781   unchanged (already in the obstetric field)
"""

import json

import numpy as np
import pytest

from m2dino_jax import cli
from m2dino_jax.data.sonosynth import measure, physics, scenes


def test_the_bound_is_three_quarters_of_the_gap():
  assert measure.SHORTCUT_FRACTION == 0.75
  assert measure.shortcut_bound(1 / 6) == pytest.approx(0.7917, abs=1e-4)
  assert measure.shortcut_bound(1 / 8) == pytest.approx(0.78125)


def _loop_features(image, fov, bins, bands):
  """measure.global_features written as plain loops over pixels (an independent implementation)."""
  h, w = image.shape
  hist = [0] * bins
  total = 0
  band_sum, band_n = [0.0] * bands, [0] * bands
  for i in range(h):
    for j in range(w):
      if fov[i, j]:
        v = int(image[i, j])
        hist[min(int(v / 256 * bins), bins - 1)] += 1
        total += 1
        k = int(i * bands / h)
        band_sum[k] += v
        band_n[k] += 1
  return np.array([c / total for c in hist] + [s / n if n else 0.0 for s, n in zip(band_sum, band_n)])


def test_global_features_match_a_loop():
  size = 48
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (size, size)).astype(np.uint8)
  fov = physics.geometry(scenes.CONVEX, size, size).fov.copy()
  fov[:8] = False  # an empty band is covered
  for bins, bands in ((32, 16), (7, 5)):
    ours = measure.global_features(image, fov, bins, bands)
    np.testing.assert_allclose(ours, _loop_features(image, fov, bins, bands), rtol=1e-12)
  assert measure.global_features(image, fov)[:32].sum() == pytest.approx(1.0)


def test_shortcut_accuracy_reads_chance_on_noise_and_one_on_a_global_cue():
  """Pure-noise features read chance (+- a few standard errors); a global cue per class (class k shifts feature k
  by 4 noise standard deviations, as the old spleen scene's -4 dB did its grey levels) reads ~1."""
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(6), 50)
  noise = rng.normal(size=(300, 48))
  assert abs(measure.shortcut_accuracy(noise, labels) - 1 / 6) < 0.08
  cue = noise.copy()
  cue[np.arange(300), labels] += 4.0
  assert measure.shortcut_accuracy(cue, labels) > 0.95


@pytest.mark.parametrize("task", [
    "organ_cls",
    pytest.param("fetal_plane_cls", marks=pytest.mark.xfail(
        strict=True, reason="brain and cervix planes stay separable by global statistics (0.826 > 0.792)")),
    "fetal_sacral_pos_cls",
    "fetal_head_pos_cls",
])
def test_classes_are_not_separable_by_global_statistics(task):
  r = measure.task_shortcut(task, per_class=48, size=128, seed=0)
  assert r["accuracy"] <= measure.shortcut_bound(r["chance"]), (task, r, measure.shortcut_bound(r["chance"]))
  assert r["accuracy"] > r["chance"]  # the features are not blind: real anatomy does change global statistics


def test_bench_sonosynth_prints_shortcuts_for_classification_tasks_only(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert cli.main(["bench", "sonosynth", "--tasks", "organ_cls,fetal_femur", "--images", "0", "--cnr-images", "0",
                   "--shortcut", "5", "--out", str(out)]) == 0
  rows = json.loads(out.read_text())["shortcuts"]
  assert [(r["task"], r["images"], r["chance"]) for r in rows] == [("organ_cls", 30, 0.167)]
  assert 0.0 <= rows[0]["shortcut_accuracy"] <= 1.0 and rows[0]["bound"] == 0.792
  assert "shortcut_accuracy" in capsys.readouterr().out
