"""The demo's data set (m2dino_jax/demo.py): fixed validation size per task, long-tailed training sets, and a
stamp that makes a stale cache (other settings, another simulator) be simulated again."""

from __future__ import annotations

import csv

from m2dino_jax import demo
from m2dino_jax.data import pipeline
from m2dino_jax.data.sonosynth import generator

TASKS = ["lung_2cls", "fetal_femur"]
SMALL = {"seed": 0, "train_scale": 0.05, "val_per_task": 3, "size": 32}


def _rows(root, split, task):
  with open(root / "data" / split / "csv_files" / f"{task}.csv") as f:
    return list(csv.DictReader(f))


def test_demo_data_sizes_and_the_adapter_reads_them(tmp_path):
  root = tmp_path / "sonosynth"
  demo.ensure_data(root, SMALL, TASKS, workers=1)
  for task in TASKS:
    assert len(_rows(root, "val", task)) == 3
    assert len(_rows(root, "train", task)) == generator.task_size(task, 0.05)  # both at the minimum, 8
  cfg = pipeline.default_data_config()
  cfg.source.kind, cfg.source.root = "folder", str(root)
  assert pipeline.task_sizes(cfg, TASKS, split="val") == {t: 3 for t in TASKS}
  assert pipeline.task_sizes(cfg, TASKS) == {"lung_2cls": 8, "fetal_femur": 8}


def test_stale_demo_data_is_simulated_again(tmp_path, capsys, monkeypatch):
  root = tmp_path / "sonosynth"
  demo.ensure_data(root, SMALL, TASKS, workers=1)
  assert "wrote 22 images" in capsys.readouterr().out
  demo.ensure_data(root, SMALL, TASKS, workers=1)
  assert "reusing" in capsys.readouterr().out
  bigger = {**SMALL, "val_per_task": 4}
  demo.ensure_data(root, bigger, TASKS, workers=1)
  assert "stale (demo data settings changed)" in capsys.readouterr().out
  assert len(_rows(root, "val", "lung_2cls")) == 4
  monkeypatch.setattr(demo, "simulator_hash", lambda: "another simulator")
  demo.ensure_data(root, bigger, TASKS, workers=1)
  assert "stale (simulator changed)" in capsys.readouterr().out
  (root / demo.STAMP).unlink()  # e.g. a folder from before the stamp, or an interrupted copy
  demo.ensure_data(root, bigger, TASKS, workers=1)
  assert "stale (no stamp)" in capsys.readouterr().out
  assert demo._read_stamp(root) == demo.stamp(bigger)


def test_simulator_hash_follows_the_simulator_source(tmp_path, monkeypatch):
  from m2dino_jax.data import sonosynth

  fake = tmp_path / "sonosynth"
  fake.mkdir()
  (fake / "__init__.py").write_text("")
  (fake / "physics.py").write_text("A = 1\n")
  monkeypatch.setattr(sonosynth, "__file__", str(fake / "__init__.py"))
  first = demo.simulator_hash()
  assert demo.simulator_hash() == first
  (fake / "physics.py").write_text("A = 2\n")
  assert demo.simulator_hash() != first


def test_trainer_table_puts_each_task_beside_its_baseline(tmp_path, capsys):
  from m2dino_jax.tasks import baselines, results
  from m2dino_jax.train.multitask import trainer

  data = demo.ensure_data(tmp_path / "sonosynth", SMALL, TASKS, workers=1)
  cfg = pipeline.default_data_config()
  cfg.source.kind, cfg.source.root = "folder", str(data)
  base = baselines.for_config(cfg, TASKS)
  model = {"lung_2cls": {"auc": 0.75, "accuracy": 0.5, "n": 3},  # AUC 0.75 > 0.5
           "fetal_femur": {"mre": base["fetal_femur"]["mre"] + 1.0, "n": 3}}  # 1 px worse than the mean points
  results.write_eval(tmp_path / "runs" / "au" / "eval", 10, "au", model)
  capsys.readouterr()
  assert trainer.print_table(results.load_run(tmp_path / "runs" / "au", "au"), cfg) == (1, 2)
  out = capsys.readouterr().out
  row = next(ln for ln in out.splitlines() if ln.startswith("  fetal_femur")).split()
  mre = base["fetal_femur"]["mre"]
  assert [float(v) for v in row[-2:]] == [round(mre + 1, 2), round(mre, 2)]
  assert "classification: beats baseline: 1 of 1 task" in out and "regression: beats baseline: 0 of 1 task" in out
  assert "au: beats its trivial baseline on 1 of 2 tasks" in out
