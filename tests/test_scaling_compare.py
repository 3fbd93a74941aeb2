"""Comparison metrics on a 2-domain toy (hand computations, scipy), strategies, law files, E options, CLI."""

import argparse
import json

import numpy as np
import pytest
from scipy import optimize, stats

from m2dino_jax import cli
from m2dino_jax.errors import DataError, SolverError
from m2dino_jax.scaling import cli as scaling_cli
from m2dino_jax.scaling import compare, lawfile, powerlaw, strategies

BUDGETS = np.array([1e3, 2e3, 4e3, 8e3])


def _toy():
  """DP: L_i = c_i B^-0.5 (one slope, so the mean loss is a power law too); TA: 0.8x and 0.5x of it."""
  c = np.array([3.0, 5.0])
  base = c[None, :] * BUDGETS[:, None] ** -0.5
  return c, base, base * np.array([0.8, 0.5])


def test_gains_and_multiplier_equal_hand_computations():
  c, base, ta = _toy()
  g = compare.gains(ta, base)
  np.testing.assert_allclose(g["per_domain"], np.tile([0.2, 0.5], (4, 1)), rtol=1e-12)
  assert g["headline_max"] == pytest.approx(0.5) and g["headline_domain"] == 1
  assert g["mean"] == pytest.approx(0.35)
  # Mean loss: (0.8*3 + 0.5*5) / (3 + 5) of the baseline's at every budget.
  np.testing.assert_allclose(g["aggregate"], 1 - (0.8 * 3 + 0.5 * 5) / 8, rtol=1e-12)
  # Baseline needs B' with 8/2 B'^-0.5 = 4.9/2 B^-0.5, i.e. B'/B = (8 / 4.9)^2.
  mult, inside = compare.budget_multiplier(BUDGETS, base.mean(1), ta.mean(1))
  np.testing.assert_allclose(mult, (8 / 4.9) ** 2, rtol=1e-10)
  np.testing.assert_array_equal(inside, [True, True, False, False])  # 2.67 x 4e3 and 8e3 lie beyond 8e3
  # Reducible gains: shifting both by a floor E_hat recovers the same ratios on L - E_hat.
  floor = np.array([0.1, 0.2])
  r = compare.gains(ta + floor, base + floor, floor)
  np.testing.assert_allclose(r["reducible_per_domain"], g["per_domain"], rtol=1e-12)
  assert (r["per_domain"] < g["per_domain"]).all()  # the floor dilutes the plain gain


def test_slopes_equal_scipy_linregress():
  c, base, ta = _toy()
  np.testing.assert_allclose(compare.log_slopes(BUDGETS, base), [0.5, 0.5], rtol=1e-12)
  rng = np.random.default_rng(0)
  noisy = base * np.exp(0.05 * rng.standard_normal(base.shape)) * BUDGETS[:, None] ** np.array([0.0, -0.2])
  got = compare.log_slopes(BUDGETS, noisy)
  for i in range(2):
    ref = stats.linregress(np.log(BUDGETS), np.log(noisy[:, i])).slope
    assert got[i] == pytest.approx(-ref, rel=1e-12)
  both = compare.log_slopes(BUDGETS, np.stack([base, noisy]))  # a leading strategy axis
  np.testing.assert_allclose(both[1], got, rtol=1e-12)
  with pytest.raises(SolverError, match="at least 4 budgets"):
    compare.log_slopes(BUDGETS[:3], base[:3])


def test_summarise_names_hub_island_and_every_baseline():
  c, base, ta = _toy()
  tau = np.array([[0.0, 0.05], [0.7, 0.0]])  # domain a gives 0.7, receives 0.05
  report = compare.summarise(BUDGETS, {"transfer_aware": ta, "data_proportional": base, "uniform": base * 0.9},
                             ["a", "b"], tau=tau)
  assert report["transfer"]["hub"] == "a" and report["transfer"]["island"] == "a"
  assert set(report["vs"]) == {"data_proportional", "uniform"}
  assert report["vs"]["data_proportional"]["headline_domain"] == "b"
  assert report["vs"]["data_proportional"]["beats_at_every_budget"]
  np.testing.assert_allclose(report["slopes"]["transfer_aware"], [0.5, 0.5])
  json.dumps(report)  # JSON-ready


def test_capped_counts_equal_brentq_water_filling():
  rng = np.random.default_rng(1)
  for _ in range(50):
    n = rng.integers(2, 7)
    available = rng.uniform(1e3, 1e5, n)
    shares = rng.dirichlet(np.ones(n))
    budget = rng.uniform(0.05, 0.99) * available.sum()
    got = strategies.capped_counts(budget, shares, available)
    # Independent: x_i = min(N_i, lam s_i), lam by brentq on the budget.
    gap = lambda t, n_=available, s_=shares, b_=budget: np.minimum(n_, t * s_).sum() - b_
    lam = optimize.brentq(gap, 0, budget / shares.min() * 2, xtol=1e-12, rtol=1e-14)
    np.testing.assert_allclose(got, np.minimum(available, lam * shares), rtol=1e-9)
    assert got.sum() == pytest.approx(budget, rel=1e-12) and (got <= available * (1 + 1e-12)).all()


def test_heuristic_strategies():
  available = np.array([1.5e5, 8e4, 3.5e5, 4e4])
  np.testing.assert_allclose(strategies.heuristic_shares("temperature", available, 1.0),
                             strategies.heuristic_shares("data_proportional", available))
  np.testing.assert_allclose(strategies.heuristic_shares("temperature", available, 1e9), 0.25, rtol=1e-6)
  t2 = strategies.heuristic_shares("temperature", available, 2.0)
  np.testing.assert_allclose(t2, np.sqrt(available) / np.sqrt(available).sum())
  law = lawfile.read_law("example:six_domain").law
  x = strategies.strategy_counts("uniform", law, [1.8e5], np.array([1e5, 1e5, 1e5, 1e5, 1e5, 1e4]))[0]
  np.testing.assert_allclose(x, [3.4e4] * 5 + [1e4])  # hn_pet capped at its 1e4; the rest shared equally


def test_six_domain_law_file():
  planted = lawfile.read_law("example:six_domain")
  d = planted.domains
  assert d == ["abd_ct", "abd_mri", "brain_t1", "brain_t2", "head_ct", "hn_pet"]
  np.testing.assert_allclose(planted.law.A, 0.5 * 1e4 ** planted.law.beta)
  assert planted.law.tau[d.index("abd_mri"), d.index("abd_ct")] == 0.6   # target <- source is tau[i][j]
  assert planted.law.tau[d.index("abd_ct"), d.index("abd_mri")] == 0.2
  assert planted.law.tau.sum() == pytest.approx(0.6 + 0.7 + 0.3 + 0.3 + 0.05 + 0.2 + 0.3 + 1.6 + 0.2 + 0.02)
  np.testing.assert_allclose(planted.available / 1e6, [0.15, 0.08, 0.35, 0.30, 0.08, 0.04])
  assert (planted.law.gamma == 1).all() and planted.floor == 0.05


@pytest.mark.parametrize("change, field", [
    ({"tau": {"abd_mri->abd_ct": 0.6}}, "'tau' pair 'abd_mri->abd_ct'"),
    ({"tau": {"abd_mri<-abd_ct": -0.1}}, "'tau.abd_mri<-abd_ct' must be >= 0"),
    ({"beta": {"abd_ct": 0.4}}, "'beta' lacks domain(s)"),
    ({"available": {"x": 1}}, "'available' names unknown domain(s) ['x']"),
    ({"A": 1.0}, "exactly one of 'A' and 'loss_at'"),
    ({"gamma": 0.0}, "'gamma' must be > 0"),
    ({"design": {"sizes": 2}}, "'design.sizes' must be an integer >= 3"),
    ({"noice": 0.1}, "unknown field(s) ['noice']"),
])
def test_bad_law_files_name_the_field(tmp_path, capsys, change, field):
  path = tmp_path / "law.json"
  path.write_text(json.dumps({**lawfile.SIX_DOMAIN, **change}))
  with pytest.raises(DataError) as err:
    lawfile.read_law(path)
  assert field in str(err.value) and str(path) in str(err.value)
  assert cli.main(["scaling", "simulate", "--law", str(path), "--out", str(tmp_path / "m.jsonl")]) == 2
  message = capsys.readouterr().err.strip()
  assert "\n" not in message and field in message


def _fit_fixed_e_scipy(d, loss, e, delta):
  """(A, beta) by scipy least_squares(trf) with E held, Huber on log residuals."""
  res = optimize.least_squares(lambda t: np.log(e + t[0] * d ** -t[1]) - np.log(loss), [1.0, 0.3], method="trf",
                               loss="huber", f_scale=delta, bounds=([1e-300, 1e-3], [np.inf, 5.0]), x_scale="jac",
                               ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=5000)
  return res.x


def test_e_options_equal_scipy_with_e_held():
  rng = np.random.default_rng(2)
  d = np.tile(np.geomspace(1e2, 1e5, 8), (2, 1))
  loss = (np.array([[0.0], [0.3]]) + np.array([[20.0], [8.0]]) * d ** -np.array([[0.4], [0.3]]))
  loss = loss * np.exp(0.01 * rng.standard_normal(d.shape))
  none = powerlaw.fit_power_laws(d, loss, e_mode="none")
  fixed = powerlaw.fit_power_laws(d, loss, e_mode=np.array([0.0, 0.3]))
  assert (none["E"] == 0).all() and fixed["E"][1] == 0.3 and none["converged"].all()
  for i, (out, e) in enumerate([(none, 0.0), (fixed, 0.3)]):
    a, b = _fit_fixed_e_scipy(d[i], loss[i], e, powerlaw.DEFAULT_DELTA)
    assert abs(out["A"][i] / a - 1) < 1e-4 and abs(out["beta"][i] / b - 1) < 1e-4, (i, out, a, b)
  assert powerlaw.fit_power_laws(d[:, :2], loss[:, :2], e_mode="none")["converged"].all()  # 2 sizes suffice
  with pytest.raises(SolverError, match="needs at least 3"):
    powerlaw.fit_power_laws(d[:, :2], loss[:, :2])


def test_every_option_has_help_and_no_none_default():
  parser = argparse.ArgumentParser()
  scaling_cli.register(parser.add_subparsers())
  sub = next(a for a in parser._subparsers._group_actions[0].choices["scaling"]._actions
             if isinstance(a, argparse._SubParsersAction))
  assert {"simulate", "fit", "allocate", "plot", "compare"} <= set(sub.choices)
  for name, p in sub.choices.items():
    for action in p._actions:
      if action.option_strings and action.dest != "help":
        assert action.help, (name, action.option_strings)
    assert "(default: None)" not in p.format_help() and "(default: )" not in p.format_help(), name


def test_rows_beyond_availability_and_allocate_available(tmp_path, capsys):
  rows = tmp_path / "m.jsonl"
  rows.write_text(json.dumps({"run_id": "a", "data": {"ct": 5e4, "pet": 0}, "budget": 5e4, "step": 1,
                              "loss": {"ct": 1.0}, "available": {"ct": 4e4, "pet": 1e4}}) + "\n")
  assert cli.main(["scaling", "fit", "--measurements", str(rows), "--out", str(tmp_path / "f.json")]) == 2
  assert "row 1: 'data' exceeds 'available' for domain(s) ['ct']" in capsys.readouterr().err
  from m2dino_jax.scaling import law
  fits = tmp_path / "fits.json"
  law.write_fits(fits, law.Fits(["ct", "pet"], law.Law(np.zeros(2), np.ones(2), np.full(2, 0.5), np.zeros((2, 2)),
                                                       np.ones((2, 2))), np.array([np.inf, np.inf]), {}))
  out = tmp_path / "alloc.json"
  # Equal laws want an equal split; pet's stated 3e3 caps it there and ct takes the rest.
  assert cli.main(["scaling", "allocate", "--fits", str(fits), "--budget", "1e4", "--available", "ct=9e3,pet=3e3",
                   "--out", str(out)]) == 0
  counts = json.loads(out.read_text())["counts"]
  assert counts["ct"] == pytest.approx(7e3, rel=1e-6) and counts["pet"] == pytest.approx(3e3, rel=1e-6)
  assert cli.main(["scaling", "allocate", "--fits", str(fits), "--budget", "1e4", "--available", "ct=9e3,pet=3e3",
                   "--strategy", "data_proportional", "--out", str(out)]) == 0
  record = json.loads(out.read_text())
  assert record["strategy"] == "data_proportional"
  assert record["weights"] == pytest.approx({"ct": 0.75, "pet": 0.25})
