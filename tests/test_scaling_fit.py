"""Robust power-law and transfer fits: equal to scipy least_squares(trf), recover planted truth."""

import numpy as np
import pytest

from m2dino_jax.errors import SolverError
from m2dino_jax.scaling import measurements, powerlaw, reference, simulate, transfer

DELTA = powerlaw.DEFAULT_DELTA


def _random_curves(rng, domains, points, noise):
  d = np.tile(np.geomspace(1e2, 1e6, points), (domains, 1))
  e, a, b = rng.uniform(0.2, 0.6, domains), rng.uniform(3, 12, domains), rng.uniform(0.2, 0.7, domains)
  loss = (e[:, None] + a[:, None] * d ** -b[:, None]) * np.exp(noise * rng.standard_normal(d.shape))
  return d, loss


def _relative(ours, ref):
  return np.abs(np.asarray(ours) - ref) / np.abs(ref)


@pytest.fixture(scope="module")
def batch():
  """One compiled call for the comparisons below: resample 0 is the data itself, 1..4 are bootstraps.

  Domain 0 carries an outlier (the Huber tail is active); every resample keeps >= 3 distinct sizes.
  """
  rng = np.random.default_rng(0)
  d, loss = _random_curves(rng, 6, 12, 0.01)
  loss[0, 3] *= 1.3
  counts = rng.multinomial(12, np.full(12, 1 / 12), size=4).astype(float)
  counts[:, :3] += 1
  weights = np.concatenate([np.ones((1, 6, 12)), np.broadcast_to(counts[:, None, :], (4, 6, 12))])
  return d, loss, counts, weights, powerlaw.fit_power_laws(d, loss, weights)


def test_fit_equals_scipy_least_squares(batch):
  d, loss, _, _, ours = batch
  assert ours["converged"].all()
  for i in range(d.shape[0]):
    ref = reference.fit_power_law_scipy(d[i], loss[i], delta=DELTA)
    got = [ours["E"][0, i], ours["A"][0, i], ours["beta"][0, i]]
    assert _relative(got, ref).max() < 1e-4, (i, got, ref)


def test_bootstrap_fits_equal_scipy_on_resampled_rows(batch):
  d, loss, counts, _, ours = batch
  for k in range(4):
    rows = np.repeat(np.arange(12), counts[k].astype(int))  # the resample as repeated rows
    for i in (0, 1):
      ref = reference.fit_power_law_scipy(d[i, rows], loss[i, rows], delta=DELTA)
      got = [ours["E"][k + 1, i], ours["A"][k + 1, i], ours["beta"][k + 1, i]]
      assert _relative(got, ref).max() < 1e-4, (k, i, got, ref)


def test_huber_resists_an_outlier(batch):
  d, _, _, weights, _ = batch
  clean = 0.3 + 5.0 * d ** -0.4
  broken = clean.copy()
  broken[:, 5] *= 2.0
  robust = powerlaw.fit_power_laws(d, broken, weights)["beta"][0, 0]
  squares = powerlaw.fit_power_laws(d, broken, weights, delta=1e3)["beta"][0, 0]  # plain least squares
  assert abs(robust / 0.4 - 1) < 0.5 * abs(squares / 0.4 - 1)
  assert powerlaw.fit_power_laws(d, clean, weights)["beta"][0, 0] == pytest.approx(0.4, rel=1e-6)


def test_planted_truth_is_recovered():
  """Noise 0.15% (simulate.PLANTED_NOISE): beta within 1%, tau within 5%, held-out r >= 0.99."""
  rows, law, _ = simulate.planted_measurements(noise=simulate.PLANTED_NOISE, seed=3)
  fits = transfer.fit_scaling(measurements.to_arrays(rows), n_bootstrap=64, seed=0)
  assert fits.extra["converged"]
  off = ~np.eye(3, dtype=bool)
  assert _relative(fits.law.beta, law.beta).max() < 0.01
  assert _relative(fits.law.tau[off], law.tau[off]).max() < 0.05
  assert _relative(fits.law.E, law.E).max() < 0.02
  ci = np.asarray(fits.extra["ci"]["tau"])
  assert (ci[..., 0] <= ci[..., 1]).all()
  inside = (ci[..., 0][off] <= law.tau[off]) & (law.tau[off] <= ci[..., 1][off])
  assert inside.sum() >= 4  # 95% intervals: most of the 6 cover the truth
  held_out = simulate.mixture_runs(law, simulate.PLANTED_DOMAINS, [5e4, 1.5e5, 3e5], per_budget=5,
                                   noise=simulate.PLANTED_NOISE, seed=11, prefix="held")
  arrays = measurements.to_arrays(held_out)
  from m2dino_jax.scaling.law import predict_loss
  predicted = np.asarray(predict_loss(fits.law, arrays.data, xp=np))
  assert transfer.pearson_r(predicted, arrays.loss) >= 0.99


def test_transfer_rows_equal_scipy_least_squares():
  """Each tau row equals scipy's trf fit of the same Huber loss, given the same self law."""
  rows, _, _ = simulate.planted_measurements(noise=0.01, seed=7)  # noisy: residuals are not tiny
  arrays = measurements.to_arrays(rows)
  fits = transfer.fit_scaling(arrays, n_bootstrap=64)  # same shapes as the planted test: one compile
  _, tau_mask = transfer.point_masks(arrays.data, arrays.loss, "all")
  for i in range(3):
    keep = tau_mask[i]
    ref = reference.fit_tau_row_scipy(arrays.data[keep], arrays.loss[keep, i], i, fits.law.E[i],
                                      fits.law.A[i], fits.law.beta[i], delta=DELTA)
    off = np.arange(3) != i
    assert _relative(fits.law.tau[i, off], ref[off]).max() < 1e-4, (i, fits.law.tau[i], ref)


def test_transfer_sources_and_gamma():
  law, _ = simulate.planted_law()
  law = law._replace(gamma=np.full((3, 3), 0.9))
  sizes = np.geomspace(1e2, 4e5, 12)
  rows = simulate.single_source_runs(law, simulate.PLANTED_DOMAINS, sizes, noise=0.0)
  rows += simulate.mixture_runs(law, simulate.PLANTED_DOMAINS, [2e4, 1e5, 3e5], per_budget=4, noise=0.0)
  arrays = measurements.to_arrays(rows)
  off = ~np.eye(3, dtype=bool)
  fits = transfer.fit_scaling(arrays, n_bootstrap=0, source="single", fit_gamma=True)
  assert _relative(fits.law.tau[off], law.tau[off]).max() < 1e-3
  assert _relative(fits.law.gamma[off], 0.9).max() < 1e-4
  mix = transfer.fit_scaling(arrays, n_bootstrap=0, source="mixture", fit_gamma=True)
  assert _relative(mix.law.gamma[off], 0.9).max() < 1e-3  # noise-free: mixture runs identify it too


def test_masks_and_errors():
  data = np.array([[5.0, 0, 0], [0, 3, 0], [2, 2, 0], [0, 1, 1]])
  loss = np.ones((4, 3))
  self_mask, single = transfer.point_masks(data, loss, "single")
  np.testing.assert_array_equal(self_mask[0], [True, False, False, False])
  np.testing.assert_array_equal(single[2], [True, True, False, False])  # pet from single sources
  _, mixture = transfer.point_masks(data, loss, "mixture")
  np.testing.assert_array_equal(mixture[0], [False, False, True, False])
  with pytest.raises(SolverError, match="transfer source"):
    transfer.point_masks(data, loss, "both")
  with pytest.raises(SolverError, match="needs at least 3"):
    powerlaw.fit_power_laws(np.array([[1e3, 1e3, 1e4]]), np.ones((1, 3)))
  rows = simulate.single_source_runs(simulate.planted_law()[0], simulate.PLANTED_DOMAINS, [1e3, 1e4],
                                     noise=0.0)
  with pytest.raises(SolverError, match="domain 'ct': 2 distinct data size"):
    transfer.fit_scaling(measurements.to_arrays(rows), n_bootstrap=0)


def test_hub_island_scores_and_pearson():
  tau = np.array([[9.0, 0.3, 0.1], [0.6, 9.0, 0.15], [0.25, 0.12, 9.0]])  # diagonal ignored
  hub, island = transfer.hub_island_scores(tau)
  np.testing.assert_allclose(hub, [0.85, 0.42, 0.25])
  np.testing.assert_allclose(island, 1 / (1 + np.array([0.4, 0.75, 0.37])))
  a, b = np.random.default_rng(0).normal(size=(2, 50))
  assert transfer.pearson_r(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
