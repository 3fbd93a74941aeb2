"""Slow, obviously-correct references for the JAX fits, projection and allocator (scipy, numpy loops).

Used by the tests to check the fast paths and by `m2dino bench scaling` as the baseline to beat.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize

from m2dino_jax.scaling.law import Law, predict_loss


def fit_power_law_scipy(d, loss, *, delta: float, x0=None) -> np.ndarray:
  """(E, A, beta) from scipy least_squares(trf) with Huber loss on log residuals, natural parameters."""
  d = np.asarray(d, np.float64)
  log_loss = np.log(np.asarray(loss, np.float64))
  if x0 is None:  # log-linear start: E = 0.5 min L, slope of log(L - E) against log D
    e0 = 0.5 * np.min(loss)
    slope, icpt = np.polyfit(np.log(d), np.log(np.asarray(loss) - e0), 1)
    x0 = np.array([e0, np.exp(icpt), max(-slope, 1e-2)])

  def residual(theta):
    e, a, b = theta
    return np.log(e + a * d ** (-b)) - log_loss

  def jac(theta):
    e, a, b = theta
    p = d ** (-b)
    pred = e + a * p
    return np.stack([1.0 / pred, p / pred, -a * p * np.log(d) / pred], axis=1)

  res = optimize.least_squares(residual, x0, jac=jac, method="trf", loss="huber", f_scale=delta,
                               bounds=([0.0, 1e-300, 1e-3], [np.inf, np.inf, 5.0]), x_scale="jac",
                               ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=2000)
  return res.x


def fit_tau_row_scipy(data, loss_i, i: int, e: float, a: float, beta: float, *, delta: float,
                      x0=None) -> np.ndarray:
  """Row i of tau (gamma = 1) from runs `data` (runs, n) and domain i's losses, self law fixed."""
  data = np.asarray(data, np.float64)
  n = data.shape[1]
  sources = [j for j in range(n) if j != i and (data[:, j] > 0).any()]
  log_loss = np.log(np.asarray(loss_i, np.float64))

  def residual(t):
    deff = data[:, i] + data[:, sources] @ t
    return np.log(e + a * deff ** (-beta)) - log_loss

  x0 = np.full(len(sources), 0.2) if x0 is None else x0
  res = optimize.least_squares(residual, x0, method="trf", loss="huber", f_scale=delta,
                               bounds=(0.0, np.inf), x_scale="jac", ftol=1e-15, xtol=1e-15, gtol=1e-15,
                               max_nfev=5000)
  row = np.zeros(n)
  row[sources] = res.x
  return row


def project_reference(v, lower, upper, total) -> np.ndarray:
  """Euclidean projection onto {sum x = total, lower <= x <= upper} via scipy's QP-free route.

  The projection is clip(v - lam, lower, upper) for the lam that meets the sum; brentq on that monotone
  function to machine precision, then a float64 polish of the free coordinates.
  """
  v, lower, upper = (np.asarray(a, np.float64) for a in (v, lower, upper))
  g = lambda lam: np.clip(v - lam, lower, upper).sum() - total
  lo = np.min(v - upper) - 1.0
  hi = np.max(v - lower) + 1.0
  lam = optimize.brentq(g, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)
  return np.clip(v - lam, lower, upper)


def allocate_slsqp(law: Law, budget: float, lower, upper, weights=None, *, starts: int = 3,
                   seed: int = 0) -> tuple[np.ndarray, float]:
  """Allocation by multi-start scipy SLSQP (as in the paper's recipe); returns counts and objective."""
  n = len(law.E)
  w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
  lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
  rng = np.random.default_rng(seed)

  def objective(z):  # in budget fractions z = x / B
    return float(np.sum(w * predict_loss(law, np.maximum(z, 0.0) * budget, xp=np)))

  def grad(z, eps=None):
    x = np.maximum(z, 1e-300) * budget
    tau = law.tau * (1.0 - np.eye(n))
    deff = x + (tau * x[None, :] ** law.gamma).sum(-1)
    dl_ddeff = -w * law.A * law.beta * deff ** (-law.beta - 1.0)
    ddeff_dx = np.eye(n) + tau * law.gamma * x[None, :] ** (law.gamma - 1.0)
    return budget * (dl_ddeff @ ddeff_dx)

  lo, hi = lower / budget, upper / budget
  best = None
  for k in range(starts):
    z0 = np.full(n, 1.0 / n) if k == 0 else rng.dirichlet(np.ones(n))
    z0 = project_reference(z0, lo, hi, 1.0)
    res = optimize.minimize(objective, z0, jac=grad, method="SLSQP", bounds=list(zip(lo, hi)),
                            constraints=[{"type": "eq", "fun": lambda z: z.sum() - 1.0,
                                          "jac": lambda z: np.ones_like(z)}],
                            options={"ftol": 1e-15, "maxiter": 1000})
    z = project_reference(res.x, lo, hi, 1.0)  # SLSQP may leave tiny violations; snap to the set
    if best is None or objective(z) < best[1]:
      best = (z, objective(z))
  return best[0] * budget, best[1]
