"""The advise pipeline on the multi-task model: probe (budgeted), fit -> advice.json, advised training config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from m2dino_jax import cli, configlib
from m2dino_jax.advise import adviceio, affinity, fit
from m2dino_jax.tasks import registry
from m2dino_jax.train.multitask import trainer

TASKS = "fetal_head+breast_2cls+lung_2cls"
SMALL = ["--config.data.image_size=32", "--config.data.source.synthetic_count=16", "--config.data.batch_size=4",
         "--config.data.eval_batch_size=4", "--config.tensorboard=False"]


@pytest.mark.slow
def test_probe_fit_and_advised_config(tmp_path, capsys):
  """Real model, 3 tasks (two types): the probe stays within its budget and counts its calls exactly (2 repeats
  of 3 + 3 + 9 calls, plus 2 fractions x 3 tasks x (1 step + 3 losses)); the fit is reproducible; the advised
  config trains the advice's groups with its weights."""
  probe_path, advice_path = tmp_path / "probe.json", tmp_path / "advice.json"
  rc = cli.main(["advise", "probe", "--config", f"configs/m2dino.py:smoke,tasks={TASKS}", "--out", str(probe_path),
                 *SMALL, "--config.advise.budget=60", "--config.advise.scale_fractions=0.5,1.0",
                 "--config.advise.scale_steps=1"])
  assert rc == 0
  probe = json.loads(probe_path.read_text())
  b = probe["budget"]
  assert probe["repeats"] == 2
  assert b["affinity_calls"] == 2 * affinity.calls_per_repeat(3) == 30
  assert b["scaling_calls"] == 2 * 3 * (1 + 3) == 24
  assert b["calls_used"] == 54 <= b["calls_allowed"] == 60
  z = np.asarray(probe["affinity"])
  assert z.shape == (3, 3) and np.isfinite(z).all()
  assert all(probe["scaling"][t]["d"][0] < probe["scaling"][t]["d"][1] for t in probe["tasks"])
  rc = cli.main(["advise", "fit", "--probe", str(probe_path), "--out", str(advice_path), "--max-groups", "2",
                 "--plot", str(tmp_path / "transfer.png")])
  assert rc == 0 and (tmp_path / "transfer.png").stat().st_size > 0
  assert (tmp_path / "transfer_graph.png").stat().st_size > 0
  advice = json.loads(advice_path.read_text())
  again = fit.advise(probe, max_groups=2)
  assert again["groups"] == advice["groups"] and again["weights"] == advice["weights"]
  assert 1 <= len(advice["groups"]) <= 2
  assert sorted(t for m in advice["groups"].values() for t in m) == sorted(probe["tasks"])
  for members in advice["groups"].values():
    assert abs(sum(advice["weights"][t] for t in members) - 1.0) < 1e-6
  c = configlib.load_config(f"configs/m2dino.py:paradigm=advised,advice={advice_path},smoke,tasks={TASKS}")
  assert c.paradigm == "cg" and c.data.mixture == "json" and c.data.weights_file == str(advice_path)
  plan = trainer.plan_models(c)
  assert {n: [t.name for t in ts] for n, ts in plan} == {
      n: [t.name for t in registry.resolve(m)] for n, m in advice["groups"].items()}
  assert adviceio.read_groups(advice_path) == advice["groups"]
