"""Transfer coefficients tau_ij and the whole fit (self laws + transfer) with bootstrap confidence intervals.

With domain i's self law fixed, row i of tau is fitted from runs that trained on other domains' data:
  single-source runs  (x_i = 0, one source j):  L_i = E_i + A_i (tau_ij x_j^gamma_ij)^-beta_i
  mixture runs        (x_i > 0 and others):     L_i = E_i + A_i (x_i + sum_j tau_ij x_j^gamma_ij)^-beta_i
by the same robust Levenberg-Marquardt (Huber on log residuals, tau >= 0; optionally gamma in [0.2, 2]).
Fitting on the loss scale rather than inverting each run's loss to an effective size keeps noisy runs
near the floor E_i from blowing up.

Bootstrap: a resample is a vector of run multiplicities; self laws and tau are refitted per resample, all
resamples vmapped in one jax.jit; intervals are percentiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from m2dino_jax.errors import SolverError
from m2dino_jax.scaling import powerlaw
from m2dino_jax.scaling.law import Fits, Law
from m2dino_jax.scaling.measurements import MeasurementArrays
from m2dino_jax.scaling.numerics import lm_minimise, robust_loss, x64

SOURCES = ("single", "mixture", "all")
TAU_STARTS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # screened by loss; the best few are refined
REFINED_STARTS = 2
GAMMA_BOUNDS = (0.2, 2.0)


def point_masks(data: np.ndarray, loss: np.ndarray, source: str = "all") -> tuple[np.ndarray, np.ndarray]:
  """Which runs feed each domain's self law and each tau row: two (domains, runs) bool arrays.

  Self law of i: runs on domain i alone. Tau row i: runs with data from some j != i, restricted to
  single-source runs (x_i = 0, one source) or mixture runs (x_i > 0) by `source`.
  """
  if source not in SOURCES:
    raise SolverError(f"transfer source must be one of {SOURCES}, got {source!r}")
  n = data.shape[1]
  measured = np.isfinite(loss).T & (loss.T > 0)  # (domains, runs)
  has = data > 0  # (runs, domains)
  others = np.stack([np.delete(has, i, axis=1).sum(1) for i in range(n)])  # (domains, runs)
  own = has.T
  self_mask = measured & own & (others == 0)
  single = measured & ~own & (others == 1)
  mixture = measured & own & (others >= 1)
  tau_mask = {"single": single, "mixture": mixture, "all": measured & (others >= 1)}
  return self_mask, tau_mask[source]


def fit_tau_row(i, data, loss_i, w, e, a, beta, *, delta, fit_gamma: bool, max_iter: int):
  """Fits row i of tau (and gamma) given domain i's self law. data (runs, n), loss_i, w (runs,)."""
  n = data.shape[1]
  valid = w > 0
  log_loss = jnp.log(jnp.where(valid, loss_i, 1.0))
  off = jnp.arange(n) != i
  x = jnp.maximum(data, 0.0)
  log_x = jnp.log(jnp.where(x > 0, x, 1.0))

  def residual(theta):
    tau = jnp.where(off, theta[:n], 0.0)
    xg = jnp.where(x > 0, jnp.exp(theta[n:] * log_x), 0.0) if fit_gamma else x  # static branch
    deff = x[:, i] + jnp.sum(xg * tau, axis=1)
    pred = e + a * jnp.exp(-beta * jnp.log(jnp.maximum(deff, 1e-300)))
    return jnp.where(valid, jnp.log(pred) - log_loss, 0.0)

  # Sources that never appear in these runs carry no information: hold their tau at 0.
  seen = jnp.any(valid[:, None] & (x > 0), axis=0) & off
  free_tau = seen
  p = 2 * n if fit_gamma else n
  lower = jnp.zeros(p).at[n:].set(GAMMA_BOUNDS[0]) if fit_gamma else jnp.zeros(p)
  upper = jnp.full(p, jnp.inf).at[n:].set(GAMMA_BOUNDS[1]) if fit_gamma else jnp.full(p, jnp.inf)
  free = jnp.concatenate([free_tau, free_tau]) if fit_gamma else free_tau

  def start(t0):
    tau0 = jnp.where(free_tau, t0, 0.0)
    return jnp.concatenate([tau0, jnp.ones(n)]) if fit_gamma else tau0

  theta0 = jnp.stack([start(jnp.asarray(t, data.dtype)) for t in TAU_STARTS])
  grid_loss = jax.vmap(lambda t: robust_loss(residual(t), w, delta))(theta0)
  _, keep = jax.lax.top_k(-jnp.where(jnp.isfinite(grid_loss), grid_loss, jnp.inf), REFINED_STARTS)
  solve = functools.partial(lm_minimise, residual, weights=w, delta=delta, lower=lower, upper=upper,
                            free=free, max_iter=max_iter)
  results = jax.vmap(solve)(theta0[keep])
  best = jnp.argmin(jnp.where(jnp.isfinite(results.loss), results.loss, jnp.inf))
  theta = results.theta[best]
  tau = jnp.where(off, theta[:n], 0.0)
  gamma = theta[n:] if fit_gamma else jnp.ones(n, data.dtype)
  return tau, gamma, results.converged[best] | ~jnp.any(valid)


def gather_rows(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(domains, runs) bool -> run indices (domains, k) and validity (domains, k), k = most runs of a domain.

  The fits then work on each domain's own runs only instead of all runs with zero weights.
  """
  k = max(1, int(mask.sum(1).max()))
  idx = np.zeros((mask.shape[0], k), np.int32)
  ok = np.zeros((mask.shape[0], k), bool)
  for i, row in enumerate(mask):
    runs = np.flatnonzero(row)
    idx[i, :runs.size], ok[i, :runs.size] = runs, True
  return idx, ok


def _fit_one(data, loss, self_idx, self_ok, tau_idx, tau_ok, e_fixed, e_prior, run_w, delta, fit_gamma, max_iter):
  """Self laws then tau rows for one vector of run weights; everything (domains, ...)."""
  n = data.shape[1]
  col = jnp.arange(n)[:, None]
  d = jnp.where(self_ok, data[self_idx, col], 1.0)
  self_loss = jnp.where(self_ok, loss[self_idx, col], 1.0)
  self_w = jnp.where(self_ok, run_w[self_idx], 0.0)
  laws = jax.vmap(lambda d_, l_, w_, e_, p_: powerlaw.fit_domain(d_, l_, w_, delta=delta, max_iter=max_iter,
                                                                 e_fixed=e_, e_prior=p_))(
      d, self_loss, self_w, e_fixed, e_prior)
  tau_loss = jnp.where(tau_ok, loss[tau_idx, col], 1.0)
  tau_w = jnp.where(tau_ok, run_w[tau_idx], 0.0)
  rows = jax.vmap(lambda i, x_, l_, w_, e, a, b: fit_tau_row(i, x_, l_, w_, e, a, b, delta=delta,
                                                             fit_gamma=fit_gamma, max_iter=max_iter))(
      jnp.arange(n), data[tau_idx], tau_loss, tau_w, laws["E"], laws["A"], laws["beta"])
  tau, gamma, tau_converged = rows
  return {"E": laws["E"], "A": laws["A"], "beta": laws["beta"], "tau": tau, "gamma": gamma,
          "converged": laws["converged"] & tau_converged}


@functools.partial(jax.jit, static_argnames=("fit_gamma", "max_iter"))
def _fit_resamples(data, loss, self_idx, self_ok, tau_idx, tau_ok, e_fixed, e_prior, run_weights, delta,
                   fit_gamma, max_iter):
  fit = functools.partial(_fit_one, data, loss, self_idx, self_ok, tau_idx, tau_ok, e_fixed, e_prior, delta=delta,
                          fit_gamma=fit_gamma, max_iter=max_iter)
  return jax.vmap(fit)(run_weights)


@x64
def fit_scaling(arrays: MeasurementArrays, *, n_bootstrap: int = 200, seed: int = 0,
                delta: float = powerlaw.DEFAULT_DELTA, source: str = "all", fit_gamma: bool = False,
                ci: float = 0.95, max_iter: int = 100, e_mode=None, return_samples: bool = False):
  """Fits self laws and transfer from measurements; bootstrap percentile intervals over runs.

  e_mode: the floor E, fitted (None / 'free'), 'none' (E = 0, the paper's pure power law), fixed numbers
  (see powerlaw.e_fixed_array), powerlaw.EPrior(MU, SD) (fitted with a Gaussian prior; its weight in the
  objective is in powerlaw's docstring) or 'auto' (free per domain where its points identify it, else 0: auto_floor;
  the choices and reasons in extra['E_auto']). extra['self_law_support'] says per domain whether the loss
  falls with data beyond its scatter, and the self law's RMS log residual at its points. Diagnostics in extra:
  converged, bootstrap_dropped (resamples left out because a fit did not converge), e_beta_correlation (per
  domain, over resamples; None where E is fixed).
  return_samples: also return the converged resamples' parameters {E, A, beta, tau, gamma: (R, ...)}.
  """
  data, loss = arrays.data, arrays.loss
  self_mask, tau_mask = point_masks(data, loss, source)
  auto = None
  if isinstance(e_mode, str) and e_mode == "auto":
    auto = auto_floor(arrays, delta=delta, source=source, max_iter=max_iter)
    e_mode = np.array([np.nan if a["E"] == "free" else 0.0 for a in auto])
  e_fixed = powerlaw.e_fixed_array(e_mode, len(arrays.domains))
  e_prior = powerlaw.e_prior_array(e_mode, len(arrays.domains))
  for i, name in enumerate(arrays.domains):
    sizes = np.unique(data[self_mask[i], i])
    need = 3 if np.isnan(e_fixed[i]) else 2
    if sizes.size < need:
      raise SolverError(f"domain {name!r}: {sizes.size} distinct data size(s) in runs on {name!r} alone; "
                        f"the self law needs at least {need}")
  if not tau_mask.any():
    raise SolverError(f"no runs with data from another domain (source={source!r}); cannot fit transfer")
  runs = data.shape[0]
  rng = np.random.default_rng(seed)
  weights = np.concatenate([np.ones((1, runs)),
                            rng.multinomial(runs, np.full(runs, 1.0 / runs), size=n_bootstrap)]).astype(float)
  gathered = [jnp.asarray(a) for a in (*gather_rows(self_mask), *gather_rows(tau_mask))]
  out = _fit_resamples(jnp.asarray(data), jnp.asarray(np.where(np.isfinite(loss), loss, 1.0)), *gathered,
                       jnp.asarray(e_fixed), jnp.asarray(e_prior), jnp.asarray(weights), delta, fit_gamma, max_iter)
  out = {k: np.asarray(v) for k, v in out.items()}
  point = {k: v[0] for k, v in out.items()}
  law = Law(E=point["E"], A=point["A"], beta=point["beta"], tau=point["tau"], gamma=point["gamma"])
  extra = {"huber_delta": delta, "transfer_source": source, "fit_gamma": fit_gamma,
           "converged": bool(point["converged"].all()), "n_bootstrap": n_bootstrap, "ci_level": ci,
           "E_mode": "free" if np.isnan(e_fixed).all() else [None if np.isnan(v) else float(v) for v in e_fixed],
           "domains_not_converged": [d for d, c in zip(arrays.domains, point["converged"]) if not c]}
  if isinstance(e_mode, powerlaw.EPrior):
    extra["E_mode"] = {"prior": {"mu": e_prior[:, 0].tolist(), "sd": e_prior[:, 1].tolist()}}
  support = self_law_support(arrays, source)
  for i, s in enumerate(support):  # the self law's log residuals at its own points
    if s["sizes"]:
      d, y = data[self_mask[i], i], loss[self_mask[i], i]
      s["rms_log_residual"] = float(np.sqrt(np.mean((np.log(law.E[i] + law.A[i] * d ** -law.beta[i]) -
                                                     np.log(y)) ** 2)))
  extra["self_law_support"] = support
  if auto is not None:
    extra["E_mode"] = "auto"
    extra["E_auto"] = auto
  boot = None
  if n_bootstrap > 0:
    q = [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100]
    # Resamples whose fits did not converge (e.g. a domain left with too few sizes) are left out.
    ok = out["converged"][1:].all(axis=1)
    if not ok.any():
      raise SolverError("no bootstrap resample converged; too few runs to resample")
    boot = {k: v[1:][ok] for k, v in out.items()}
    extra["ci"] = {k: np.moveaxis(np.percentile(boot[k], q, axis=0), 0, -1).tolist()
                   for k in ("E", "A", "beta", "tau") + (("gamma",) if fit_gamma else ())}
    extra["bootstrap_converged"] = float(ok.mean())
    extra["bootstrap_dropped"] = int((~ok).sum())
    extra["e_beta_correlation"] = [_correlation(boot["E"][:, i], boot["beta"][:, i]) for i in range(len(e_fixed))]
    extra["bands"] = self_law_bands(data, self_mask, boot, ci)
  fits = Fits(list(arrays.domains), law, arrays.available, extra)
  return (fits, boot) if return_samples else fits


def self_law_support(arrays: MeasurementArrays, source: str = "all") -> list[dict]:
  """Whether each domain's self-law points show a loss that falls with data beyond their scatter.

  Per domain, from its runs on that domain alone: the distinct sizes, the mean loss at each, the relative drop
  1 - L(largest size) / L(smallest size), and the least-squares slope of log L on log D with its standard error
  (residual scatter; None with only two sizes). `decreasing` = the slope is negative and, where an error is
  defined, more than two standard errors below 0. Points that are flat within their scatter cannot identify a
  floor E (E, A and beta then trade off along a valley and no optimiser converges).
  """
  data, loss = arrays.data, arrays.loss
  self_mask, _ = point_masks(data, loss, source)
  out = []
  for i in range(data.shape[1]):
    d, y = data[self_mask[i], i], loss[self_mask[i], i]
    sizes = np.unique(d)
    means = [float(np.mean(y[d == s])) for s in sizes]
    entry = {"sizes": sizes.tolist(), "mean_loss": means, "drop": None, "slope": None, "slope_se": None,
             "decreasing": False}
    if sizes.size >= 2:
      x, ly = np.log(d), np.log(y)
      xc = x - x.mean()
      slope = float(np.sum(xc * (ly - ly.mean())) / np.sum(xc ** 2))
      dof = d.size - 2
      se = None
      if dof > 0:
        resid = ly - ly.mean() - slope * xc
        se = float(np.sqrt(np.sum(resid ** 2) / dof / np.sum(xc ** 2)))
      entry.update(drop=1.0 - means[-1] / means[0], slope=slope, slope_se=se,
                   decreasing=bool(slope < 0 and (se is None or slope + 2 * se < 0)))
    out.append(entry)
  return out


def auto_floor(arrays: MeasurementArrays, *, delta: float = powerlaw.DEFAULT_DELTA, source: str = "all",
               max_iter: int = 100) -> list[dict]:
  """Per domain, whether its floor E can be fitted: {'E': 'free' | 'none', 'reason': str}.

  Free where the free-E fit converges on the points and they decrease beyond their scatter (self_law_support);
  else E = 0, the paper's pure power law L = A D^-beta, which two parameters identify from two sizes.
  """
  support = self_law_support(arrays, source)
  sizes = [len(s["sizes"]) for s in support]
  trial = fit_scaling(arrays, n_bootstrap=0, delta=delta, source=source, max_iter=max_iter,
                      e_mode=np.where(np.asarray(sizes) >= 3, np.nan, 0.0))
  converged = np.asarray([d not in trial.extra["domains_not_converged"] for d in arrays.domains])
  out = []
  for s, n, ok in zip(support, sizes, converged):
    if n < 3:
      out.append({"E": "none", "reason": f"{n} distinct size(s); a free floor needs 3"})
    elif not s["decreasing"]:
      se = "" if s["slope_se"] is None else f" +- {s['slope_se']:.2g}"
      out.append({"E": "none", "reason": f"loss does not fall with data beyond its scatter (drop "
                  f"{100 * s['drop']:.2f}%, log-log slope {s['slope']:.3g}{se})"})
    elif not ok:
      out.append({"E": "none", "reason": "the free-E fit did not converge (E, A, beta not identified)"})
    else:
      out.append({"E": "free", "reason": "decreasing and converged"})
  return out


def _correlation(a, b):
  """Pearson r of two samples, None when either is constant (e.g. a fixed E)."""
  if a.size < 3 or np.ptp(a) <= 1e-12 * max(np.abs(a).max(), 1e-300) or np.ptp(b) == 0:
    return None
  return float(np.corrcoef(a, b)[0, 1])


def self_law_bands(data, self_mask, boot: dict, ci: float, points: int = 40) -> dict:
  """Pointwise bootstrap bands of each self law L_i(D) on a log grid over (and a decade past) its data."""
  q = [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100]
  grids, lows, highs = [], [], []
  for i in range(data.shape[1]):
    sizes = data[self_mask[i], i]
    grid = np.geomspace(sizes.min(), sizes.max() * 10, points)
    curves = boot["E"][:, i, None] + boot["A"][:, i, None] * grid[None] ** (-boot["beta"][:, i, None])
    lo, hi = np.percentile(curves, q, axis=0)
    grids.append(grid.tolist()), lows.append(lo.tolist()), highs.append(hi.tolist())
  return {"d": grids, "lo": lows, "hi": highs}


def hub_island_scores(tau) -> tuple[np.ndarray, np.ndarray]:
  """Hub score of j: total transfer it gives, sum_{i != j} tau_ij. Island score of i: 1 / (1 + total
  transfer it receives, sum_{j != i} tau_ij), so 1 means it gains nothing from the other domains."""
  tau = np.asarray(tau, np.float64) * (1.0 - np.eye(len(tau)))
  return tau.sum(axis=0), 1.0 / (1.0 + tau.sum(axis=1))


def pearson_r(a, b) -> float:
  a, b = np.ravel(a), np.ravel(b)
  keep = np.isfinite(a) & np.isfinite(b)
  return float(np.corrcoef(a[keep], b[keep])[0, 1])
