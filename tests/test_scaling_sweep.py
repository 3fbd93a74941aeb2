"""`m2dino scaling sweep`: the 3D MAE grid -> fit -> allocations -> strategies -> fine-tunes -> report."""

import itertools
import json

import numpy as np
import pytest

from m2dino_jax import cli, configlib
from m2dino_jax.errors import ConfigError
from m2dino_jax.scaling import law, measurements, sweep

TINY = ["sweep.domains=abd_ct,abd_mri,hn_pet", "sweep.available=abd_ct=4,abd_mri=2,hn_pet=2", "sweep.sizes=1,2",
        "sweep.E=none", "sweep.mixture_budgets=4", "sweep.mixtures=1", "sweep.budgets=4",
        "sweep.downstream=abd_ct:segmentation", "pretrain.total_steps=6", "finetune.total_steps=4",
        "pretrain.model.crop=16", "pretrain.data.crop=16", "pretrain.data.phantom_size=20",
        "pretrain.data.batch_size=4", "pretrain.data.eval_crops=1", "finetune.model.crop=16", "finetune.data.crop=16",
        "finetune.data.phantom_size=20", "finetune.data.per_domain=4", "finetune.data.heldout=1",
        "finetune.data.batch_size=2", "finetune.data.eval_batch=2"]


def test_round_counts_is_the_best_whole_allocation_under_the_caps():
  rng = np.random.default_rng(0)
  for _ in range(30):
    avail = rng.integers(1, 6, 4)
    x = rng.dirichlet(np.ones(4)) * rng.uniform(1, avail.sum())
    got = sweep.round_counts(x, avail)
    target = min(int(round(np.minimum(x, avail).sum())), int(avail.sum()))
    # brute force: among whole vectors under the caps summing to the target, the closest to min(x, avail)
    best = min((np.array(c) for c in itertools.product(*(range(a + 1) for a in avail)) if sum(c) == target),
               key=lambda c: np.abs(c - np.minimum(x, avail)).sum())
    assert got.sum() == target and (got <= avail).all()
    np.testing.assert_allclose(np.abs(got - np.minimum(x, avail)).sum(), np.abs(best - np.minimum(x, avail)).sum())


def test_plan_checks_the_grid():
  load = lambda *o: sweep.Plan(configlib.load_config("configs/scaling3d.py:smoke", list(o)))
  plan = load()
  runs = plan.design(0)
  singles = {r: x for r, x in runs if r.startswith("single-")}
  assert len(singles) == 6 * 3 and singles["single-hn_pet-3"].tolist() == [0, 0, 0, 0, 0, 3]  # 4 capped at 3
  assert [x.sum() for r, x in runs if r.startswith("mix-")] == [8, 8]
  with pytest.raises(ConfigError, match="sweep.budgets"):
    load("sweep.budgets=8,100")
  with pytest.raises(ConfigError, match="sweep.strategies"):
    load("sweep.strategies=uniform,data_proportional")
  with pytest.raises(ConfigError, match="sweep.downstream"):
    load("sweep.downstream=abd_ct:detection")
  with pytest.raises(ConfigError, match="sweep.available"):
    load("sweep.available=liver=3")


@pytest.mark.slow
def test_tiny_sweep_runs_end_to_end_resumes_and_its_rows_feed_scaling_fit(tmp_path, capsys):
  work = tmp_path / "sweep"
  argv = ["scaling", "sweep", "--config", "configs/scaling3d.py:smoke", "--workdir", str(work)]
  for s in TINY:
    argv += ["--set", s]
  assert cli.main(argv) == 0
  report = json.loads((work / "report.json").read_text())
  domains = ["abd_ct", "abd_mri", "hn_pet"]
  strategies = ["transfer_aware", "data_proportional", "uniform", "transfer_blind"]
  assert report["domains"] == domains and report["strategies"] == strategies and not report["errors"]
  assert report["design_runs"] == 7  # 3 domains x sizes {1, 2} + 1 mixture
  for s in strategies:
    loss = np.asarray(report["measured"][s])
    assert loss.shape == (1, 3) and np.all(np.isfinite(loss)) and np.all(loss > 0)
    assert sum(report["volumes"][s][0]) == 4 and report["volumes"][s][0][1] <= 2
    assert set(report["downstream"]["abd_ct:segmentation"][s]) >= {"metric", "value", "dice"}
  assert report["volumes"]["data_proportional"] == [[2, 1, 1]] and report["volumes"]["uniform"][0][0] >= 1
  assert set(report["gains"]) == set(strategies[1:]) and "random_init" in report["downstream"]["abd_ct:segmentation"]
  md = (work / "report.md").read_text()
  assert all(s in md for s in strategies + domains)
  # the gain is 1 - L_focus / L_base, from the measured losses
  g = np.asarray(report["gains"]["uniform"]["per_domain"])
  np.testing.assert_allclose(g, 1 - np.asarray(report["measured"]["transfer_aware"]) /
                             np.asarray(report["measured"]["uniform"]))
  # predicted = the fitted law at the allocated volumes
  fits = law.read_fits(work / "fits.json")
  np.testing.assert_allclose(report["predicted"]["uniform"],
                             law.predict_loss(fits.law, np.asarray(report["volumes"]["uniform"], float), xp=np),
                             rtol=1e-6)
  rows = measurements.read_measurements(work / "measurements.jsonl")
  assert len(rows) == 7 and {r.run_id for r in rows} == {"single-abd_ct-1", "single-abd_ct-2", "single-abd_mri-1",
                                                         "single-abd_mri-2", "single-hn_pet-1", "single-hn_pet-2",
                                                         "mix-4-0"}
  assert cli.main(["scaling", "fit", "--measurements", str(work / "measurements.jsonl"), "--E", "none",
                   "--bootstrap", "0", "--out", str(tmp_path / "fits.json")]) in (0, 3)
  assert law.read_fits(tmp_path / "fits.json").domains == domains
  # resumable: a second call retrains nothing and appends no rows
  stamps = {p: p.stat().st_mtime for p in work.glob("*/*/done.json")}
  capsys.readouterr()
  assert cli.main(argv) == 0
  assert "already finished" not in capsys.readouterr().out
  runs = {r for v in report["runs"].values() for r in v}  # strategies with equal volumes share one run
  assert len(runs) == len({tuple(v[0]) for v in report["volumes"].values()})
  assert {p: p.stat().st_mtime for p in work.glob("*/*/done.json")} == stamps and len(stamps) == 7 + 2 * len(runs) + 1
  assert len(measurements.read_measurements(work / "measurements.jsonl")) == 7
  # a changed grid is refused rather than mixed with finished runs
  assert cli.main(argv + ["--set", "pretrain.total_steps=7"]) == 2
  assert "trained with other total_steps settings" in capsys.readouterr().err


def test_prediction_metrics_leave_out_targets_no_run_informs():
  pred = np.array([[1.0, np.inf], [2.0, 3.0], [3.0, 4.0]])
  meas = np.array([[1.1, 2.0], [2.2, 3.3], [2.9, 3.9]])
  m = sweep._metrics(pred, meas, ["a", "b"])
  np.testing.assert_allclose(m["pooled_r"], np.corrcoef([1, 2, 3, 3, 4], [1.1, 2.2, 2.9, 3.3, 3.9])[0, 1])
  np.testing.assert_allclose(m["per_domain_r"]["a"], np.corrcoef([1, 2, 3], [1.1, 2.2, 2.9])[0, 1])
  assert m["per_domain_r"]["b"] == pytest.approx(1.0)
  np.testing.assert_allclose(m["per_domain_mape"]["b"], np.mean([0.3 / 3.3, 0.1 / 3.9]))
  assert sweep._metrics(np.ones((3, 1)), meas[:, :1], ["a"])["pooled_r"] is None  # constant prediction: no r
