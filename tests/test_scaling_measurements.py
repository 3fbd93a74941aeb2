"""measurements.jsonl: validation names file and line; round trip; last step per run; planted rows."""

import json

import numpy as np
import pytest

from m2dino_jax.errors import DataError
from m2dino_jax.scaling import measurements, simulate

GOOD = {"run_id": "r1", "data": {"ct": 1000, "pet": 0}, "weights": {"ct": 1.0, "pet": 0.0}, "budget": 1000,
        "step": 10, "loss": {"ct": 0.8, "pet": 1.2}}


def _write(tmp_path, rows):
  path = tmp_path / "m.jsonl"
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


@pytest.mark.parametrize("patch, message", [
    ({"loss": {"ct": -1.0}}, "loss['ct'] must be > 0"),
    ({"data": {"ct": 5, "mri": 1}, "weights": {}, "loss": {"ct": 1.0}}, "but line 1's rows name"),
    ({"budget": 0}, "'budget' must be > 0"),
    ({"step": 1.5}, "'step' must be an integer"),
    ({"weights": {"ct": 0.5, "pet": 0.1}}, "must sum to 1"),
    ({"loss": {"mri": 1.0}}, "'loss' names domain(s) ['mri']"),
    ({"extra": 1}, "unknown field(s) ['extra']"),
    ({"loss": {"ct": float("nan")}}, "finite"),
])
def test_bad_row_names_file_and_line(tmp_path, patch, message):
  path = _write(tmp_path, [GOOD, "", {**GOOD, "run_id": "r2", **patch}])
  with pytest.raises(DataError) as err:
    measurements.read_measurements(path)
  assert f"{path} row 3" in str(err.value)
  assert message in str(err.value)


def test_bad_json_missing_field_and_duplicates(tmp_path):
  with pytest.raises(DataError, match="row 2: not valid JSON"):
    measurements.read_measurements(_write(tmp_path, [GOOD, "{oops"]))
  missing = {k: v for k, v in GOOD.items() if k != "step"}
  with pytest.raises(DataError, match=r"row 1: missing field\(s\) \['step'\]"):
    measurements.read_measurements(_write(tmp_path, [missing]))
  with pytest.raises(DataError, match="row 2: run 'r1' at step 10 appears twice"):
    measurements.read_measurements(_write(tmp_path, [GOOD, GOOD]))
  with pytest.raises(DataError, match="not found"):
    measurements.read_measurements(tmp_path / "absent.jsonl")


def test_round_trip_and_last_step(tmp_path):
  later = {**GOOD, "step": 20, "loss": {"ct": 0.7}}
  other = {**GOOD, "run_id": "r2", "data": {"ct": 0, "pet": 500}, "weights": {}, "loss": {"pet": 0.9},
           "available": {"ct": 5e5, "pet": 1e4}}
  path = _write(tmp_path, [GOOD, later, other])
  rows = measurements.read_measurements(path)
  again = tmp_path / "again.jsonl"
  measurements.write_measurements(again, rows)
  assert measurements.read_measurements(again) == rows
  arrays = measurements.to_arrays(rows, ["pet", "ct"])
  assert arrays.run_ids == ["r1", "r2"]
  np.testing.assert_array_equal(arrays.data, [[0, 1000], [500, 0]])
  np.testing.assert_array_equal(arrays.loss, [[np.nan, 0.7], [0.9, np.nan]])  # step 20 kept for r1
  np.testing.assert_array_equal(arrays.available, [1e4, 5e5])


def test_planted_rows_follow_the_law_and_validate(tmp_path):
  rows, law, available = simulate.planted_measurements(noise=0.0)
  path = tmp_path / "planted.jsonl"
  measurements.write_measurements(path, rows)
  arrays = measurements.to_arrays(measurements.read_measurements(path))
  assert arrays.domains == list(simulate.PLANTED_DOMAINS)
  # Noise-free rows equal the law computed by hand: E + A (x_i + sum_j tau_ij x_j)^-beta.
  x = arrays.data
  deff = x + x @ (law.tau * (1 - np.eye(3))).T
  expected = law.E + law.A * deff ** -law.beta
  np.testing.assert_allclose(arrays.loss, expected, rtol=1e-12)
  np.testing.assert_array_equal(arrays.available, available)
  noisy = simulate.measure(law, np.full((4000, 3), 1e4), 0.01, np.random.default_rng(0))
  ratio = np.log(noisy / simulate.measure(law, np.full((1, 3), 1e4), 0.0, np.random.default_rng(0)))
  assert abs(ratio.std() - 0.01) < 0.0005
