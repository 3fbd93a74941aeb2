"""Robust fit of the self law L(D) = E + A * D^(-beta), per domain, vmapped, one jax.jit.

Loss: sum_k w_k * huber(log(E + A D_k^-beta) - log L_k, delta), i.e. Huber on log residuals, so a few
broken runs do not drag the fit and every scale of loss counts alike. Weights carry bootstrap multiplicities
(a resample is a weight vector, so resamples vmap) and mask padding (w = 0).

Internally theta = (E, a, log beta) with A = exp(a) * D0^beta and D0 the weighted geometric mean of the data
sizes: the parameters then have similar scales whatever the units of D. The minimiser is the same as in
(E, A, beta), so results compare directly with scipy's least_squares on the natural parameters. Each fit
evaluates a grid of starts, runs Levenberg-Marquardt (numerics.lm_minimise) from the best few and keeps
the best result.

The floor E may be fixed per domain (`e_fixed`, NaN = fitted): 0 gives the paper's pure power law
L = A D^-beta, another value a known floor. With few sizes per domain a free E trades off against beta (a
lower E is compensated by a lower beta), which a fixed E removes; fixed-E fits need only 2 distinct sizes.

Between the two, a Gaussian prior on a free E (`e_prior` = (MU, SD), `EPrior`; CLI `--E prior:MU,SD`) adds
one quadratic term to the objective:

  sum_k w_k * huber(r_k, delta)  +  (delta^2 / 2) * ((E - MU) / SD)^2

i.e. an extra residual delta * (E - MU) / SD that is never Huberised and carries weight 1 (bootstrap weights
resample the runs, not the prior). The factor delta^2 / 2 is the weighting: if the log residuals had standard
deviation delta (the Huber scale), the data term at inliers would be delta^2 x their Gaussian negative
log-likelihood, and the prior enters on that same scale, so the sum is delta^2 x the negative log posterior.
With less scatter than delta (e.g. 1% noise, delta = 0.05) the prior weighs less than a Bayesian's would, by
(noise / delta)^2; shrink SD to hold E more tightly. SD -> 0 approaches fixed:MU, SD -> inf the free fit.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from m2dino_jax.errors import SolverError
from m2dino_jax.scaling.numerics import lm_minimise, robust_loss, x64

# Multi-start grid: E as a fraction of the smallest observed loss, and beta.
E_FRACTIONS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.95)
BETA_STARTS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0, 1.5)
REFINED_STARTS = 2  # Levenberg-Marquardt runs from this many best grid points
BETA_BOUNDS = (1e-3, 5.0)
DEFAULT_DELTA = 0.05


class EPrior(NamedTuple):
  """A Gaussian prior on a free floor E: mean and standard deviation (scalars, or one per domain)."""
  mu: float
  sd: float


def fit_domain(d, loss, w, *, delta, max_iter: int = 100, e_fixed=jnp.nan, e_prior=(jnp.nan, jnp.nan)):
  """Fits one domain's self law from points (d, loss) with weights w (all (k,)); returns a dict of scalars.

  Pure JAX, shapes static: call under jit/vmap. Points with w == 0 are ignored (d, loss may be anything
  positive there). e_fixed: a scalar; NaN fits E, a number holds E there. e_prior: (MU, SD) of a Gaussian
  prior on a free E (NaN = none; see the module docstring for its weight).
  """
  e_free = jnp.isnan(e_fixed)
  mu, sd = e_prior[0], e_prior[1]
  prior_on = e_free & ~jnp.isnan(mu)
  mu, sd = jnp.where(prior_on, mu, 0.0), jnp.where(prior_on, sd, 1.0)
  w_fit = jnp.concatenate([w, prior_on.astype(w.dtype)[None]])
  deltas = jnp.concatenate([jnp.full(w.shape, delta, w.dtype), jnp.full((1,), jnp.inf, w.dtype)])
  valid = w > 0
  logd = jnp.log(jnp.where(valid, d, 1.0))
  wsum = jnp.maximum(jnp.sum(w), 1e-300)  # an empty resample yields a (flagged) nonsense fit, not NaN
  logd0 = jnp.sum(w * logd) / wsum
  u = jnp.where(valid, logd - logd0, 0.0)
  log_loss = jnp.log(jnp.where(valid, loss, 1.0))
  loss_min = jnp.min(jnp.where(valid, loss, jnp.inf))

  def residual(theta):  # the points' log residuals, then the prior's (0 without a prior)
    e, a, log_beta = theta[0], theta[1], theta[2]
    pred = e + jnp.exp(a - jnp.exp(log_beta) * u)
    prior = jnp.where(prior_on, delta * (e - mu) / sd, 0.0)
    return jnp.concatenate([jnp.where(valid, jnp.log(pred) - log_loss, 0.0), prior[None]])

  lower = jnp.array([0.0, -jnp.inf, np.log(BETA_BOUNDS[0])])
  upper = jnp.array([jnp.inf, jnp.inf, np.log(BETA_BOUNDS[1])])

  def start(e_frac, beta):
    e0 = jnp.where(e_free, e_frac * loss_min, e_fixed)
    # Given E and beta, the best a in least squares is the weighted mean of log(L - E) + beta * u.
    a0 = jnp.sum(w * (jnp.log(jnp.maximum(jnp.where(valid, loss, 1.0) - e0, 1e-12 * loss_min)) + beta * u))
    return jnp.stack([e0, a0 / wsum, jnp.log(beta)])

  grid = [(ef, b) for ef in E_FRACTIONS for b in BETA_STARTS]
  theta0 = jnp.stack([start(jnp.asarray(ef, d.dtype), jnp.asarray(b, d.dtype)) for ef, b in grid])
  # Screen the grid by its loss, then refine only the most promising starts (cheap multi-start).
  grid_loss = jax.vmap(lambda t: robust_loss(residual(t), w_fit, deltas))(theta0)
  grid_loss = jnp.where(jnp.isfinite(grid_loss), grid_loss, jnp.inf)
  _, keep = jax.lax.top_k(-grid_loss, REFINED_STARTS)
  solve = functools.partial(lm_minimise, residual, weights=w_fit, delta=deltas, lower=lower, upper=upper,
                            free=jnp.stack([e_free, jnp.asarray(True), jnp.asarray(True)]), max_iter=max_iter)
  results = jax.vmap(solve)(theta0[keep])
  best = jnp.argmin(jnp.where(jnp.isfinite(results.loss), results.loss, jnp.inf))
  theta = results.theta[best]
  beta = jnp.exp(theta[2])
  # Three parameters need three distinct sizes; a resample with fewer is flagged as not converged.
  same = (d[:, None] == d[None, :]) & valid[None, :]  # same[k, j]: j is valid and has k's size
  first = jnp.argmax(same, axis=1) == jnp.arange(d.shape[0])  # k is the first valid point of its size
  distinct = jnp.sum(valid & first)
  return {"E": theta[0], "A": jnp.exp(theta[1] + beta * logd0), "beta": beta, "loss": results.loss[best],
          "converged": results.converged[best] & (distinct >= jnp.where(e_free, 3, 2)),
          "iterations": jnp.max(results.iterations)}


@functools.partial(jax.jit, static_argnames=("max_iter",))
def _fit_batch(d, loss, w, e_fixed, e_prior, delta, max_iter):
  per_domain = jax.vmap(lambda d_, l_, w_, e_, p_: fit_domain(d_, l_, w_, delta=delta, max_iter=max_iter,
                                                              e_fixed=e_, e_prior=p_))
  return jax.vmap(per_domain, in_axes=(None, None, 0, None, None))(d, loss, w, e_fixed, e_prior)


def e_prior_array(e_mode, n: int) -> np.ndarray:
  """(n, 2) prior (MU, SD) on each domain's free E, NaN = none: from an EPrior e_mode, else all NaN."""
  if not isinstance(e_mode, EPrior):
    return np.full((n, 2), np.nan)
  mu = np.broadcast_to(np.asarray(e_mode.mu, np.float64), (n,))
  sd = np.broadcast_to(np.asarray(e_mode.sd, np.float64), (n,))
  if not (np.all(np.isfinite(mu)) and np.all(mu >= 0)):
    raise SolverError(f"the E prior's mean must be a finite number >= 0, got {e_mode.mu}")
  if not (np.all(np.isfinite(sd)) and np.all(sd > 0)):
    raise SolverError(f"the E prior's standard deviation must be a finite number > 0, got {e_mode.sd}")
  return np.stack([mu, sd], axis=1)


def e_fixed_array(e_mode, n: int) -> np.ndarray:
  """(n,) floors to hold (NaN = fit): e_mode None/'free'/EPrior (fitted), 'none' (E = 0), a number, or (n,)
  numbers/NaN."""
  if e_mode is None or isinstance(e_mode, EPrior) or (isinstance(e_mode, str) and e_mode == "free"):
    return np.full(n, np.nan)
  if isinstance(e_mode, str) and e_mode == "none":
    return np.zeros(n)
  values = np.broadcast_to(np.asarray(e_mode, np.float64), (n,)).copy()
  if (values[~np.isnan(values)] < 0).any():
    raise SolverError(f"a fixed floor E must be >= 0, got {values}")
  return values


def check_points(d, loss, weights, *, min_points: int = 3) -> None:
  """Raises SolverError if a domain has too few distinct usable points to fit three parameters."""
  for i in range(d.shape[0]):
    keep = weights[i] > 0
    distinct = np.unique(d[i][keep]).size
    if distinct < min_points:
      raise SolverError(f"domain {i}: {distinct} distinct data size(s) with a measured loss; the self law "
                        f"needs at least {min_points}")
    if np.any(d[i][keep] <= 0) or np.any(loss[i][keep] <= 0) or not np.all(np.isfinite(loss[i][keep])):
      raise SolverError(f"domain {i}: data sizes and losses must be positive and finite")


@x64
def fit_power_laws(d, loss, weights=None, *, delta: float = DEFAULT_DELTA, max_iter: int = 100,
                   e_mode=None) -> dict:
  """Fits E, A, beta for each domain (E held where e_mode says, see e_fixed_array; an EPrior e_mode adds the
  Gaussian prior on E of the module docstring).

  d, loss: (domains, points); weights: None, (domains, points) or (resamples, domains, points).
  Returns numpy arrays of shape (domains,) or (resamples, domains) for E, A, beta, loss, converged.
  """
  d = np.asarray(d, np.float64)
  loss = np.asarray(loss, np.float64)
  weights = np.ones_like(d) if weights is None else np.asarray(weights, np.float64)
  batched = weights.ndim == 3
  w = weights if batched else weights[None]
  e_fixed = e_fixed_array(e_mode, d.shape[0])
  check_points(d, loss, w[0], min_points=2 if not np.isnan(e_fixed).any() else 3)
  out = _fit_batch(jnp.asarray(d), jnp.asarray(loss), jnp.asarray(w), jnp.asarray(e_fixed),
                   jnp.asarray(e_prior_array(e_mode, d.shape[0])), delta, max_iter)
  out = {k: np.asarray(v) for k, v in out.items()}
  return out if batched else {k: v[0] for k, v in out.items()}
