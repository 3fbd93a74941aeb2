"""The study view of the report: groups, sizes, summaries and figures from fake runs; a smoke scale sweep."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from m2dino_jax import cli
from m2dino_jax.report import compare, study, study_plots
from m2dino_jax.tasks import registry, results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# primary metric per task and paradigm, n_train per task; the deltas (%) below follow by hand
TS = {"fetal_head": (0.8, 100), "FUGC": (5.0, 400), "breast_2cls": (0.75, 30), "thyroid_nodule_det": (0.5, 60)}
CG = {"fetal_head": 0.72, "FUGC": 6.0, "breast_2cls": 0.9, "thyroid_nodule_det": 0.55}
AU = {"fetal_head": 0.88, "FUGC": 4.0, "breast_2cls": math.nan, "thyroid_nodule_det": 0.4}
GROUPS = {"Fet": ["fetal_head", "FUGC"], "Br": ["breast_2cls"], "Thy": ["thyroid_nodule_det"]}
DELTA = {"cg": {"fetal_head": -10.0, "FUGC": -20.0, "breast_2cls": 20.0, "thyroid_nodule_det": 10.0},
         "au": {"fetal_head": 10.0, "FUGC": 20.0, "breast_2cls": math.nan, "thyroid_nodule_det": -20.0}}


def _metrics(task, value, n_train):
  name = {"segmentation": "dice", "classification": "auc", "detection": "iou", "regression": "mre"}
  return {name[registry.get(task).type]: value, "n": 10, "n_train": n_train, "n_train_available": 2 * n_train}


def _runs(tmp_path):
  root = tmp_path / "runs"
  for task, (v, n) in TS.items():
    results.write_eval(root / "ts" / task / "eval", 5, "ts", {task: _metrics(task, v, n)},
                       data={"train_fraction": 0.5})
  for group, tasks in GROUPS.items():
    results.write_eval(root / "cg" / group / "eval", 5, "cg", {t: _metrics(t, CG[t], TS[t][1]) for t in tasks})
  results.write_eval(root / "au" / "eval", 5, "au", {t: _metrics(t, AU[t], TS[t][1]) for t in AU})
  results.write_moe_usage(root / "au" / "eval", 5, 4, [2, 3], list(AU), np.eye(4) * 6,
                          per_layer=[np.eye(4) * 3, np.ones((4, 4))])
  return root


def test_study_view_numbers_equal_hand_computation(tmp_path):
  root = _runs(tmp_path)
  a = compare.analyse({p: root / p for p in ("ts", "cg", "au")})
  assert {g: [p.task for p in a.points if p.group == g] for g in GROUPS} == \
      {"Fet": ["FUGC", "fetal_head"], "Br": ["breast_2cls"], "Thy": ["thyroid_nodule_det"]}  # the CG run's groups
  for p in a.points:
    assert p.n_train == {"ts": TS[p.task][1], "cg": TS[p.task][1], "au": TS[p.task][1]}
    for lab in ("cg", "au"):
      want, got = DELTA[lab][p.task], p.deltas[lab]
      assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want), (p.task, lab)
  by_group = study.summaries(a.points, "group")
  fet = by_group["Fet"]["cg"]
  assert (fet.mean, fet.spread, fet.worst, fet.worst_task, fet.negative, fet.count) == \
      (pytest.approx(-15.0), pytest.approx(5.0), pytest.approx(-20.0), "FUGC", 2, 2)
  br = by_group["Br"]["au"]
  assert math.isnan(br.mean) and (br.negative, br.count, br.total) == (0, 0, 1)
  by_type = study.summaries(a.points, "type")
  assert by_type["detection"]["au"].negative == 1 and by_type["regression"]["au"].mean == pytest.approx(20.0)
  assert a.runs[0].data == {"train_fraction": 0.5} and a.runs[1].data == {}
  written = compare.write_report(a, tmp_path / "out")
  md = written["markdown"].read_text()
  assert "| Fet | fetal_head | dice ↑ | 0.8000 | 0.7200 | 0.8800 | -10.00% | +10.00% | 100 | 10 |" in md
  assert "| Br | breast_2cls | auc ↑ | 0.7500 | 0.9000 | n/a | +20.00% | n/a | 30 | 10 |" in md
  assert "| Fet | -15.00% ± 5.00 | -20.00% (FUGC) | 2/2 |" in md
  assert "| Br | +20.00% ± 0.00 | +20.00% (breast_2cls) | 0/1 | n/a | n/a | 0/0 (1 n/a) |" in md
  # specialisation: layer 2 on disjoint experts (1), layer 3 uniform (0), the sum: eye*6 + ... = 1
  assert "| au | 2: 1.0000, 3: 0.0000 | 1.0000 |" in md
  for kind in ("fig2_absolute", "fig3_delta", "delta_vs_size", "bars", "delta_heatmap"):
    assert written[kind].read_bytes()[:8] == PNG_MAGIC, kind
  xs, ys = [30, 100, 400, 60], [1.0, 3.0, 2.0, 5.0]
  b, a0 = np.polyfit(np.log10(xs), ys, 1)
  assert study_plots.trend(xs, ys) == (pytest.approx(a0), pytest.approx(b))
  assert study_plots.trend([5, 5], [1, 2]) is None


SMALL = ["--config.data.image_size=32", "--config.data.source.synthetic_count=16", "--config.data.batch_size=4",
         "--config.data.eval_batch_size=8", "--config.tensorboard=False", "--config.log_every=100"]
FOUR = "fetal_head+breast_2cls+thyroid_nodule_det+fetal_femur"


@pytest.mark.slow
def test_smoke_scale_sweep_and_its_report(tmp_path):
  """TS / CG / AU at fractions 0.5 and 1 on 4 tasks in one command; eval files record the subset sizes; the
  sweep report renders every figure and its numbers equal the eval files."""
  work, out = tmp_path / "scale", tmp_path / "report"
  assert cli.main(["train", f"--config=configs/m2dino.py:scale,smoke,tasks={FOUR},steps=2", f"--workdir={work}",
                   "--config.sweep.fractions=0.5,1.0", *SMALL]) == 0
  assert cli.main(["report", "--sweep", str(work), "--out", str(out)]) == 0
  rows = list(csv.DictReader(open(out / "scale.csv")))
  assert len(rows) == 2 * 4 * 3
  for fraction, n_train in ((0.5, 8), (1.0, 16)):  # 16 simulated train images per task
    for paradigm in ("ts", "cg", "au"):
      run = results.load_run(work / f"frac{fraction:g}" / paradigm, paradigm)
      assert run.data["train_fraction"] == fraction
      assert {t: (m["n_train"], m["n_train_available"], m["n"]) for t, m in run.tasks.items()} == \
          {t: (n_train, 16, 16) for t in FOUR.split("+")}
      for row in rows:
        if float(row["fraction"]) == fraction and row["run"] == paradigm:
          assert float(row["value"]) == run.tasks[row["task"]][row["metric"]]
          assert int(row["n_train"]) == n_train
    assert {p.name for p in (work / f"frac{fraction:g}" / "cg").iterdir() if p.is_dir()} == \
        {"Fetal", "Breast", "Thyroid"}
    pngs = {p.name for p in (out / f"frac{fraction:g}").glob("*.png")}
    assert {"fig2_absolute.png", "fig3_delta.png", "delta_vs_size.png", "bars.png", "delta_heatmap.png",
            "moe_usage_au_all.png"} <= pngs, pngs
  for name in ("delta_vs_size.png", "scale_curve.png"):
    assert (out / name).read_bytes()[:8] == PNG_MAGIC
  md = (out / "scale.md").read_text()
  assert "| all | cg |" in md and "| Fetal | au |" in md
