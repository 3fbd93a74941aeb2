"""The paradigm report on fake run folders: numbers equal the eval JSON, deltas equal hand-computed ones."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from matplotlib import image as mpimg

from m2dino_jax import cli
from m2dino_jax.errors import DataError, M2DinoError
from m2dino_jax.report import cli as report_cli
from m2dino_jax.report import paradigm
from m2dino_jax.tasks import results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Metrics per paradigm; deltas below are computed by hand from these.
TS = {"fetal_head": {"dice": 0.8, "hd": 10.0, "n": 20},
      "breast_2cls": {"auc": 0.75, "accuracy": 0.7, "f1_macro": 0.6, "f1_weighted": 0.65, "mcc": 0.4,
                      "n": 30},
      "thyroid_nodule_det": {"iou": 0.5, "n": 10},
      "FUGC": {"mre": 5.0, "n": 12}}
CG = {"fetal_head": {"dice": 0.72, "hd": 12.5, "n": 20},
      "breast_2cls": {"auc": 0.9, "accuracy": 0.77, "f1_macro": 0.6, "f1_weighted": 0.65, "mcc": 0.5,
                      "n": 30},
      "thyroid_nodule_det": {"iou": 0.55, "n": 10},
      "FUGC": {"mre": 6.0, "n": 12}}
AU = {"fetal_head": {"dice": 0.88, "hd": 8.0, "n": 20},
      "breast_2cls": {"auc": math.nan, "accuracy": 0.63, "f1_macro": 0.3, "f1_weighted": 0.65, "mcc": 0.0,
                      "n": 28},
      "thyroid_nodule_det": {"iou": 0.4, "n": 10},
      "FUGC": {"mre": 4.0, "n": 12}}
GROUPS = {"fetal": ["fetal_head", "FUGC"], "breast": ["breast_2cls"], "thyroid": ["thyroid_nodule_det"]}
EXPECTED_DELTAS = {  # (task, metric) -> {cg, au} in %, positive = better
    ("fetal_head", "dice"): {"cg": -10.0, "au": 10.0},
    ("fetal_head", "hd"): {"cg": -25.0, "au": 20.0},
    ("breast_2cls", "auc"): {"cg": 20.0, "au": math.nan},
    ("breast_2cls", "mcc"): {"cg": 25.0, "au": -100.0},
    ("thyroid_nodule_det", "iou"): {"cg": 10.0, "au": -20.0},
    ("FUGC", "mre"): {"cg": -20.0, "au": 20.0},
}


def _scaled(metrics: dict, factor: float) -> dict:
  return {t: {k: (v if k == "n" else v * factor) for k, v in m.items()} for t, m in metrics.items()}


def _make_runs(tmp_path):
  """TS: one model per task, several steps (latest wins) and one best.json; CG: per group; AU: one model."""
  root = tmp_path / "runs"
  for task, values in TS.items():
    ev = root / "ts" / task / "eval"
    results.write_eval(ev, 100, "ts", _scaled({task: values}, 0.5))
    # NumPy scalars are written as plain numbers; per-class lists are kept but are not table cells.
    extras = {"dice_per_class": [np.float32(0.25)]} if task == "fetal_head" else {}
    results.write_eval(ev, 200, "ts", {task: {k: np.float64(v) for k, v in values.items()} | extras})
    if task == "FUGC":  # best.json (a copy) is an older step and must win over the latest
      results.write_eval(ev, 50, "ts", {task: values})
      results.write_eval(ev, 300, "ts", _scaled({task: values}, 3.0))
      results.write_best(ev, 50)
    if task == "thyroid_nodule_det":  # best.json as a symlink
      results.write_eval(ev, 300, "ts", _scaled({task: values}, 3.0))
      (ev / "best.json").symlink_to("200.json")
  for group, tasks in GROUPS.items():
    ev = root / "cg" / group / "eval"
    results.write_eval(ev, 1000, "cg", {t: CG[t] for t in tasks})
    usage = np.arange(len(tasks) * 4).reshape(len(tasks), 4) + 1
    results.write_moe_usage(ev, 1000, 4, [8, 9, 10, 11], tasks, usage)
  ev = root / "au" / "eval"
  results.write_eval(ev, 10, "au", _scaled(AU, 0.1))
  results.write_eval(ev, 3000, "au", AU)
  results.write_moe_usage(ev, 3000, 4, [8, 9, 10, 11], list(AU), [[5, 0, 0, 5], [1, 1, 1, 1], [0, 0, 0, 0],
                                                                     [9, 1, 0, 0]])
  (root / "au" / "checkpoints").mkdir()  # a non-eval sibling folder is ignored
  return root


def test_report_tables_equal_eval_json_and_deltas(tmp_path, capsys):
  root, out = _make_runs(tmp_path), tmp_path / "report"
  rc = cli.main(["report", "--runs", f"ts={root / 'ts'}", f"cg={root / 'cg'}", f"au={root / 'au'}",
                 "--out", str(out)])
  assert rc == 0
  assert "# Paradigm comparison" in capsys.readouterr().out

  with open(out / "report.csv") as f:
    rows = {(r["task"], r["metric"]): r for r in csv.DictReader(f)}
  expected_cells = {(t, m) for t in TS for m in TS[t] if m != "n"}
  assert set(rows) == expected_cells
  for (task, metric), row in rows.items():
    for label, source in (("ts", TS), ("cg", CG), ("au", AU)):
      want, got = source[task][metric], float(row[label])
      assert (math.isnan(want) and math.isnan(got)) or got == want, (task, metric, label)
  for key, deltas in EXPECTED_DELTAS.items():
    for label, want in deltas.items():
      got = float(rows[key][f"delta_{label}_pct"])
      assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, abs=1e-9), (key, label)
  assert rows[("fetal_head", "hd")]["higher_is_better"] == "0"
  # Task types come in registry order: segmentation, classification, detection, regression.
  with open(out / "report.csv") as f:
    assert [r["type"] for r in csv.DictReader(f)][::2][:2] == ["segmentation", "classification"]

  md = (out / "report.md").read_text()
  assert "| fetal_head | hd ↓ | 10.0000 | 12.5000 | 8.0000 | -25.00% | +20.00% |" in md
  assert "| breast_2cls | auc ↑ | 0.7500 | 0.9000 | n/a | +20.00% | n/a |" in md
  # Mean primary-metric change per type: here one task per type, so the task's own delta.
  assert "| regression | -20.00% | +20.00% |" in md
  assert "breast_2cls: evaluated on different numbers of examples: ts=30, cg=30, au=28" in md

  pngs = ["bars.png", "delta_heatmap.png", "moe_usage_au.png", "moe_usage_cg_fetal.png",
          "moe_usage_cg_breast.png", "moe_usage_cg_thyroid.png", "fig2_absolute.png", "fig3_delta.png"]
  assert sorted(p.name for p in out.glob("*.png")) == sorted(pngs)
  for name in pngs:
    assert (out / name).read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(out / name)
    assert img.ndim == 3 and min(img.shape[:2]) > 100


def test_type_summary_averages_primary_deltas(tmp_path):
  root = tmp_path / "runs"
  results.write_eval(root / "ts" / "eval", 1, "ts", {"fetal_head": {"dice": 0.5, "hd": 4.0, "n": 3},
                                                      "lung": {"dice": 0.8, "hd": 2.0, "n": 3}})
  results.write_eval(root / "au" / "eval", 1, "au", {"fetal_head": {"dice": 0.6, "hd": 1.0, "n": 3},
                                                      "lung": {"dice": 0.4, "hd": 3.0, "n": 3}})
  runs = [results.load_run(root / "ts", "ts"), results.load_run(root / "au", "au")]
  summary = paradigm.type_summary(paradigm.build_rows(runs))
  assert summary == {"segmentation": {"au": pytest.approx((20.0 - 50.0) / 2)}}


def test_eval_file_roundtrip_and_moe(tmp_path):
  ev = tmp_path / "eval"
  results.write_eval(ev, 7, "au", {"breast_2cls": {"auc": math.nan, "accuracy": 0.5, "n": 4}})
  results.write_eval(ev, 8, "au", {"lung": {"dice": np.float32(0.5), "n": np.float64(3)}})
  assert json.loads((ev / "8.json").read_text())["tasks"] == {"lung": {"dice": 0.5, "n": 3}}
  raw = json.loads((ev / "7.json").read_text())
  assert raw == {"step": 7, "paradigm": "au",
                 "tasks": {"breast_2cls": {"auc": None, "accuracy": 0.5, "n": 4}}}
  back = results.read_eval_file(ev / "7.json")
  assert math.isnan(back["tasks"]["breast_2cls"]["auc"]) and back["tasks"]["breast_2cls"]["n"] == 4
  with pytest.raises(ValueError):
    results.write_moe_usage(ev, 7, 3, [1], ["a", "b"], [[1, 2, 3]])


def test_report_errors_name_the_problem(tmp_path, capsys):
  missing = tmp_path / "nope"
  assert cli.main(["report", "--runs", f"ts={missing}", "--out", str(tmp_path / "o")]) == 2
  assert str(missing) in capsys.readouterr().err

  empty = tmp_path / "empty"
  (empty / "model" / "eval").mkdir(parents=True)
  with pytest.raises(M2DinoError, match=str(empty)):
    results.load_run(empty, "au")
  with pytest.raises(M2DinoError, match="LABEL=DIR"):
    report_cli._parse_runs(["ts"])
  with pytest.raises(M2DinoError, match="--baseline 'xx'"):
    report_cli.make_report({"ts": missing}, tmp_path / "o", baseline="xx")

  dup = tmp_path / "dup"
  results.write_eval(dup / "a" / "eval", 1, "cg", {"lung": {"dice": 0.1, "hd": 1.0, "n": 1}})
  results.write_eval(dup / "b" / "eval", 1, "cg", {"lung": {"dice": 0.2, "hd": 1.0, "n": 1}})
  with pytest.raises(DataError, match="also evaluated"):
    results.load_run(dup, "cg")
  with pytest.raises(DataError, match="paradigm 'cg'"):
    results.load_run(dup / "a", "ts")

  bad = tmp_path / "bad" / "eval"
  bad.mkdir(parents=True)
  (bad / "3.json").write_text('{"step": 3, "tasks": {"lung": {"dice": "high"}}}')
  with pytest.raises(DataError, match=r"3\.json.*'dice'"):
    results.load_run(bad.parent, "au")


def test_report_without_baseline_has_values_but_no_deltas(tmp_path):
  root = _make_runs(tmp_path)
  written = report_cli.make_report({"au": root / "au"}, tmp_path / "o")
  assert "delta_heatmap" not in written and written["bars"].read_bytes()[:8] == PNG_MAGIC
  with open(written["csv"]) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["task", "type", "metric", "higher_is_better", "au"]
  assert {(r["task"], r["metric"]): float(r["au"]) for r in rows}[("FUGC", "mre")] == AU["FUGC"]["mre"]
  assert "No `ts` run was given" in written["markdown"].read_text()


def test_bar_plot_shows_values_units_chance_counts_and_marks_na(tmp_path):
  """bars.png's artists: values on the bars, y labels with units, AUC's chance line, n per task in the tick
  labels, and AU's undefined AUC as a hatched "n/a" placeholder rather than a bar of height 0."""
  from matplotlib.lines import Line2D

  from m2dino_jax.report import plots
  root = tmp_path / "runs"
  for label, source in (("ts", TS), ("cg", CG), ("au", AU)):
    results.write_eval(root / label / "eval", 1, label, source)
  runs = [results.load_run(root / label, label) for label in ("ts", "cg", "au")]
  rows = paradigm.build_rows(runs, "ts")
  fig = plots.bars_figure(rows, ["ts", "cg", "au"], plots.eval_counts(runs))
  axes = {ax.get_title().split(":")[0]: ax for ax in fig.axes}
  assert list(axes) == ["segmentation", "classification", "detection", "regression"]
  cls, reg = axes["classification"], axes["regression"]
  # y labels with units, titles with the better direction
  assert cls.get_ylabel() == "AUC (0-1)" and reg.get_ylabel() == "MRE (px, original image)"
  assert axes["segmentation"].get_ylabel() == "Dice (0-1)"
  assert "higher is better" in cls.get_title() and "lower is better" in reg.get_title()
  # chance line at AUC 0.5 on the classification panel only
  chance = [ln for ln in cls.get_lines() if isinstance(ln, Line2D) and list(ln.get_ydata()) == [0.5, 0.5]]
  assert len(chance) == 1 and not [ln for ln in reg.get_lines() if ln.get_linestyle() == "--"]
  # n per task in the tick labels (runs that differ show both)
  assert [t.get_text() for t in cls.get_xticklabels()] == ["breast_2cls\nn=28/30"]
  assert [t.get_text() for t in reg.get_xticklabels()] == ["FUGC\nn=12"]
  # bars carry their values; AU's AUC is no bar at all, but a hatched placeholder with the text n/a
  bars = {c.get_label(): [p.get_height() for p in c.patches] for c in cls.containers}
  assert bars["ts"] == [0.75] and bars["cg"] == [0.9] and bars["au"] == []
  texts = [t.get_text() for t in cls.texts]
  assert "0.75" in texts and "0.90" in texts and texts.count("n/a") == 1
  hatched = [p for p in cls.patches if p.get_hatch()]
  assert len(hatched) == 1 and hatched[0].get_height() == pytest.approx(0.9) and not hatched[0].get_fill()
  legend = cls.get_legend()
  assert [t.get_text() for t in legend.get_texts()] == ["ts", "cg", "au", "chance (0.5)", "n/a (undefined)"]
  from matplotlib.colors import to_rgba
  assert legend.legend_handles[2].get_facecolor() == to_rgba("C2")  # au keeps its colour without a finite bar
  assert axes["detection"].containers[2].patches[0].get_facecolor() == to_rgba("C2")
  assert [t.get_text() for t in reg.get_legend().get_texts()] == ["ts", "cg", "au"]
  assert {t.get_text() for t in reg.texts} == {"5.0", "6.0", "4.0"}  # pixel values with one decimal
  assert plots.bars_by_type(rows, ["ts", "cg", "au"], tmp_path / "bars.png").read_bytes()[:8] == PNG_MAGIC


def _fake_sweep(root, dice: dict[str, dict[str, float]]):
  """A one-fraction sweep folder whose runs score `dice[run][task]` (segmentation tasks, primary metric dice)."""
  runs = []
  for run, per_task in dice.items():
    paradigm_ = "cg" if run == "advised" else run
    results.write_eval(root / "frac1" / run / "eval", 1, paradigm_,
                       {t: {"dice": d, "hd": 1.0, "n": 4, "n_train": 8} for t, d in per_task.items()})
    runs.append({"fraction": 1.0, "paradigm": run, "path": f"frac1/{run}"})
  (root / "sweep.json").write_text(json.dumps({"fractions": [1.0], "paradigms": list(dice), "runs": runs}))


def test_seeds_report_gives_each_seed_and_the_spread(tmp_path, capsys):
  ts = {"fetal_head": 0.5, "lung": 0.8}
  _fake_sweep(tmp_path / "seed0", {"ts": ts, "au": {"fetal_head": 0.6, "lung": 0.8},
                                   "advised": {"fetal_head": 0.55, "lung": 0.88}})
  _fake_sweep(tmp_path / "seed1", {"ts": ts, "au": {"fetal_head": 0.4, "lung": 0.8},
                                   "advised": {"fetal_head": 0.5, "lung": 0.96}})
  out = tmp_path / "out"
  assert cli.main(["report", "--sweep", str(tmp_path / "seed0"), str(tmp_path / "seed1"), "--out", str(out)]) == 0
  assert "Paradigm change over seeds" in capsys.readouterr().out
  rows = {(r["run"], r["tasks"]): r for r in csv.DictReader((out / "seeds.csv").open())}
  # au: seed0 mean(+20%, 0%) = +10%, seed1 mean(-20%, 0%) = -10%; advised: +10%/+10% -> +10%, +0/+20 -> +10%
  au, adv = rows[("au", "all")], rows[("advised", "all")]
  assert [float(au["seed0"]), float(au["seed1"])] == pytest.approx([10.0, -10.0])
  assert float(au["mean_delta_pct"]) == pytest.approx(0.0) and float(au["std_delta_pct"]) == pytest.approx(10.0)
  assert float(adv["mean_delta_pct"]) == pytest.approx(10.0) and float(adv["std_delta_pct"]) == pytest.approx(0.0)
  assert (out / "seed0" / "scale.md").is_file() and (out / "seed1" / "frac1" / "report.md").is_file()
  assert "| 1 | au | all | +10.00% | -10.00% | +0.00% ± 10.00% |" in (out / "seeds.md").read_text()


def test_sweep_plan_trains_the_advice_as_groups_and_weights(tmp_path):
  from m2dino_jax import configlib
  from m2dino_jax.errors import ConfigError
  from m2dino_jax.train.multitask import sweep
  spec = "configs/m2dino.py:smoke,tasks=fetal_head+lung"
  c = configlib.load_config(spec, ["sweep.fractions=0.5,1.0", "sweep.paradigms=au,advised"])
  with pytest.raises(ConfigError, match="advice"):
    sweep.plan(c)
  advice = tmp_path / "advice.json"
  c = configlib.load_config(spec + f",advice={advice}", ["sweep.fractions=0.5,1.0", "sweep.paradigms=au,advised"])
  plan = sweep.plan(c)
  assert [(f, p) for f, p, _ in plan] == [(0.5, "au"), (0.5, "advised"), (1.0, "au"), (1.0, "advised")]
  adv = plan[1][2]
  assert (adv.paradigm, adv.groups, adv.data.mixture, adv.data.weights_file) == ("cg", str(advice), "json", str(advice))
  assert plan[0][2].paradigm == "au" and plan[0][2].data.mixture == "uniform" and plan[1][2].data.train_fraction == 0.5
