"""Strategies judged on measured held-out loss: the numbers the paper reports, and how each is computed.

Inputs are measured losses L[s] (budgets, domains) per strategy s at the same budgets B_k. Conventions:

  per-domain gain    g_ki = 1 - L_ki^S / L_ki^base (S = the focus strategy, base = a baseline); positive = S
                     better. Headline: the largest per-domain gain averaged over budgets (the paper's "up to
                     58%" is most plausibly this), with its domain; mean: g averaged over domains and budgets.
  aggregate gain     1 - mean_i L_ki^S / mean_i L_ki^base, per budget (the gain in mean loss).
  reducible gain     the same with L - E_hat (E_hat: the fitted floors), i.e. on the part of the loss that data
                     can still remove; equal to the plain gain when E_hat = 0.
  budget multiplier  how much more budget the baseline needs to reach S's mean loss at B_k: the baseline's mean
                     loss is fitted as c B^-s over the budgets (least squares in log-log) and solved for
                     B' with c B'^-s = mean_i L_ki^S; multiplier = B' / B_k. A power-law fit rather than
                     interpolation, so noise does not make the inverse jump and S beyond the tested range still
                     gets a number (flagged when B' lies outside the tested budgets).
  slope (Fig. 4)     per strategy and domain, -d log L_i / d log B by least squares over >= 4 budgets; larger =
                     the domain's loss falls faster as the total budget grows.
  hub / island       from the fitted tau: the hub gives the most transfer (max_j sum_i tau_ij), the island
                     receives the least (max island score, transfer.hub_island_scores).
"""

from __future__ import annotations

import numpy as np

from m2dino_jax.errors import SolverError
from m2dino_jax.scaling import transfer

MIN_SLOPE_BUDGETS = 4


def log_slopes(budgets, loss) -> np.ndarray:
  """-slope of log L against log B, least squares; loss (..., budgets, domains) -> (..., domains)."""
  budgets = np.asarray(budgets, np.float64)
  if budgets.size < MIN_SLOPE_BUDGETS:
    raise SolverError(f"slopes need at least {MIN_SLOPE_BUDGETS} budgets, got {budgets.size}")
  u = np.log(budgets) - np.log(budgets).mean()
  y = np.log(np.asarray(loss, np.float64))
  return -np.einsum("k,...ki->...i", u, y - y.mean(axis=-2, keepdims=True)) / (u @ u)


def power_fit(budgets, values) -> tuple[float, float]:
  """(log c, s) of the least-squares line log v = log c - s log B."""
  s, log_c = np.polyfit(np.log(budgets), np.log(values), 1)
  return float(log_c), float(-s)


def budget_multiplier(budgets, base_mean, target_mean) -> tuple[np.ndarray, np.ndarray]:
  """B'/B_k with B' the budget at which the baseline's power-law fit reaches target_mean[k]; and whether B'
  lies inside the tested budgets (else it is an extrapolation of the baseline's curve)."""
  budgets = np.asarray(budgets, np.float64)
  log_c, s = power_fit(budgets, base_mean)
  if not s > 0:
    raise SolverError(f"the baseline's mean loss does not fall with the budget (slope {-s:.3g})")
  b_needed = np.exp((log_c - np.log(np.asarray(target_mean, np.float64))) / s)
  inside = (b_needed >= budgets.min() * (1 - 1e-12)) & (b_needed <= budgets.max() * (1 + 1e-12))
  return b_needed / budgets, inside


def gains(loss, base, floor=None) -> dict:
  """Gain of `loss` over `base` (both (budgets, domains)); floor E_hat (domains,) for the reducible version."""
  loss, base = np.asarray(loss, np.float64), np.asarray(base, np.float64)
  out = {}
  for key, shift in (("", 0.0), ("reducible_", None if floor is None else np.asarray(floor, np.float64))):
    if shift is None:
      continue
    a, b = loss - shift, base - shift
    per = 1.0 - a / b
    per_domain = per.mean(axis=0)
    out[key + "per_domain"] = per                     # (budgets, domains)
    out[key + "per_domain_mean"] = per_domain         # (domains,), averaged over budgets
    out[key + "headline_max"] = float(per_domain.max())
    out[key + "headline_domain"] = int(per_domain.argmax())
    out[key + "mean"] = float(per.mean())
    out[key + "aggregate"] = 1.0 - a.mean(axis=1) / b.mean(axis=1)  # (budgets,)
  return out


# Below this, every fitted transfer is indistinguishable from none (the no-transfer control of the six-domain
# study fits max tau ~0.03 at 1% noise): hub and island are then argmaxes of noise and are not named.
TAU_NEGLIGIBLE = 0.05


def hub_and_island(tau, domains, negligible: float = TAU_NEGLIGIBLE) -> dict:
  """Hub and island of the fitted tau; 'negligible' (all off-diagonal |tau| < `negligible`) says that the names
  carry no meaning (the report then says "no hub/island: transfer ~0")."""
  hub, island = transfer.hub_island_scores(tau)
  off = np.abs(np.asarray(tau, np.float64) * (1.0 - np.eye(len(tau))))
  return {"hub": domains[int(hub.argmax())], "island": domains[int(island.argmax())],
          "hub_score": hub.tolist(), "island_score": island.tolist(), "max_tau": float(off.max()),
          "negligible": bool(off.max() < negligible), "negligible_below": negligible}


def summarise(budgets, losses: dict, domains, *, tau=None, floor_hat=None, focus: str = "transfer_aware",
              baseline: str = "data_proportional") -> dict:
  """The comparison report as plain Python (JSON-ready): gains of `focus` over every other strategy, the
  multiplier over `baseline`, slopes per strategy, hub and island."""
  budgets = np.asarray(budgets, np.float64)
  if focus not in losses:
    raise SolverError(f"strategy {focus!r} has no measured losses; have {sorted(losses)}")
  report = {"budgets": budgets.tolist(), "domains": list(domains), "focus": focus, "baseline": baseline,
            "mean_loss": {s: np.mean(v, axis=1).tolist() for s, v in losses.items()},
            "loss": {s: np.asarray(v).tolist() for s, v in losses.items()}, "vs": {}}
  for other, base in losses.items():
    if other == focus:
      continue
    g = gains(losses[focus], base, floor_hat)
    g["headline_domain"] = domains[g["headline_domain"]]
    if "reducible_headline_domain" in g:
      g["reducible_headline_domain"] = domains[g["reducible_headline_domain"]]
    mult, inside = budget_multiplier(budgets, np.mean(base, axis=1), np.mean(losses[focus], axis=1))
    g["budget_multiplier"], g["multiplier_in_range"] = mult, inside
    g["beats_at_every_budget"] = bool((g["aggregate"] > 0).all())
    report["vs"][other] = _jsonable(g)
  if budgets.size >= MIN_SLOPE_BUDGETS:
    report["slopes"] = {s: log_slopes(budgets, v).tolist() for s, v in losses.items()}
  if tau is not None:
    report["transfer"] = hub_and_island(tau, list(domains))
  return report


def floor_sweep(allocate_fn, measure_fn, budgets, floors) -> dict:
  """Fig. 5 analogue: for each floor f, counts = allocate_fn(budgets, f) (budgets, domains) and the measured
  loss measure_fn(counts); reports shares, the measured mean loss (over budgets and domains) and its argmin."""
  shares, mean_loss = [], []
  for f in floors:
    counts = allocate_fn(budgets, f)
    shares.append(counts / counts.sum(axis=1, keepdims=True))
    mean_loss.append(float(np.mean(measure_fn(counts))))
  best = int(np.argmin(mean_loss))
  return {"floors": [float(f) for f in floors], "shares": np.array(shares).tolist(), "mean_loss": mean_loss,
          "best_floor": float(floors[best])}


def _jsonable(obj):
  if isinstance(obj, dict):
    return {k: _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, np.generic):
    return obj.item()
  return obj
