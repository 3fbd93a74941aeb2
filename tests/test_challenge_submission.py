"""Whole-submission predict of a smoke model on official-form data, scored by an independent
re-implementation of the official evaluate.py (written here from its documented behaviour: csv + PIL +
SimpleITK + scikit-learn, no project code) and by m2dino's own scoring: equal to 1e-6 for every task."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from sklearn import metrics as skm

from m2dino_jax import cli, configlib, fileio
from m2dino_jax.infer import challenge
from m2dino_jax.train import checkpointing
from m2dino_jax.train.multitask import trainer
from tests.test_challenge_data import write_official

FOUR = "fetal_head+breast_2cls+thyroid_nodule_det+fetal_femur"


@pytest.fixture(scope="module")
def au_run(tmp_path_factory):
  """A run folder as training leaves it (config.json, <model>/tasks.json, <model>/best/params), holding an
  initialised smoke AU model: the formats and scores do not depend on training."""
  root = tmp_path_factory.mktemp("run")
  config = configlib.load_config(f"configs/m2dino.py:paradigm=au,smoke,tasks={FOUR}",
                                 ["data.image_size=32", "tensorboard=False"])
  fileio.write_text(root / "config.json", config.to_json_best_effort(indent=2))
  tasks = trainer.plan_models(config)[0][1]
  moe = trainer.moe_enabled(config)
  encoder, heads = trainer.build_modules(config, tasks, moe_on=moe, seed=config.seed)
  _, enc_params, _, _, head_params = trainer.split_model(encoder, heads)
  checkpointing.save_params(root / "all" / "best" / "params", {"encoder": enc_params, "heads": head_params})
  fileio.write_json(root / "all" / "tasks.json", {"model": "all", "tasks": [t.name for t in tasks], "moe": moe})
  return root


def _official_hd(a, b):
  if not a.any() and not b.any():
    return 0.0
  if not a.any() or not b.any():
    return math.hypot(*a.shape)
  f = sitk.HausdorffDistanceImageFilter()
  f.Execute(sitk.GetImageFromArray(a.astype(np.uint8) * 255), sitk.GetImageFromArray(b.astype(np.uint8) * 255))
  return f.GetHausdorffDistance()


def official_evaluate(data_root: Path, pred_root: Path) -> dict:
  """evaluate.py's numbers: {task: {metric: value, 'n': samples}}."""
  rows = [r for f in sorted((data_root / "csv_files").glob("*.csv")) for r in csv.DictReader(open(f))]
  preds = {}
  for name in ("classification", "detection", "regression"):
    f = pred_root / f"{name}_predictions.json"
    if f.is_file():
      preds.update({(e["task_id"], e["image_path"]): e for e in json.loads(f.read_text())})
  out = {}
  for task in sorted({r["task_id"] for r in rows}):
    trs = [r for r in rows if r["task_id"] == task]
    kind, c = trs[0]["task_name"], int(trs[0]["num_classes"])
    if kind == "segmentation":
      dsc, hd = [[] for _ in range(c)], [[] for _ in range(c)]
      for r in trs:
        gt = np.asarray(Image.open(data_root / "csv_files" / r["mask_path"]).convert("L"))
        pm = np.asarray(Image.open(pred_root / r["mask_path"].replace("../", "")).convert("L"))
        for k in range(c):
          a, b = pm == k, gt == k
          s = a.sum() + b.sum()
          dsc[k].append(1.0 if s == 0 else 2.0 * (a & b).sum() / s)
          hd[k].append(_official_hd(a, b))
      out[task] = {"dice": np.mean([np.mean(dsc[k]) for k in range(1, c)]),
                   "hd": np.mean([np.mean(hd[k]) for k in range(1, c)]), "n": len(trs)}
    elif kind == "classification":
      es = [(int(float(r["mask"])), preds[(task, r["image_path"])]) for r in trs]
      y = np.array([g for g, _ in es])
      yhat = np.array([e["predicted_class"] for _, e in es])
      p = np.array([e["predicted_probs"] for _, e in es])
      # scikit-learn 1.2.2 raises on one class or a multiclass set missing a class; evaluate.py scores 0.0
      if np.unique(y).size < 2 or (c > 2 and np.unique(y).size != c):
        auc = 0.0
      else:
        auc = skm.roc_auc_score(y, p[:, 1]) if c == 2 else skm.roc_auc_score(y, p, average="macro",
                                                                             multi_class="ovr")
      out[task] = {"auc": auc, "accuracy": np.mean(y == yhat),
                   "f1_macro": skm.f1_score(y, yhat, average="macro", zero_division=0),
                   "f1_weighted": skm.f1_score(y, yhat, average="weighted", zero_division=0),
                   "mcc": skm.matthews_corrcoef(y, yhat), "n": len(es)}
    elif kind == "detection":
      ious = []
      for r in trs:
        g = [float(r[k]) for k in ("x_min", "y_min", "x_max", "y_max")]
        q = preds[(task, r["image_path"])]["bbox_pixels"]
        inter = max(0, min(q[2], g[2]) - max(q[0], g[0])) * max(0, min(q[3], g[3]) - max(q[1], g[1]))
        union = (q[2] - q[0]) * (q[3] - q[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
        ious.append(0.0 if union == 0 else inter / union)
      out[task] = {"iou": np.mean(ious), "n": len(ious)}
    else:
      mres = []
      for r in trs:
        g = np.array([json.loads(r[f"point_{i}_xy"]) for i in range(1, c + 1)], float)
        q = np.array(preds[(task, r["image_path"])]["predicted_points_pixels"], float).reshape(-1, 2)
        mres.append(np.mean(np.sqrt(((q - g) ** 2).sum(1))))
      out[task] = {"mre": np.mean(mres), "n": len(mres)}
  return out


def test_whole_submission_matches_the_official_evaluation(au_run, tmp_path):
  data_root = tmp_path / "val"
  written = write_official(data_root, FOUR.split("+"), n=6, size=56)
  out = tmp_path / "out"
  assert cli.main(["predict", "--workdir", str(au_run), "--data-root", str(data_root), "--out", str(out),
                   "--no-progress", "--batch-size", "4"]) == 0
  # the official layout
  seg = [rel for rel, _ in written["fetal_head"]]
  for rel in seg:
    m = np.asarray(Image.open(out / rel.replace("../", "").replace("/images/", "/MASKS/")))
    assert m.shape == (56, 56) and set(np.unique(m)) <= {0, 1}
  det = json.loads((out / "detection_predictions.json").read_text())
  assert [e["image_path"] for e in det] == [rel for rel, _ in written["thyroid_nodule_det"]]
  assert all(len(e["bbox_pixels"]) == 4 and np.allclose(np.array(e["bbox_pixels"]) / 56, e["bbox_normalized"])
             for e in det)
  reg = json.loads((out / "regression_predictions.json").read_text())
  assert all(e["task_id"] == "fetal_femur" and len(e["predicted_points_pixels"]) == 4 for e in reg)
  want = official_evaluate(data_root, out)
  got = challenge.score(data_root, out, convention="official")
  assert set(got) == set(want) == set(FOUR.split("+"))
  for task, metrics_ in want.items():
    assert got[task]["n"] == metrics_["n"] == 6
    for k, v in metrics_.items():
      assert got[task][k] == pytest.approx(v, abs=1e-6), (task, k)
  # a second run for one task keeps every other entry and replaces its own
  other = tmp_path / "other"
  write_official(other, ["breast_2cls"], n=2, size=40, seed=9)
  before = json.loads((out / "classification_predictions.json").read_text())
  assert cli.main(["predict", "--workdir", str(au_run), "--data-root", str(other), "--out", str(out),
                   "--no-progress"]) == 0
  after = json.loads((out / "classification_predictions.json").read_text())
  keys = [(e["task_id"], e["image_path"]) for e in after]
  assert len(keys) == len(set(keys)) == 6  # same CSV paths as the first run: replaced, not duplicated
  assert {k for k in keys} == {(e["task_id"], e["image_path"]) for e in before}
  assert json.loads((out / "detection_predictions.json").read_text()) == det
