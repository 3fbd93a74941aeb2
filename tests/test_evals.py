"""Frozen-encoder evaluations (m2dino_jax/evals) against scikit-learn and NumPy references."""

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

from m2dino_jax import cli
from m2dino_jax.evals import fewshot, frozen, probe, suite
from m2dino_jax.tasks import metrics, registry

T = probe.KNN_TEMPERATURE


@pytest.fixture(scope="module")
def features():
  """Features of a fixed (seeded random) mu/16 encoder on the simulator's fetal_plane_cls, 32 px."""
  enc = frozen.load_encoder("random:mu/16", seed=3)
  cfg = suite.data_config("synthetic", image_size=32, batch_size=16, synthetic_count=48, synthetic_size=64)
  task = registry.get("fetal_plane_cls")
  return {split: frozen.extract(enc, cfg, task, split) for split in ("train", "val", "test")}


def test_knn_matches_sklearn(features):
  tr, te = features["train"], features["test"]
  for k in (1, 10):
    ours = probe.knn_probs(tr.pooled, tr.labels, te.pooled, 6, k)
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1 - d) / T)).fit(tr.pooled, tr.labels)
    np.testing.assert_allclose(ours, ref.predict_proba(te.pooled), atol=2e-5)
    assert (ours.argmax(1) == ref.predict(te.pooled)).all()


def test_linear_probe_matches_sklearn(features):
  tr, va, te = features["train"], features["val"], features["test"]
  cs = (0.01, 1.0)
  x_all, y_all = np.concatenate([tr.pooled, va.pooled]), np.concatenate([tr.labels, va.labels])
  is_train = np.arange(len(y_all)) < len(tr.labels)
  a, v = probe.standardise(tr.pooled, x_all)
  # fit on the training rows only (0/1 row weights: the program linear_eval compiles too)
  w, b, its = probe.fit_logistic(v, y_all, 6, cs, max_iter=1000, tol=1e-5, weights=is_train)
  assert (its < 1000).all(), its
  val_f1 = []
  for i, c in enumerate(cs):
    ref = LogisticRegression(C=c, max_iter=20000, tol=1e-10).fit(a.astype(np.float64), tr.labels)
    ours = probe.logistic_probs(w[i], b[i], v[~is_train])
    np.testing.assert_allclose(ours, ref.predict_proba(v[~is_train]), atol=2e-3)
    np.testing.assert_allclose(w[i], ref.coef_.T, atol=5e-3 * max(1.0, np.abs(ref.coef_).max()))
    val_f1.append(f1_score(va.labels, ref.predict(v[~is_train]), average="macro"))
  # the whole probe: C by validation macro F1, refit on train + val, test macro F1 as sklearn gives it
  got = probe.linear_eval(tr.pooled, tr.labels, te.pooled, te.labels, 6, cs=cs, val_x=va.pooled, val_y=va.labels)
  best = cs[int(np.argmax(val_f1))]
  assert got["c"] == best
  a, t = probe.standardise(x_all, te.pooled)
  ref = LogisticRegression(C=best, max_iter=20000, tol=1e-10).fit(a.astype(np.float64), y_all)
  want = f1_score(te.labels, ref.predict(t), average="macro")
  assert got["f1_macro"] == pytest.approx(want, abs=1e-9), (got, want)
  assert got["f1_macro"] > 1 / 6 + 0.1  # well above chance on the simulator's planes


def test_pooled_dice_and_per_image_dice_match_references():
  rng = np.random.default_rng(0)
  targets = [rng.integers(0, 3, (9, 7)) for _ in range(5)]
  preds = [np.where(rng.random(t.shape) < 0.7, t, rng.integers(0, 3, t.shape)) for t in targets]
  preds[1][:] = 0  # an image with no foreground predicted
  got = fewshot.pooled_dice(preds, targets, 3)
  want = []
  for c in range(3):
    inter = sum(np.logical_and(p == c, t == c).sum() for p, t in zip(preds, targets))
    size = sum((p == c).sum() + (t == c).sum() for p, t in zip(preds, targets))
    want.append(2 * inter / size)
  np.testing.assert_allclose(got["dice_pooled"], want)
  assert got["mDice"] == pytest.approx(np.mean(want)) and got["mfDice"] == pytest.approx(np.mean(want[1:]))
  ev = metrics.TaskEvaluator(registry.get("head_symphysis_multi"))
  for p, t in zip(preds, targets):
    ev.add(p.astype(np.uint8), t.astype(np.uint8))
  assert fewshot.per_image_dice(preds, targets, 3) == pytest.approx(ev.result()["dice"])


def test_linear_seg_head_matches_torch():
  """DINOv2's linear protocol head: a 1x1 convolution on the last (or, '+ms', the last n concatenated) patch-token
  maps, logits upsampled bilinearly (align_corners=False) to the image, against torch's conv2d / interpolate."""
  import torch
  import torch.nn.functional as F
  rng = np.random.default_rng(0)
  maps = tuple(rng.normal(size=(2, 4, 3, 8)).astype(np.float32) for _ in range(3))
  task = registry.get("head_symphysis_multi")
  for kind, n in (("linear", 1), ("linear+ms", 3)):
    head = fewshot._head(kind, task, 8, 16, 3, 0, seed=1)
    got = np.asarray(head({"features": maps, "grid": (4, 3)}, (64, 48)))
    w, b = np.asarray(head.classify.kernel[...]), np.asarray(head.classify.bias[...])
    assert w.shape == (8 * n, task.num_classes)
    x = torch.from_numpy(np.concatenate(maps[-n:], -1)).permute(0, 3, 1, 2)
    logits = F.conv2d(x, torch.from_numpy(w.T.copy())[:, :, None, None], torch.from_numpy(b))
    want = F.interpolate(logits, size=(64, 48), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
  # the standardiser: per-channel mean 0 / std 1 over the shots' patches
  (mu, sd), = fewshot.standardiser(maps[:1])
  z = (maps[0] - mu) / sd
  np.testing.assert_allclose(z.reshape(-1, 8).mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(z.reshape(-1, 8).std(0), 1, atol=1e-4)


def test_fewshot_cli_writes_splits_and_spread(tmp_path):
  out = tmp_path / "fewshot.json"
  assert cli.main(["eval", "fewshot", "--encoder", "random:mu/16", "--image-size", "32", "--synthetic-count", "24",
                   "--synthetic-size", "64", "--shots", "6", "--splits", "2", "--steps", "40", "--seg-channels",
                   "16", "--batch-size", "8", "--out", str(out)]) == 0
  res = json.loads(out.read_text())["trained"]["segmentation"]
  assert res["task"] == "head_symphysis_multi" and res["test_images"] == 24 and len(res["splits"]) == 2
  assert res["head"] == "upernet" and res["lr"] == fewshot.HEAD_LR["upernet"]
  draws = [r["train_images"] for r in res["splits"]]
  assert all(len(set(d)) == 6 for d in draws) and draws[0] != draws[1]
  vals = [r["mDice"] for r in res["splits"]]
  assert res["mDice"] == pytest.approx(np.mean(vals)) and res["mDice_std"] == pytest.approx(np.std(vals, ddof=1))
  # the head learns the foreground: pooled foreground Dice above predicting the majority class everywhere (0)
  assert min(r["mfDice"] for r in res["splits"]) > 0.2, res["splits"]
