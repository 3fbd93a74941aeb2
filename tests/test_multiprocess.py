"""Multi-task training on 2 local processes joined by jax.distributed (2 simulated CPU devices each)."""

import json
import subprocess
import sys

import pytest

from m2dino_jax import configlib
from m2dino_jax.data import pipeline
from tests.util import ROOT


@pytest.mark.slow
def test_two_process_training_covers_eval_and_checkpoints(tmp_path):
  work = tmp_path / "run"
  tasks = "breast_2cls+fetal_femur"
  overrides = ["total_steps=6", "checkpoint.every=3", "log_every=1", "data.image_size=32",
               "data.source.synthetic_count=16", "data.batch_size=8", "data.eval_batch_size=8", "tensorboard=False"]
  cmd = [sys.executable, "launch/local.py", "--processes", "2", "--devices-per-process", "2", "--",
         f"--config=configs/m2dino.py:paradigm=au,smoke,tasks={tasks}", f"--workdir={work}",
         *(f"--config.{o}" for o in overrides)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
  logs = {i: (work / "logs" / f"process_{i}.log").read_text() for i in (0, 1)}
  assert proc.returncode == 0, logs[0][-3000:] + logs[1][-3000:]
  # both processes ran the same global steps and evaluations
  assert "per-task metrics" in logs[0] and "per-task metrics" in logs[1]
  table = lambda log: [line for line in log.split("per-task metrics")[1].splitlines()
                       if not line.startswith("compiled ")]  # process 0 ends with its compile summary
  assert table(logs[0]) == table(logs[1])
  # every validation example was scored exactly once across the two processes' blocks
  config = configlib.load_config(f"configs/m2dino.py:paradigm=au,smoke,tasks={tasks}",
                                 [o for o in overrides if o.startswith("data.")])
  sizes = pipeline.task_sizes(config.data, tasks, split="val")
  result = json.loads((work / "all" / "eval" / "6.json").read_text())["tasks"]
  assert {t: r["n"] for t, r in result.items()} == sizes
  assert sorted(p.name for p in (work / "all" / "ckpt").iterdir() if p.name.isdigit()) == ["3", "6"]
  steps = [json.loads(line)["step"] for line in (work / "all" / "metrics.jsonl").read_text().splitlines()
           if "task" in json.loads(line)]
  assert steps == [1, 2, 3, 4, 5, 6]  # written once (process 0), not twice
