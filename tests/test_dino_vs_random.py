"""Issue 13 acceptance: a smoke UltraDINO pretraining (simulator images + pydicom's real echo / cine frames)
lowers the loss, keeps RankMe above its threshold, and its frozen teacher beats randomly initialised encoders of
the same architecture on the linear probe's macro F1 (fetal_plane_cls) and on few-shot mDice under DINOv2's
linear segmentation protocol (head_symphysis_multi), simulator splits, one protocol for every encoder. The random
baseline is evaluated at several seeds (the teacher's own init seed 0 among them); the message gives every number
(mean, sample std, max), so the margin and the spread are visible.

Linear probe macro F1 in the same run: teacher 0.653 vs random 0.561 +- 0.099 (max 0.632, seeds 0-2); k-NN F1
0.534 vs 0.514 +- 0.009 (not asserted). Whole test: ~85 s on 2 shared CPU cores (pretraining ~35 s).

Few-shot protocol (FEWSHOT: 8 shots x 3 splits, 200 head steps, 64 px, the same draws for every encoder), two
heads (evals/fewshot.py), measured on 2026-11-28 with this recipe (300 steps), random init seeds 0-7:

  head                      teacher   random mean +- sd (seeds 0-7)   random max   random seeds 0, 1, 2
  linear    (lr 1e-1)       0.5966    0.5695 +- 0.0111                 0.5819       0.5795 0.5580 0.5689
  linear+ms (lr 1e-1)       0.6054    0.5660 +- 0.0121                 0.5794       0.5792 0.5572 0.5765
  upernet   (lr 1e-3)       0.7976    0.8071 +- 0.0074 (seeds 0-2)     0.8143       0.7995 0.8075 0.8143

Asserted: linear mDice above every random seed (teacher - random mean = 2.4 sd of the seeds; teachers pretrained
with seeds 1 and 2 give 0.6128 and 0.6068, also above). Not asserted: the default UperNet-lite head,
where the teacher ties with (here: is below) random init. Its convolutions over four blocks, the first close to
the pixels, segment the simulator's intensity-defined structures from a random projection of the pixels as well,
so the head, not the features, decides; the linear head on the last block's tokens leaves that to the features.
At lr 1e-3 (the UperNet's) the linear head is far from converged in 200 steps (teacher 0.393, random 0.385 /
0.412 / 0.414), hence its own lr (fewshot.HEAD_LR; 1e-1 x 200 steps = 1e-2 x 1000 steps, converged).

The loss (mean of the first / last five logged values, every 10 steps). The DINO term is a cross-entropy to a
moving target, CE(t, s) = H(t) + KL(t || s): its floor H(t) is the teacher's own entropy, which rises at smoke
scale (EMA centring over 256 prototypes flattens the targets), so the total loss follows the teacher rather than
the student. Measured (simulator of 2026-11-28):
  300 steps  loss 7.286 -> 7.203 (-0.08), teacher entropy 4.547 -> 4.811, KL(t || s) 0.255 -> 0.082, KoLeo 2.30 ->
             0.19, loss - H(t) 2.739 -> 2.392; RankMe 9.6 at step 200
  600 steps  loss 7.313 -> 7.786 (+0.47), teacher entropy 4.544 -> 5.052, KL 0.262 -> 0.090, iBOT 2.27 -> 2.60,
             KoLeo 2.34 -> 0.19; RankMe 6.8 -> 13.6
Epoch-based warm-ups scaled to the run's length (600 steps: lr 100, teacher temperature 200 steps) make the rise
larger (5.74 -> 7.80: the low warm-up temperature gives sharper, lower-entropy targets early), so the schedule is
not the cause. Asserted: at 300 steps the total loss falls (by any amount), the loss less H(t) falls by > 0.1 and
the KL halves (both measure the student, at a fixed target)."""

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
# one protocol for every encoder: 64 px (the smoke global crop), 96 simulator images per split; few-shot: 8 shots
# over 3 random splits, 200 head steps; the head's lr is fewshot.HEAD_LR[head] (UperNet: 1e-3, linear: 1e-1)
EVAL = dict(image_size=64, batch_size=32, synthetic_count=96, synthetic_size=96)
FEWSHOT = dict(shots=8, splits=3, steps=200, seg_channels=64, seed=0)
HEADS = ("linear", "linear+ms")  # evaluated; the UperNet-lite ("upernet") ties, see the module docstring


def evaluate(encoder, heads=HEADS) -> dict:
  cfg = suite.data_config("synthetic", **EVAL)
  cls = suite.classification(encoder, "synthetic", cfg, ks=(10,), seed=0)
  out = {"linear_f1": cls["linear"]["f1_macro"], "knn_f1": cls["knn"]["k=10"]["f1_macro"]}
  for head in heads:
    seg = suite.segmentation(encoder, "synthetic", cfg, head=head, **FEWSHOT)
    out[f"{head}_mDice"], out[f"{head}_mfDice"] = seg["mDice"], seg["mfDice"]
  return out


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
  # the loss less the teacher's entropy (the DINO term's floor, H(t) of CE(t, s) = H(t) + KL(t || s)) falls; the
  # total loss alone follows the teacher's entropy at smoke scale (module docstring)
  excess = [r["loss"] - r["teacher_entropy"] for r in rows if "loss" in r]
  kl = [r["student_teacher_kl"] for r in rows if "loss" in r]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
  assert np.mean(excess[-5:]) < np.mean(excess[:5]) - 0.1, (losses, excess)
  assert np.mean(kl[-5:]) < 0.5 * np.mean(kl[:5]), kl
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
  assert trained["linear_mDice"] > summary["linear_mDice"]["random_max"], msg
