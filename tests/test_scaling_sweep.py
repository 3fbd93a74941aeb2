"""`m2dino scaling sweep`: the 3D MAE grid -> fit -> allocations -> strategies -> fine-tunes -> report."""

import itertools
import json

import numpy as np
import pytest

from m2dino_jax import cli, configlib
from m2dino_jax.errors import ConfigError
from m2dino_jax.scaling import law, measurements, sweep

DOMAINS = ["abd_ct", "abd_mri", "brain_t1", "brain_t2", "head_ct", "hn_pet"]  # the smoke config's six
AVAILABLE = [4, 2, 3, 2, 2, 2]
TINY = ["sweep.available=" + ",".join(f"{d}={a}" for d, a in zip(DOMAINS, AVAILABLE)), "sweep.sizes=1,2",
        "sweep.E=auto", "sweep.mixture_budgets=6", "sweep.mixtures=1", "sweep.budgets=6",
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
  """The smoke sweep (all six domains, every strategy) at its smallest size, end to end."""
  work = tmp_path / "sweep"
  argv = ["scaling", "sweep", "--config", "configs/scaling3d.py:smoke", "--workdir", str(work)]
  for s in TINY:
    argv += ["--set", s]
  assert cli.main(argv) == 0
  report = json.loads((work / "report.json").read_text())
  strategies = ["transfer_aware", "data_proportional", "uniform", "transfer_blind"]
  assert report["domains"] == DOMAINS and report["strategies"] == strategies and not report["errors"]
  assert report["design_runs"] == 13  # 6 domains x sizes {1, 2} + 1 mixture
  for s in strategies:
    loss = np.asarray(report["measured"][s])
    assert loss.shape == (1, 6) and np.all(np.isfinite(loss)) and np.all(loss > 0)
    assert sum(report["volumes"][s][0]) == 6 and np.all(np.asarray(report["volumes"][s][0]) <= AVAILABLE)
    assert set(report["downstream"]["abd_ct:segmentation"][s]) >= {"metric", "value", "dice"}
  avail = np.asarray(AVAILABLE, float)
  assert report["volumes"]["data_proportional"] == [sweep.round_counts(avail / avail.sum() * 6, avail).tolist()]
  assert set(report["gains"]) == set(strategies[1:]) and "random_init" in report["downstream"]["abd_ct:segmentation"]
  # the fit converges and says, per domain, how far the points support it (two sizes: no free floor)
  fit = report["fit"]
  assert fit["converged"] and fit["E_mode"] == "auto" and not fit["domains_not_converged"]
  assert [a["E"] for a in fit["E_auto"]] == ["none"] * 6 and "2 distinct size(s)" in fit["E_auto"][0]["reason"]
  assert [s_["sizes"] for s_ in fit["self_law_support"]] == [[1.0, 2.0]] * 6
  assert np.all(np.asarray(fit["E"]) == 0) and np.all(np.asarray(fit["beta"]) > 0)
  # the report holds every strategy and domain: the self-law table, the loss and downstream tables
  md = (work / "report.md").read_text()
  assert "fit converged: True" in md
  for d in DOMAINS:
    assert sum(line.startswith(f"| {d} |") for line in md.splitlines()) == 1, d  # its self-law row
  header = next(line for line in md.splitlines() if line.startswith("| strategy |"))
  assert all(f" {d} " in header for d in DOMAINS)
  for s in strategies:
    assert sum(line.startswith(f"| {s} |") for line in md.splitlines()) == 1 + (s != "transfer_aware"), s
  assert "random_init" in md
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
  assert len(rows) == 13 and {r.run_id for r in rows} == {f"single-{d}-{n}" for d in DOMAINS for n in (1, 2)} | {
      "mix-6-0"}
  assert cli.main(["scaling", "fit", "--measurements", str(work / "measurements.jsonl"), "--E", "auto",
                   "--bootstrap", "0", "--out", str(tmp_path / "fits.json")]) == 0
  assert law.read_fits(tmp_path / "fits.json").domains == DOMAINS
  # resumable: a second call retrains nothing and appends no rows
  stamps = {p: p.stat().st_mtime for p in work.glob("*/*/done.json")}
  capsys.readouterr()
  assert cli.main(argv) == 0
  assert "already finished" not in capsys.readouterr().out
  runs = {r for v in report["runs"].values() for r in v}  # strategies with equal volumes share one run
  assert len(runs) == len({tuple(v[0]) for v in report["volumes"].values()})
  assert {p: p.stat().st_mtime for p in work.glob("*/*/done.json")} == stamps and len(stamps) == 13 + 2 * len(runs) + 1
  assert len(measurements.read_measurements(work / "measurements.jsonl")) == 13
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


def _design_arrays(loss_a, loss_b, sizes=(1, 2, 4, 8)):
  """Design-like arrays: two domains alone at `sizes`, plus one mixture run (transfer needs one)."""
  runs, data, loss = [], [], []
  for j, curve in enumerate((loss_a, loss_b)):
    for s, v in zip(sizes, curve):
      x = [0.0, 0.0]
      x[j] = s
      runs.append(f"single-{j}-{s}"), data.append(x), loss.append([v if j == 0 else 1.0, v if j == 1 else 1.0])
  runs.append("mix"), data.append([2.0, 2.0]), loss.append([loss_a[1], loss_b[1]])
  return measurements.MeasurementArrays(["a", "b"], runs, np.array(data), np.array(loss), np.full(2, np.inf))


def test_auto_floor_fits_e_where_the_points_identify_it_and_says_why_not_elsewhere():
  from m2dino_jax.scaling import transfer
  sizes = np.array([1.0, 2.0, 4.0, 8.0])
  clean = 0.5 + 0.6 * sizes ** -0.7  # a law with a floor: identifiable
  flat = np.array([1.049, 1.045, 1.046, 1.047])  # the smoke sweep's case: no data effect beyond the scatter
  arrays = _design_arrays(clean, flat)
  support = transfer.self_law_support(arrays)
  np.testing.assert_allclose(support[0]["drop"], 1 - clean[-1] / clean[0])
  slope, _ = np.polyfit(np.log(sizes), np.log(clean), 1)
  np.testing.assert_allclose(support[0]["slope"], slope)
  assert support[0]["decreasing"] and not support[1]["decreasing"]
  # the free floor does not converge on the flat points (the bug): auto holds it at 0 there and says why
  free = transfer.fit_scaling(arrays, n_bootstrap=0, e_mode="free")
  assert "b" in free.extra["domains_not_converged"] and not free.extra["converged"]
  fits = transfer.fit_scaling(arrays, n_bootstrap=0, e_mode="auto")
  assert fits.extra["converged"] and fits.extra["E_mode"] == "auto"
  assert [a["E"] for a in fits.extra["E_auto"]] == ["free", "none"]
  assert "does not fall with data" in fits.extra["E_auto"][1]["reason"] and fits.law.E[1] == 0
  np.testing.assert_allclose([fits.law.E[0], fits.law.A[0], fits.law.beta[0]], [0.5, 0.6, 0.7], rtol=1e-5)
  assert fits.extra["self_law_support"][0]["rms_log_residual"] < 1e-7
  # scipy's least squares on the E = 0 law of the flat domain (log residuals, all inside the Huber delta); beta
  # sits on its lower bound 1e-3, which trf approaches from inside
  from scipy.optimize import least_squares
  ref = least_squares(lambda p: np.log(p[0] * sizes ** -p[1]) - np.log(flat), [1.0, 0.01],
                      bounds=([1e-9, 1e-3], [np.inf, 5.0]))
  np.testing.assert_allclose(fits.law.A[1], ref.x[0], rtol=1e-4)
  np.testing.assert_allclose(fits.law.beta[1], ref.x[1], atol=1e-5)
  warn = sweep.fit_warnings(["a", "b"], fits.extra)
  assert len(warn) == 1 and warn[0].startswith("b: the held-out loss does not fall with data")
