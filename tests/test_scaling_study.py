"""The planted six-domain study end to end: strategies on measured loss, the no-transfer control, a misspecified
truth (gamma = 0.7) and the files `m2dino scaling compare` writes."""

import dataclasses
import json

import numpy as np
import pytest

from m2dino_jax import cli
from m2dino_jax.scaling import allocation_io, lawfile, study

BUDGETS = [5e3, 1e4, 2e4, 4e4]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  out = tmp_path_factory.mktemp("compare")
  assert cli.main(["scaling", "compare", "--law", "example:six_domain", "--budgets", ",".join(map(str, BUDGETS)),
                   "--b-max", "4e4", "--bootstrap", "8", "--out", str(out)]) == 0
  return out, json.loads((out / "report.json").read_text())


def test_transfer_aware_wins_on_measured_loss_at_every_budget(compared):
  _, report = compared
  rep = report["compare"]
  for other in ("data_proportional", "uniform", "transfer_blind", "temperature"):
    gain = np.asarray(rep["vs"][other]["aggregate"])
    assert (gain > 0).all(), f"mean-loss gain of transfer_aware over {other} per budget {BUDGETS}: {gain}"
  dp = rep["vs"]["data_proportional"]
  # The gain that knowing the transfer brings is not just the gain of knowing the self laws.
  assert (np.asarray(dp["aggregate"]) > np.asarray(rep["vs"]["transfer_blind"]["aggregate"])).all()
  assert dp["headline_domain"] == "hn_pet", dp["per_domain_mean"]
  assert (np.asarray(dp["budget_multiplier"]) > 1).all()
  assert rep["transfer"]["hub"] == "abd_ct" and rep["transfer"]["island"] == "hn_pet"
  assert not rep["transfer"]["negligible"]
  assert rep["fit"]["converged"] and len(rep["slopes"]["transfer_aware"]) == 6


def test_compare_writes_report_plots_and_readable_allocations(compared):
  out, report = compared
  names = sorted(p.name for p in out.glob("*.png"))
  assert names == ["extrapolation.png", "floor_sweep.png", "gains.png", "slopes.png", "strategies.png"]
  assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
  text = (out / "report.md").read_text()
  assert "hn_pet" in text and "Measured optimum" in text and "Extrapolation" in text
  rep = report["compare"]
  files = sorted((out / "allocations").glob("*.json"))
  assert len(files) == 5 * len(BUDGETS)
  for path in files:
    record = json.loads(path.read_text())
    k = rep["budgets"].index(record["budget"])
    weights = allocation_io.read_allocation_weights(path)
    np.testing.assert_allclose([weights[d] for d in rep["domains"]], rep["shares"][record["strategy"]][k],
                               rtol=1e-12)
  sweep = rep["floor_sweep"]
  assert sweep["best_floor"] == sweep["floors"][int(np.argmin(sweep["mean_loss"]))]
  shares = np.asarray(sweep["shares"])  # (floors, budgets, domains), each allocation meets its floor
  assert (shares >= np.asarray(sweep["floors"])[:, None, None] - 1e-12).all()
  np.testing.assert_allclose(shares.sum(-1), 1.0, rtol=1e-12)


def test_without_transfer_aware_and_blind_agree_within_noise():
  planted = lawfile.without_transfer(lawfile.read_law("example:six_domain"))
  report, counts = study.run_compare(planted, BUDGETS, n_bootstrap=0, floors=())
  gain = np.asarray(report["vs"]["transfer_blind"]["aggregate"])
  # Measured mean loss of 6 domains at 1% noise each: the difference of two such means has sd ~0.6%.
  assert np.abs(gain).max() < 0.025, gain
  assert np.max(np.abs(counts["transfer_aware"] - counts["transfer_blind"]) / BUDGETS[0]) < 0.05
  assert np.max(report["fit"]["tau"]) < 0.05  # noise only (the example's true transfers are 0.02-0.8)
  assert report["transfer"]["negligible"]  # so the report names no hub or island
  assert report["transfer"]["max_tau"] == pytest.approx(np.max(np.asarray(report["fit"]["tau"]) * (1 - np.eye(6))))


def test_misspecified_truth_shows_error_growing_out_of_range():
  planted = lawfile.read_law("example:six_domain")
  planted = dataclasses.replace(planted, noise=0.003)
  bent = dataclasses.replace(planted, law=planted.law._replace(gamma=np.where(np.eye(6) > 0, 1.0, 0.7)))
  right = study.run_extrapolation(planted, 4e4, n_bootstrap=0, e_modes=("none",))["laws"]["none"]
  wrong = study.run_extrapolation(bent, 4e4, n_bootstrap=0, e_modes=("none",))["laws"]["none"]
  factors = study.IN_RANGE_FACTORS + study.EXTRAPOLATION_FACTORS
  message = f"MAPE by budget/B_max {factors}: gamma=1 {right['mape_by_factor']}, gamma=0.7 {wrong['mape_by_factor']}"
  assert wrong["held_out"]["pooled_mape"] > 1.5 * wrong["in_range"]["pooled_mape"], message
  assert wrong["held_out"]["pooled_mape"] > 2 * right["held_out"]["pooled_mape"], message
  assert right["held_out"]["pooled_mape"] < 1.5 * right["in_range"]["pooled_mape"], message
  report, _ = study.run_compare(bent, BUDGETS, n_bootstrap=0, floors=(0.025, 0.05, 0.1))
  assert report["floor_sweep"]["best_floor"] in (0.025, 0.05, 0.1)  # reported, whichever it is
