"""The planted-truth study behind `m2dino scaling compare`: simulate, fit, allocate by every strategy, measure.

  1. rows from the law file's design (simulate.law_measurements), fitted (transfer.fit_scaling);
  2. each strategy (strategies.py) allocates every budget from the *fitted* law; the allocations are
     "trained" by the *true* law with the file's noise (a fresh draw per strategy, budget and domain), which
     plays the measured held-out loss; compare.summarise turns them into gains, multipliers and slopes;
  3. the floor sweep (Fig. 5) re-allocates transfer-aware at each floor and measures it the same way;
  4. extrapolation: fit on runs up to B_max only, predict fresh mixtures at 0.25-1 x B_max (in range) and at
     2-10 x B_max (extrapolated), and report r and MAPE per domain and pooled (bootstrap intervals over the
     fit's resamples), for the law with a free floor E and for the pure power law (E = 0); the one with the
     lower extrapolated pooled MAPE is chosen.
The truth may differ from the fitted family (gamma != 1 in the law file), so misspecification shows up as
extrapolation error and as measured losses that the fitted law did not predict.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from m2dino_jax.errors import DataError
from m2dino_jax.scaling import compare, measurements, simulate, strategies, transfer
from m2dino_jax.scaling.law import Law, predict_loss
from m2dino_jax.scaling.lawfile import PlantedLaw

FLOORS = (0.025, 0.05, 0.075, 0.10, 0.125)
EXTRAPOLATION_FACTORS = (2.0, 3.0, 5.0, 10.0)
IN_RANGE_FACTORS = (0.25, 0.5, 1.0)
E_MODES = ("free", "none")


def _law_numpy(law: Law) -> Law:
  return Law(*(np.asarray(a, np.float64) for a in law))


def fit_rows(rows, *, n_bootstrap: int, seed: int, e_mode=None, return_samples=False):
  return transfer.fit_scaling(measurements.to_arrays(rows), n_bootstrap=n_bootstrap, seed=seed, e_mode=e_mode,
                              return_samples=return_samples)


def compare_report(budgets, counts: dict, losses: dict, fits, domains) -> dict:
  """The comparison report of both paths (planted truth, measured rows): gains, multipliers, slopes and hub /
  island (compare.summarise on the fitted tau and E), the fitted law's prediction of the measured losses, and
  each strategy's shares. counts, losses: {strategy: (budgets, domains)}."""
  fitted = _law_numpy(fits.law)
  report = compare.summarise(budgets, losses, domains, tau=fitted.tau, floor_hat=fitted.E)
  pred = np.stack([np.asarray(predict_loss(fitted, c, xp=np)) for c in counts.values()])
  meas = np.stack([losses[s] for s in counts])
  report["prediction"] = {"pooled_r": transfer.pearson_r(pred, meas),
                          "per_domain_r": [transfer.pearson_r(pred[..., i], meas[..., i])
                                           for i in range(len(domains))]}
  report["shares"] = {s: (c / c.sum(axis=1, keepdims=True)).tolist() for s, c in counts.items()}
  return report


def run_compare(planted: PlantedLaw, budgets, *, seed: int = 0, n_bootstrap: int = 64, e_mode=None,
                temperature: float = strategies.DEFAULT_TEMPERATURE, floors=FLOORS,
                strategy_names=strategies.STRATEGIES, rows_out: list | None = None) -> tuple[dict, dict]:
  """Steps 1-3 above; returns (report, counts per strategy). rows_out: a list that receives the study's rows
  (the fitted design runs, then one row per strategy and budget with its measured loss) in the format that
  compare_from_rows reads."""
  budgets = np.asarray(budgets, np.float64)
  rows = simulate.law_measurements(planted, seed=seed)
  fits = fit_rows(rows, n_bootstrap=n_bootstrap, seed=seed, e_mode=e_mode)
  fitted = _law_numpy(fits.law)
  counts = strategies.all_counts(fitted, budgets, planted.available, strategies=strategy_names,
                                 floor=planted.floor, temperature=temperature, names=planted.domains)
  rng = np.random.default_rng(seed + 7919)
  measure = lambda c: simulate.measure(planted.law, c, planted.noise, rng)
  losses = {s: measure(c) for s, c in counts.items()}
  report = compare_report(budgets, counts, losses, fits, planted.domains)
  report.update(source="planted", temperature=temperature, floor=planted.floor, noise=planted.noise,
                law=planted.source, fit=fit_summary(fits, planted), rows=len(rows))
  if rows_out is not None:
    rows_out.extend(rows + simulate.strategy_runs(planted.domains, budgets, counts, losses,
                                                  available=planted.available))
  if floors:
    alloc = lambda b, f: strategies.strategy_counts("transfer_aware", fitted, b, planted.available, floor=f,
                                                    names=planted.domains)
    report["floor_sweep"] = compare.floor_sweep(alloc, measure, budgets, floors)
  return report, counts


def compare_from_rows(rows, *, path="<rows>", n_bootstrap: int = 64, seed: int = 0, e_mode=None) -> dict:
  """The comparison on measured rows (measurements.py): the law is fitted on the rows without 'strategy', and
  each strategy's measured loss at each budget is the mean over its runs (last steps) with that 'strategy' and
  'budget'. Every strategy needs runs at the same budgets, and every run a loss on every domain. The report is
  compare_report's, as on the planted path; there is no floor sweep (it needs runs per floor)."""
  final = measurements.last_steps(rows)
  design = [r for r in final if not r.strategy]
  runs = [r for r in final if r.strategy]
  if not runs:
    raise DataError(path, "no rows with 'strategy': nothing to compare (see m2dino_jax/scaling/measurements.py)")
  if not design:
    raise DataError(path, "no rows without 'strategy': the law is fitted on the study's design runs")
  domains = list(design[0].data)
  fits = transfer.fit_scaling(measurements.to_arrays(design, domains), n_bootstrap=n_bootstrap, seed=seed,
                              e_mode=e_mode)
  groups: dict[tuple[str, float], list] = {}
  for r in runs:
    missing = [d for d in domains if d not in r.loss]
    if missing:
      raise DataError(path, f"run {r.run_id!r} (strategy {r.strategy!r}) has no loss for {missing}; a strategy "
                      "run is evaluated on every domain")
    groups.setdefault((r.strategy, r.budget), []).append(r)
  names = list(dict.fromkeys(r.strategy for r in runs))
  budgets = np.array(sorted({r.budget for r in runs}), np.float64)
  counts, losses = {}, {}
  for s in names:
    lacking = [float(b) for b in budgets if (s, b) not in groups]
    if lacking:
      raise DataError(path, f"strategy {s!r} has no run at budget(s) {lacking}; every strategy needs runs at "
                      f"the same budgets {budgets.tolist()}")
    counts[s] = np.array([np.mean([[r.data[d] for d in domains] for r in groups[s, b]], axis=0) for b in budgets])
    losses[s] = np.array([np.mean([[r.loss[d] for d in domains] for r in groups[s, b]], axis=0) for b in budgets])
  report = compare_report(budgets, counts, losses, fits, domains)
  report.update(source="measurements", temperature=None, floor=None, noise=None, law=str(path),
                fit=fit_summary(fits), rows=len(design), strategy_runs=len(runs))
  return report


def fit_summary(fits, planted: PlantedLaw | None = None) -> dict:
  law = _law_numpy(fits.law)
  out = {"E": law.E.tolist(), "A": law.A.tolist(), "beta": law.beta.tolist(), "tau": law.tau.tolist(),
         **{k: fits.extra.get(k) for k in ("converged", "n_bootstrap", "bootstrap_dropped", "e_beta_correlation",
                                           "E_mode", "domains_not_converged", "E_auto", "self_law_support")}}
  if planted is not None:
    out["true_beta"] = np.asarray(planted.law.beta).tolist()
    out["true_tau"] = np.asarray(planted.law.tau).tolist()
  return out


def _metrics(pred, meas) -> dict:
  """r and MAPE (mean |pred - meas| / meas) pooled and per domain; pred, meas (runs, domains), NaN = missing."""
  ok = np.isfinite(meas) & np.isfinite(pred)
  ape = np.where(ok, np.abs(pred - meas) / np.where(ok, meas, 1.0), np.nan)
  n = meas.shape[1]
  return {"pooled_r": transfer.pearson_r(pred, meas), "pooled_mape": float(np.nanmean(ape)),
          "per_domain_r": [transfer.pearson_r(pred[:, i], meas[:, i]) for i in range(n)],
          "per_domain_mape": [float(np.nanmean(ape[:, i])) for i in range(n)]}


def _interval(values, ci=0.95) -> list:
  values = np.asarray(values, np.float64)
  return np.percentile(values, [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100], axis=0).tolist()


def run_extrapolation(planted: PlantedLaw, b_max: float, *, factors=EXTRAPOLATION_FACTORS,
                      in_range_factors=IN_RANGE_FACTORS, seed: int = 0, n_bootstrap: int = 64, e_modes=E_MODES,
                      per_budget: int = 6) -> dict:
  """Step 4 above. Training: the law's design with single-source sizes and mixture budgets <= b_max.
  Evaluated: `per_budget` fresh Dirichlet mixtures at each of in_range_factors (<= 1) and factors (> 1) x b_max
  (capped at availability), so in-range and extrapolated errors are measured on the same kind of run."""
  design = planted.design
  train_design = dataclasses.replace(design, max_size=min(design.max_size, b_max),
                                     mixture_budgets=tuple(b for b in design.mixture_budgets if b <= b_max))
  train = simulate.law_measurements(dataclasses.replace(planted, design=train_design), seed=seed)
  all_factors = np.array(list(in_range_factors) + list(factors), np.float64)
  rng = np.random.default_rng(seed + 31)
  n = len(planted.domains)
  x = np.concatenate([np.minimum(rng.dirichlet(np.full(n, 2.0), per_budget) * f * b_max, planted.available)
                      for f in all_factors])
  factor = np.repeat(all_factors, per_budget)
  measured = simulate.measure(planted.law, x, planted.noise, rng)
  out = {"b_max": float(b_max), "factors": all_factors.tolist(), "runs_per_factor": per_budget,
         "train_runs": len(train), "budget": x.sum(1).tolist(), "measured": measured.tolist(), "laws": {}}
  inside = factor <= 1.0
  for mode in e_modes:
    fits, boot = fit_rows(train, n_bootstrap=n_bootstrap, seed=seed, e_mode=mode, return_samples=True)
    law = _law_numpy(fits.law)
    pred = np.asarray(predict_loss(law, x, xp=np))
    entry = {"fit": fit_summary(fits), "predicted": pred.tolist(),
             "in_range": _metrics(pred[inside], measured[inside]),
             "held_out": _metrics(pred[~inside], measured[~inside]),
             "mape_by_factor": [float(np.mean(np.abs(pred[factor == f] / measured[factor == f] - 1)))
                                for f in all_factors]}
    if boot is not None and len(boot["E"]):
      samples = [_metrics(np.asarray(predict_loss(Law(*(boot[k][r] for k in Law._fields)), x[~inside], xp=np)),
                          measured[~inside]) for r in range(len(boot["E"]))]
      entry["held_out_ci"] = {key: _interval([s[key] for s in samples])
                              for key in ("pooled_r", "pooled_mape", "per_domain_r", "per_domain_mape")}
    out["laws"][mode] = entry
  out["chosen"] = min(out["laws"], key=lambda m: out["laws"][m]["held_out"]["pooled_mape"])
  return out
