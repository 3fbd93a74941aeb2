"""Issue 13 acceptance: a smoke UltraDINO pretraining (simulator images + pydicom's real echo / cine frames)
lowers the loss, keeps RankMe above its threshold, and its frozen teacher beats randomly initialised encoders of
the same architecture on the linear probe's macro F1 (fetal_plane_cls, simulator splits), one protocol for every
encoder. The random baseline is evaluated at several seeds (the teacher's own init seed 0 among them); the
message gives every number (mean, sample std, max), so the margin and the spread are visible.

Not asserted: few-shot mDice. Measured on 2026-11-28 with this recipe (300 steps) and the protocol of FEWSHOT
below (head_symphysis_multi, 8 shots x 3 splits, 200 head steps, 64 px): teacher mDice 0.804 vs random init
0.793 (seed 0) and 0.806 (seed 1), i.e. no better than random at smoke scale (linear F1 in the same run: 0.724 vs
0.610 / 0.599). Pretraining on the evaluation tasks' own (unlabelled) simulator images as well gave mDice 0.806,
linear 0.706: no change. `evaluate_fewshot` keeps the protocol for whoever revisits it at a larger scale."""

import json
import shutil

import numpy as np
import pytest

from configs import ultradino
from m2dino_jax.evals import frozen, suite
from m2dino_jax.train import loop
from m2dino_jax.train.dino import trainer

DICOMS = ("US1_UNCR.dcm", "gdcm-US-ALOKA-16.dcm", "color3d_jpeg_baseline.dcm")
STEPS = 300
RANDOM_SEEDS = (0, 1, 2)
# one protocol for every encoder: 64 px (the smoke global crop), 96 simulator images per split; few-shot (not
# asserted, see the module docstring): 8 shots over 3 random splits, 200 head steps
EVAL = dict(image_size=64, batch_size=32, synthetic_count=96, synthetic_size=96)
FEWSHOT = dict(shots=8, splits=3, steps=200, lr=1e-3, seg_channels=64, seed=0)


def evaluate(encoder) -> dict:
  cfg = suite.data_config("synthetic", **EVAL)
  cls = suite.classification(encoder, "synthetic", cfg, ks=(10,), seed=0)
  return {"linear_f1": cls["linear"]["f1_macro"], "knn_f1": cls["knn"]["k=10"]["f1_macro"]}


def evaluate_fewshot(encoder) -> dict:
  seg = suite.segmentation(encoder, "synthetic", suite.data_config("synthetic", **EVAL), **FEWSHOT)
  return {"mDice": seg["mDice"], "mfDice": seg["mfDice"]}


@pytest.mark.slow
def test_pretrained_teacher_beats_random_init(tmp_path):
  from pydicom.data import get_testdata_file
  dicom = tmp_path / "dicom"
  dicom.mkdir()
  for name in DICOMS:
    shutil.copy(get_testdata_file(name), dicom / name)
  c = ultradino.get_config(f"smoke,steps={STEPS}")
  c.data.sources = f"synthetic=1;folder:{dicom}=1"
  c.checkpoint.async_save, c.checkpoint.every, c.monitor.every, c.log_every = False, 10**6, 100, 10
  work = tmp_path / "run"
  assert trainer.Run(c, work).train() == loop.COMPLETED
  rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
  ranks = [r["monitor/rankme"] for r in rows if "monitor/rankme" in r]
  assert ranks and min(ranks) > c.monitor.min_rankme, ranks

  trained = evaluate(frozen.load_encoder(str(work / "teacher"), in_chans=1))
  rand = [evaluate(frozen.load_encoder(str(work / "teacher"), in_chans=1, random_init=True, seed=s))
          for s in RANDOM_SEEDS]
  summary = {m: {"trained": round(trained[m], 4), "random_mean": round(float(np.mean([r[m] for r in rand])), 4),
                 "random_std": round(float(np.std([r[m] for r in rand], ddof=1)), 4),
                 "random_max": round(float(np.max([r[m] for r in rand])), 4)} for m in trained}
  msg = f"random seeds {RANDOM_SEEDS}: {json.dumps(summary)}"
  print(msg)
  assert trained["linear_f1"] > summary["linear_f1"]["random_max"], msg
