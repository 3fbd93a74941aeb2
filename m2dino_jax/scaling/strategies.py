"""Data-allocation strategies compared by the scaling study, each giving counts x (budgets, domains).

  transfer_aware     the allocator (allocate.py) on the fitted law, per-domain floor
  transfer_blind     the same allocator with tau = 0: knows each domain's own law but not the transfer, so a
                     gain of transfer_aware over it is the gain of knowing the transfer
  data_proportional  x_i = B N_i / sum N (the paper's baseline)
  uniform            x_i = B / n
  temperature        x_i ~ B N_i^(1/T) / sum N^(1/T)  (T = 1: data-proportional; T -> inf: uniform)

The three heuristics ignore the floor (they are the baselines as usually run) but never exceed the data a
domain has: a share over N_i is capped there and the excess is handed to the uncapped domains in proportion
to their shares (water-filling), so the counts always sum to B.
"""

from __future__ import annotations

import numpy as np

from m2dino_jax.errors import ConfigError, SolverError
from m2dino_jax.scaling import allocate
from m2dino_jax.scaling.law import Law

STRATEGIES = ("transfer_aware", "data_proportional", "uniform", "temperature", "transfer_blind")
DEFAULT_TEMPERATURE = 3.0


def capped_counts(budget: float, shares, available) -> np.ndarray:
  """Counts B * shares, capped at `available`, the excess redistributed over the uncapped domains by share."""
  shares = np.asarray(shares, np.float64) / np.sum(shares)
  available = np.asarray(available, np.float64)
  if budget > available.sum() * (1 + 1e-12):
    raise SolverError(f"budget {budget:g} exceeds the total data available {available.sum():g}")
  x = np.zeros_like(shares)
  capped = np.zeros(shares.shape, bool)
  for _ in range(shares.size):
    rest = budget - available[capped].sum()
    free = ~capped
    x = np.where(capped, available, rest * shares * free / max(shares[free].sum(), 1e-300))
    over = free & (x > available)
    if not over.any():
      break
    capped |= over
  return x


def heuristic_shares(name: str, available, temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
  available = np.asarray(available, np.float64)
  if name == "data_proportional":
    return available / available.sum()
  if name == "uniform":
    return np.full(available.size, 1.0 / available.size)
  if name == "temperature":
    if not temperature > 0:
      raise ConfigError("temperature", f"must be > 0, got {temperature}")
    p = available ** (1.0 / temperature)
    return p / p.sum()
  raise ConfigError("strategy", f"unknown strategy {name!r}; known: {list(STRATEGIES)}")


def strategy_counts(name: str, law: Law, budgets, available, *, floor: float = allocate.DEFAULT_FLOOR,
                    temperature: float = DEFAULT_TEMPERATURE, names=None) -> np.ndarray:
  """Counts (budgets, domains) of one strategy; `law` is the fitted law (used by the two allocators)."""
  budgets = np.atleast_1d(np.asarray(budgets, np.float64))
  available = np.asarray(available, np.float64)
  if name in ("transfer_aware", "transfer_blind"):
    if name == "transfer_blind":
      law = law._replace(tau=np.zeros_like(np.asarray(law.tau)))
    result = allocate.allocate(law, budgets, available, floor=floor, names=names)
    if not result["converged"].all():
      raise SolverError(f"{name}: allocation did not converge (pg norm {result['pg_norm'].max():.3g})")
    return result["counts"]
  shares = heuristic_shares(name, available, temperature)
  return np.stack([capped_counts(float(b), shares, available) for b in budgets])


def all_counts(law: Law, budgets, available, *, strategies=STRATEGIES, floor: float = allocate.DEFAULT_FLOOR,
               temperature: float = DEFAULT_TEMPERATURE, names=None) -> dict[str, np.ndarray]:
  return {s: strategy_counts(s, law, budgets, available, floor=floor, temperature=temperature, names=names)
          for s in strategies}


def allocation_file(domains, name: str, budget: float, counts, *, floor: float, extra=None) -> dict:
  """An allocation.json object for one strategy at one budget; the data layer reads its 'weights'."""
  counts = np.asarray(counts, np.float64)
  return {"strategy": name, "budget": float(budget), "floor": float(floor) if "transfer" in name else 0.0,
          "weights": {d: float(c / counts.sum()) for d, c in zip(domains, counts)},
          "counts": {d: float(c) for d, c in zip(domains, counts)}, **(extra or {})}
