"""End to end: simulate -> fit -> allocate -> Grain mixture weights -> "train" by the planted law -> compare.

Also the CLI's file formats and its one-line errors.
"""

import collections
import json

import grain
import numpy as np
import pytest

from m2dino_jax import cli
from m2dino_jax.data import mixture
from m2dino_jax.errors import DataError
from m2dino_jax.scaling import allocation_io, law, simulate, transfer

ALLOCATION_KEYS = {"budget", "floor", "weights", "counts", "predicted_loss", "objective", "proportional"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  root = tmp_path_factory.mktemp("study")
  m, fits, alloc = root / "m.jsonl", root / "fits.json", root / "allocation.json"
  assert cli.main(["scaling", "simulate", "--out", str(m), "--seed", "5"]) == 0
  assert cli.main(["scaling", "fit", "--measurements", str(m), "--out", str(fits), "--bootstrap", "64"]) == 0
  assert cli.main(["scaling", "allocate", "--fits", str(fits), "--budget", "3e5", "--floor", "0.05",
                   "--out", str(alloc)]) == 0
  return root, m, fits, alloc


def test_files_have_the_documented_keys(study):
  _, _, fits_path, alloc_path = study
  fits = json.loads(fits_path.read_text())
  assert {"domains", "E", "A", "beta", "tau", "available"} <= set(fits)
  assert fits["domains"] == list(simulate.PLANTED_DOMAINS) and np.shape(fits["tau"]) == (3, 3)
  record = json.loads(alloc_path.read_text())
  assert ALLOCATION_KEYS <= set(record)
  assert set(record["proportional"]) >= {"weights", "predicted_loss", "objective"}
  assert record["budget"] == 3e5 and record["floor"] == 0.05
  assert sum(record["counts"].values()) == pytest.approx(3e5, rel=1e-12)
  assert min(record["weights"].values()) >= 0.05 - 1e-12
  assert record["objective"] <= record["proportional"]["objective"]
  # predicted_loss is the fitted law at the allocated counts.
  fitted = law.read_fits(fits_path)
  counts = np.array([record["counts"][d] for d in fitted.domains])
  np.testing.assert_allclose(law.predict_loss(fitted.law, counts, xp=np),
                             [record["predicted_loss"][d] for d in fitted.domains], rtol=1e-12)


def test_closed_loop_grain_mixture_draws_the_allocated_proportions(study):
  _, _, _, alloc_path = study
  record = json.loads(alloc_path.read_text())
  weights = allocation_io.read_allocation_weights(alloc_path)
  assert weights == pytest.approx(record["weights"], abs=1e-15)
  sizes = {d: 1000 for d in simulate.PLANTED_DOMAINS}
  data_layer = mixture.mixture_weights("json", sizes, weights_file=str(alloc_path))  # the data layer's path
  assert data_layer == pytest.approx(weights, abs=1e-15)
  sources = {d: grain.MapDataset.source([d] * 50).repeat().to_iter_dataset() for d in sizes}
  mixed = grain.IterDataset.mix(sources, data_layer)
  draws = 6000
  it = iter(mixed)
  counts = collections.Counter(next(it) for _ in range(draws))
  for d, w in weights.items():
    assert counts[d] / draws == pytest.approx(w, abs=0.003), (d, counts[d] / draws, w)


def test_allocated_mixture_trained_by_the_planted_law(study):
  """'Pretrain' on the allocations for unseen budgets: measured loss matches prediction (r >= 0.99) and
  beats the data-proportional mixture."""
  _, _, fits_path, _ = study
  fitted = law.read_fits(fits_path)
  truth, available = simulate.planted_law()
  from m2dino_jax.scaling import allocate
  budgets = [4e4, 1.2e5, 2.5e5, 6e5, 1.2e6]  # none of these budgets was in the measurements
  result = allocate.allocate(fitted.law, budgets, available, floor=0.05)
  rng = np.random.default_rng(0)
  measured = simulate.measure(truth, result["counts"], simulate.PLANTED_NOISE, rng)
  assert transfer.pearson_r(result["losses"], measured) >= 0.99
  true_alloc = simulate.measure(truth, result["counts"], 0.0, rng).sum(1)
  true_prop = simulate.measure(truth, result["proportional_counts"], 0.0, rng).sum(1)
  assert (true_alloc < true_prop).all()


def test_plot_writes_every_figure(study, tmp_path):
  _, m, fits, _ = study
  assert cli.main(["scaling", "plot", "--fits", str(fits), "--measurements", str(m), "--out",
                   str(tmp_path), "--budgets", "5e4,2e5"]) == 0
  names = sorted(p.name for p in tmp_path.glob("*.png"))
  assert names == ["allocation.png", "fits.png", "hub_island.png", "predicted.png", "transfer.png"]
  assert all((tmp_path / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_weights_reader_validates(tmp_path):
  flat = tmp_path / "flat.json"
  flat.write_text(json.dumps({"ct": 2, "pet": 6}))
  assert allocation_io.read_allocation_weights(flat) == {"ct": 0.25, "pet": 0.75}
  for body, message in [({"weights": {"ct": -1}}, "weight of 'ct' must be a finite number >= 0"),
                        ({"weights": {"ct": 0}}, "weights sum to 0"), ([1, 2], "non-empty object")]:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(body))
    with pytest.raises(DataError, match=message) as err:
      allocation_io.read_allocation_weights(bad)
    assert str(bad) in str(err.value)


def test_cli_errors_are_one_line(tmp_path, capsys):
  bad = tmp_path / "m.jsonl"
  bad.write_text('{"run_id": "a"}\n')
  assert cli.main(["scaling", "fit", "--measurements", str(bad), "--out", str(tmp_path / "f.json")]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and f"{bad} row 1: missing field(s)" in err
  fits = tmp_path / "fits.json"
  law.write_fits(fits, law.Fits(["a", "b"], law.Law(np.ones(2), np.ones(2), np.full(2, 0.5), np.zeros((2, 2)),
                                                    np.ones((2, 2))), np.array([2e4, 2e4]), {}))
  assert cli.main(["scaling", "allocate", "--fits", str(fits), "--budget", "1e5"]) == 2
  assert "exceeds the total data available" in capsys.readouterr().err
  assert not (tmp_path / "allocation.json").exists()
