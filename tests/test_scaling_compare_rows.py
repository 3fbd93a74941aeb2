"""`m2dino scaling compare --measurements`: the report from measured rows equals the planted-truth path's report
where both measure the same thing (rows written by `compare --law --write-rows`, i.e. the simulate path)."""

import dataclasses
import json

import numpy as np
import pytest

from m2dino_jax.errors import DataError
from m2dino_jax.scaling import measurements, study
from tests.util import run_cli

BUDGETS = "5e3,1e4,2e4,4e4"
SAME = ("budgets", "domains", "focus", "baseline", "mean_loss", "loss", "vs", "slopes", "transfer", "prediction",
        "shares")




@pytest.fixture(scope="module")
def both(tmp_path_factory):
  root = tmp_path_factory.mktemp("rows")
  rows = root / "rows.jsonl"
  code, stdout, _ = run_cli(["scaling", "compare", "--law", "example:six_domain", "--budgets", BUDGETS, "--floors", "",
                          "--bootstrap", "4", "--write-rows", str(rows), "--out", str(root / "law")])
  assert code == 0 and f"(20 strategy runs) to {rows}" in stdout
  code, _, err = run_cli(["scaling", "compare", "--measurements", str(rows), "--bootstrap", "4",
                       "--out", str(root / "rows")])
  assert code == 0, err
  load = lambda name: json.loads((root / name / "report.json").read_text())["compare"]
  return root, rows, load("law"), load("rows")


def test_report_from_rows_equals_report_from_the_law(both):
  root, _, law, rows = both
  for key in SAME:
    assert rows[key] == law[key], key
  fit_keys = set(law["fit"]) - {"true_beta", "true_tau"}
  assert {k: rows["fit"][k] for k in fit_keys} == {k: law["fit"][k] for k in fit_keys}
  assert rows["source"] == "measurements" and rows["strategy_runs"] == 20 and rows["rows"] == law["rows"] == 56
  assert "floor_sweep" not in rows
  # The markdown tables (gains per strategy, slopes) read the same.
  md = {name: (root / name / "report.md").read_text().splitlines() for name in ("law", "rows")}
  table = lambda lines: [x for x in lines if x.startswith("| ") and "%" in x or x.startswith("| transfer_")]
  assert table(md["rows"]) == table(md["law"]) and len(table(md["law"])) >= 6
  assert "No floor sweep" in md["rows"][2] and "20 rows with a 'strategy'" in md["rows"][2]


def test_repeats_are_averaged_and_gaps_are_errors(both, tmp_path):
  _, path, law, _ = both
  rows = measurements.read_measurements(path)
  scale = 1.1
  repeats = [dataclasses.replace(r, run_id=r.run_id + "-again", loss={d: v * scale for d, v in r.loss.items()})
             for r in rows if r.strategy]
  report = study.compare_from_rows(rows + repeats, n_bootstrap=4)
  for s, loss in law["loss"].items():  # the mean of L and 1.1 L
    np.testing.assert_allclose(report["loss"][s], np.asarray(loss) * (1 + scale) / 2, rtol=1e-12)
  # Every strategy scaled alike: gains and slopes unchanged.
  np.testing.assert_allclose(report["vs"]["data_proportional"]["per_domain"],
                             law["vs"]["data_proportional"]["per_domain"], rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(report["slopes"]["uniform"], law["slopes"]["uniform"], rtol=1e-9)
  gap = [r for r in rows if not (r.strategy == "uniform" and r.budget == 2e4)]
  with pytest.raises(DataError, match=r"strategy 'uniform' has no run at budget\(s\) \[20000.0\]"):
    study.compare_from_rows(gap, n_bootstrap=4)
  with pytest.raises(DataError, match="no rows with 'strategy'"):
    study.compare_from_rows([r for r in rows if not r.strategy], n_bootstrap=4)
  partial = [dataclasses.replace(r, loss={"abd_ct": 1.0}) if r.strategy == "uniform" else r for r in rows]
  with pytest.raises(DataError, match=r"run 'uniform-5000-r0' \(strategy 'uniform'\) has no loss for"):
    study.compare_from_rows(partial, n_bootstrap=4)
  code, _, err = run_cli(["scaling", "compare", "--measurements", str(path), "--b-max", "4e4",
                       "--out", str(tmp_path)])
  assert code == 2 and "['--b-max'] need a planted truth (--law)" in err
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({**rows[-1].to_json(), "strategy": 3}) + "\n")
  code, _, err = run_cli(["scaling", "compare", "--measurements", str(bad), "--out", str(tmp_path)])
  assert code == 2 and "row 1: 'strategy' must be a non-empty string" in err
