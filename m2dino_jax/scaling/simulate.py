"""Planted-truth measurements: "pretrain" by a known law plus multiplicative noise.

Lets every part of the scaling pipeline run end to end without a real pretraining: generate rows from
known (E, A, beta, tau), fit them, allocate, "train" the allocated mixture by the same law, and compare
measured with predicted. Noise is log-normal: measured = true * exp(noise * N(0, 1)), so `noise` is the
relative standard deviation of the loss (0.005 = 0.5%).
"""

from __future__ import annotations

import numpy as np

from m2dino_jax.scaling.law import Law, predict_loss
from m2dino_jax.scaling.measurements import Measurement

# A hub-and-island example: CT helps the others a lot (hub), PET receives little (island).
PLANTED_DOMAINS = ("ct", "mri", "pet")
# The noise level at which the acceptance numbers hold (0.15% relative loss noise, 16 sizes over 3.6 decades):
# beta within 1%, tau within 5%.
PLANTED_NOISE = 0.0015


def planted_law() -> tuple[Law, np.ndarray]:
  """The default planted truth and data available per domain."""
  tau = np.array([[0.0, 0.30, 0.10],
                  [0.60, 0.0, 0.15],
                  [0.25, 0.12, 0.0]])
  law = Law(E=np.array([0.30, 0.40, 0.50]), A=np.array([8.0, 6.0, 10.0]), beta=np.array([0.35, 0.30, 0.45]),
            tau=tau, gamma=np.ones((3, 3)))
  return law, np.array([1e6, 6e5, 4e5])


def random_law(n: int, rng: np.random.Generator) -> Law:
  """A random plausible law for n domains (for solver tests and benchmarks)."""
  tau = rng.uniform(0.0, 0.8, (n, n)) * (rng.uniform(size=(n, n)) < 0.8)
  np.fill_diagonal(tau, 0.0)
  return Law(E=rng.uniform(0.1, 1.0, n), A=rng.uniform(1.0, 20.0, n), beta=rng.uniform(0.15, 0.8, n),
             tau=tau, gamma=np.ones((n, n)))


def measure(law: Law, x, noise: float, rng: np.random.Generator) -> np.ndarray:
  """Loss per domain of runs that trained on counts x (..., n), with relative noise (inf where D_eff = 0)."""
  with np.errstate(divide="ignore"):
    true = np.asarray(predict_loss(law, np.asarray(x, np.float64), xp=np), np.float64)
  return true * np.exp(noise * rng.standard_normal(true.shape))


def _row(run_id, domains, x, loss, step, available, *, budget=None, strategy="") -> Measurement:
  """One measurements row. A target the run cannot inform (infinite loss under the law: no own data and no
  transfer into it) is left out of 'loss', which is what a real single-source run should record for a target
  that gains nothing: the law has no finite value for it, and a fit then holds that tau at 0."""
  total = float(np.sum(x))
  return Measurement(run_id=run_id, data={d: float(v) for d, v in zip(domains, x)},
                     budget=total if budget is None else float(budget), step=step,
                     loss={d: float(v) for d, v in zip(domains, loss) if np.isfinite(v)},
                     weights={d: float(v / total) for d, v in zip(domains, x)},
                     available={d: float(v) for d, v in zip(domains, available)} if available is not None
                     else {}, strategy=strategy)


def strategy_runs(domains, budgets, counts: dict, losses: dict, *, available=None, step: int = 1000,
                  repeat: int = 0) -> list[Measurement]:
  """Rows of runs that trained on strategies' allocations: counts[s] (budgets, domains) at `budgets`, with
  measured losses[s] (budgets, domains); 'strategy' and 'budget' (the allocation's total) name the group
  `compare --measurements` evaluates."""
  return [_row(f"{s}-{b:.0f}-r{repeat}", domains, counts[s][k], losses[s][k], step, available, budget=b,
               strategy=s)
          for s in counts for k, b in enumerate(np.asarray(budgets, np.float64))]


def single_source_runs(law: Law, domains, sizes, *, noise: float, seed: int = 0, repeats: int = 1,
                       available=None, step: int = 1000) -> list[Measurement]:
  """Runs trained on one domain j at each size, evaluated on every domain (self law + tau from j)."""
  rng = np.random.default_rng(seed)
  n = len(domains)
  rows = []
  for j, src in enumerate(domains):
    for size in sizes:
      for rep in range(repeats):
        x = np.zeros(n)
        x[j] = size
        rows.append(_row(f"single-{src}-{int(size)}-r{rep}", domains, x, measure(law, x, noise, rng), step,
                         available))
  return rows


def mixture_runs(law: Law, domains, budgets, *, per_budget: int, noise: float, seed: int = 1,
                 available=None, step: int = 1000, prefix: str = "mix") -> list[Measurement]:
  """Runs on random Dirichlet mixtures at each budget, evaluated on every domain."""
  rng = np.random.default_rng(seed)
  rows = []
  for budget in budgets:
    for k in range(per_budget):
      w = rng.dirichlet(np.full(len(domains), 2.0))
      x = w * budget
      rows.append(_row(f"{prefix}-{int(budget)}-{k}", domains, x, measure(law, x, noise, rng), step,
                       available))
  return rows


def planted_measurements(*, noise: float = PLANTED_NOISE, seed: int = 0, sizes=None, mixture_budgets=(2e4, 8e4),
                         per_budget: int = 4) -> tuple[list[Measurement], Law, np.ndarray]:
  """The default planted study: single-source sweeps on every domain plus a few mixture runs."""
  law, available = planted_law()
  sizes = np.geomspace(1e2, 4e5, 16) if sizes is None else sizes
  rows = single_source_runs(law, PLANTED_DOMAINS, sizes, noise=noise, seed=seed, available=available)
  rows += mixture_runs(law, PLANTED_DOMAINS, mixture_budgets, per_budget=per_budget, noise=noise,
                       seed=seed + 1, available=available)
  return rows, law, available


def law_measurements(planted, *, seed: int = 0, noise: float | None = None) -> list[Measurement]:
  """The study a law file's design asks for (lawfile.PlantedLaw): per domain, a single-source sweep of
  `design.sizes` log-spaced sizes from min_size to min(max_size, available), then `per_budget` Dirichlet
  mixtures at each mixture budget (capped at availability). Every row states the availability."""
  design, domains = planted.design, planted.domains
  noise = planted.noise if noise is None else noise
  rng = np.random.default_rng(seed)
  n = len(domains)
  rows = []
  for j, src in enumerate(domains):
    top = min(design.max_size, planted.available[j])
    for size in np.geomspace(min(design.min_size, top / 10), top, design.sizes):
      x = np.zeros(n)
      x[j] = size
      rows.append(_row(f"single-{src}-{size:.0f}", domains, x, measure(planted.law, x, noise, rng), 1000,
                       planted.available))
  for budget in design.mixture_budgets:
    for k in range(design.per_budget):
      x = np.minimum(rng.dirichlet(np.full(n, 2.0)) * budget, planted.available)
      rows.append(_row(f"mix-{budget:.0f}-{k}", domains, x, measure(planted.law, x, noise, rng), 1000,
                       planted.available))
  return rows
