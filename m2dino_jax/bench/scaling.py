"""Scaling laws: vmapped JAX allocator and bootstrap fits vs loops of scipy SLSQP / least_squares.

Two comparisons, each at equal answers (the table reports the largest disagreement):
  allocate  P random allocation problems in one jitted vmapped call vs a loop of multi-start SLSQP;
  fit       R bootstrap resamples x n domains of power-law fits in one call vs a loop of least_squares(trf);
  fit+transfer  R bootstrap resamples of the whole planted study (self laws, then tau rows) likewise;
  compare   the six-domain study: every bootstrap resample's fitted law x all 5 strategies x every budget
            (count = converged resamples x 5 x budgets). The two allocator strategies (transfer-aware,
            transfer-blind) are solved in one call vs a loop of SLSQP (median of >= 3 interleaved rounds); the
            three heuristics are closed form, run by the same numpy code in both columns and timed in both.
            Ratios raw and with compile; allocator-only ratios too (max_rel_diff on the objective).
Compile time is reported separately from the steady-state time of the compiled call. max_rel_diff is,
per task: the objective against SLSQP's; A and beta against least_squares' (E may sit on its bound 0);
tau against the scipy loop's point estimate.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from m2dino_jax.bench import common
from m2dino_jax.scaling import allocate, measurements, powerlaw, reference, simulate, transfer
from m2dino_jax.scaling.law import Law, predict_loss

SMOKE = {"problems": 16, "domains": 3, "slsqp_starts": 1, "resamples": 8, "points": 8, "compare_resamples": 2,
         "tasks": "allocate,fit",
         "compare_budgets": 2, "repeats": 2, "reference_repeats": 1}


def add_args(p) -> None:
  p.add_argument("--problems", type=int, default=1000, help="allocation problems")
  p.add_argument("--domains", type=int, default=4, help="domains per problem / fit")
  p.add_argument("--slsqp-starts", type=int, default=3,
                 help="SLSQP starts per problem (multi-start, as in our REFERENCE recipe)")
  p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
  p.add_argument("--points", type=int, default=12, help="data sizes per domain in the fit")
  p.add_argument("--compare-resamples", type=int, default=200, help="bootstrap resamples in the compare task")
  p.add_argument("--compare-budgets", type=int, default=8, help="budgets in the compare task (5e3 to 4e4)")
  p.add_argument("--reference-repeats", type=int, default=3,
                 help="compare task: interleaved rounds of the JAX call and the scipy loop (medians reported)")
  p.add_argument("--tasks", default="allocate,fit,transfer,compare", help="which comparisons to run")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats of each compiled call")
  p.add_argument("--seed", type=int, default=0, help="random seed of the planted problems")


def _problems(rng, count: int, n: int):
  return [p[:4] for p in allocate.random_problems(rng, count, n)]  # equal importance weights here


def _timed_jax(fn, repeats: int) -> dict:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  stats = common.time_fn(lambda: jax.block_until_ready(fn()), warmup=0, repeats=repeats)
  return {"compile_s": max(first - stats["median_s"], 0.0), "jax_s": stats["median_s"]}


def bench_allocate(args) -> dict:
  rng = np.random.default_rng(args.seed)
  problems = _problems(rng, args.problems, args.domains)
  with jax.enable_x64(True):
    stack = lambda xs: jnp.asarray(np.array(xs))
    laws = Law(*(stack([np.asarray(p[0][f]) for p in problems]) for f in range(len(Law._fields))))
    batch = allocate.Problem(laws, stack([p[1] for p in problems]), stack([p[2] for p in problems]),
                             stack([p[3] for p in problems]), jnp.ones((len(problems), args.domains)))
    timing = _timed_jax(lambda: allocate.solve_batch(batch, allocate.DEFAULT_TOL), args.repeats)
    sol = jax.tree.map(np.asarray, allocate.solve_batch(batch, allocate.DEFAULT_TOL))
  t0 = time.perf_counter()
  ref = [reference.allocate_slsqp(law, b, lo * b, hi * b, starts=args.slsqp_starts, seed=k)
         for k, (law, b, lo, hi) in enumerate(problems)]
  loop_s = time.perf_counter() - t0
  ours = np.array([np.sum(predict_loss(p[0], sol.fractions[k] * p[1], xp=np)) for k, p in enumerate(problems)])
  theirs = np.array([r[1] for r in ref])
  violation = max(max(abs(sol.fractions[k].sum() - 1), np.max(p[2] - sol.fractions[k]),
                      np.max(sol.fractions[k] - p[3])) for k, p in enumerate(problems))
  return {"task": "allocate", "count": len(problems), **timing, "reference_s": loop_s,
          "speedup": loop_s / timing["jax_s"], "speedup_with_compile": loop_s / (timing["jax_s"] +
                                                                                  timing["compile_s"]),
          "max_rel_diff": float(np.max(np.abs(ours - theirs) / np.abs(theirs))),
          "jax_better_or_equal": float(np.mean(ours <= theirs * (1 + 1e-9))),
          "max_violation": float(max(violation, 0.0)), "converged": float(sol.converged.mean()),
          "max_iterations": int(sol.iterations.max())}


def bench_fit(args) -> dict:
  rng = np.random.default_rng(args.seed + 1)
  n, k, r = args.domains, args.points, args.resamples
  d = np.tile(np.geomspace(1e2, 1e6, k), (n, 1))
  e, a, b = rng.uniform(0.2, 0.6, n), rng.uniform(3, 12, n), rng.uniform(0.2, 0.7, n)
  loss = (e[:, None] + a[:, None] * d ** -b[:, None]) * np.exp(0.01 * rng.standard_normal(d.shape))
  counts = np.zeros((r, k))
  while True:  # resamples with at least 4 distinct sizes, so every fit is well posed
    bad = (counts > 0).sum(1) < 4
    if not bad.any():
      break
    counts[bad] = rng.multinomial(k, np.full(k, 1 / k), size=int(bad.sum()))
  weights = np.broadcast_to(counts[:, None, :], (r, n, k)).copy()
  timing = _timed_jax(lambda: powerlaw.fit_power_laws(d, loss, weights), args.repeats)
  ours = powerlaw.fit_power_laws(d, loss, weights)
  t0 = time.perf_counter()
  theirs = np.empty((r, n, 3))
  for s in range(r):
    rows = np.repeat(np.arange(k), counts[s].astype(int))
    for i in range(n):
      theirs[s, i] = reference.fit_power_law_scipy(d[i, rows], loss[i, rows], delta=powerlaw.DEFAULT_DELTA)
  loop_s = time.perf_counter() - t0
  mine = np.stack([ours["E"], ours["A"], ours["beta"]], axis=-1)
  rel = np.abs(mine - theirs) / np.maximum(np.abs(theirs), 1e-12)
  rel_ab = rel[..., 1:].max(-1)  # A and beta (E may sit on its bound 0)
  return {"task": "fit", "count": r * n, **timing, "reference_s": loop_s, "speedup": loop_s / timing["jax_s"],
          "speedup_with_compile": loop_s / (timing["jax_s"] + timing["compile_s"]),
          "max_rel_diff": float(rel_ab.max()), "median_rel_diff": float(np.median(rel_ab)),
          "within_1e-4": float(np.mean(rel_ab < 1e-4)),
          "converged": float(ours["converged"].mean()),
          "jax_loss_le_scipy": float(np.mean(_huber_losses(d, loss, weights, mine) <=
                                             _huber_losses(d, loss, weights, theirs) * (1 + 1e-9)))}


def bench_transfer(args) -> dict:
  """The whole fit (self laws + transfer rows) of the planted study, R bootstrap resamples of its runs."""
  rows, _, _ = simulate.planted_measurements(noise=0.01, seed=args.seed)
  arrays = measurements.to_arrays(rows)
  r = args.resamples
  timing = _timed_jax(lambda: transfer.fit_scaling(arrays, n_bootstrap=r - 1, seed=args.seed), args.repeats)
  fits = transfer.fit_scaling(arrays, n_bootstrap=r - 1, seed=args.seed)
  weights = np.concatenate([np.ones((1, len(arrays.run_ids))), np.random.default_rng(args.seed).multinomial(
      len(arrays.run_ids), np.full(len(arrays.run_ids), 1 / len(arrays.run_ids)), size=r - 1)])
  self_mask, tau_mask = transfer.point_masks(arrays.data, arrays.loss, "all")
  n = len(arrays.domains)
  t0 = time.perf_counter()
  taus = np.zeros((r, n, n))
  for s in range(r):
    for i in range(n):
      runs = np.repeat(np.arange(len(weights[s])), (weights[s] * self_mask[i]).astype(int))
      e, a, b = reference.fit_power_law_scipy(arrays.data[runs, i], arrays.loss[runs, i],
                                              delta=powerlaw.DEFAULT_DELTA)
      runs = np.repeat(np.arange(len(weights[s])), (weights[s] * tau_mask[i]).astype(int))
      taus[s, i] = reference.fit_tau_row_scipy(arrays.data[runs], arrays.loss[runs, i], i, e, a, b,
                                               delta=powerlaw.DEFAULT_DELTA)
  loop_s = time.perf_counter() - t0
  ours = np.asarray(fits.law.tau)
  off = ~np.eye(n, dtype=bool)
  rel = np.abs(ours[off] - taus[0][off]) / taus[0][off]  # the point estimate; resamples agree alike
  return {"task": "fit+transfer", "count": r, **timing, "reference_s": loop_s,
          "speedup": loop_s / timing["jax_s"],
          "speedup_with_compile": loop_s / (timing["jax_s"] + timing["compile_s"]),
          "max_rel_diff": float(rel.max()), "converged": fits.extra["bootstrap_converged"]}


def bench_compare(args) -> dict:
  """The six-domain compare: R bootstrap laws x 5 strategies x B budgets, JAX vs a scipy loop, interleaved.

  Allocator strategies (transfer-aware, transfer-blind: R' x 2 x B problems, R' = converged resamples): one
  jitted vmapped call vs a loop of SLSQP. Heuristics (data-proportional, uniform, temperature: R' x 3 x B):
  closed form (shares capped at availability by water-filling), so there is nothing to solve; both columns run
  the same numpy code for them (strategies.strategy_counts per resample) and include its time. Rounds
  alternate the JAX call and the scipy loop (`--reference-repeats` rounds, medians reported).
  """
  from m2dino_jax.scaling import lawfile, strategies, study
  planted = lawfile.read_law("example:six_domain")
  budgets = np.geomspace(5e3, 4e4, args.compare_budgets)
  rows = simulate.law_measurements(planted, seed=args.seed)
  r = args.compare_resamples
  t0 = time.perf_counter()
  _, boot = study.fit_rows(rows, n_bootstrap=r, seed=args.seed, return_samples=True)
  fit_s = time.perf_counter() - t0
  laws = [Law(*(boot[k][s] for k in Law._fields)) for s in range(len(boot["E"]))]
  blind = [law._replace(tau=np.zeros_like(law.tau)) for law in laws]
  problems = []
  for law in laws + blind:
    for b in budgets:
      lo, hi = allocate.bounds(float(b), planted.available, planted.floor)
      problems.append((law, float(b), lo, hi))
  heuristics = [s for s in strategies.STRATEGIES if s not in ("transfer_aware", "transfer_blind")]

  def heuristic_counts():
    return [strategies.strategy_counts(h, law, budgets, planted.available) for law in laws for h in heuristics]

  def slsqp_loop():
    return [reference.allocate_slsqp(law, b, lo * b, hi * b, starts=1, seed=k)[1]
            for k, (law, b, lo, hi) in enumerate(problems)]

  with jax.enable_x64(True):
    stack = lambda xs: jnp.asarray(np.array(xs))
    batch = allocate.Problem(Law(*(stack([np.asarray(p[0][f]) for p in problems]) for f in range(5))),
                             stack([p[1] for p in problems]), stack([p[2] for p in problems]),
                             stack([p[3] for p in problems]), jnp.ones((len(problems), 6)))
    solve = lambda: jax.block_until_ready(allocate.solve_batch(batch, allocate.DEFAULT_TOL))
    t0 = time.perf_counter()
    solve()
    first_s = time.perf_counter() - t0
    jax_times, loop_times, heur_times = [], [], []
    for _ in range(args.reference_repeats):  # interleaved rounds: the machine's load hits both alike
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        solve()
        jax_times.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      heuristic_counts()
      heur_times.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      ref = slsqp_loop()
      loop_times.append(time.perf_counter() - t0)
    sol = jax.tree.map(np.asarray, allocate.solve_batch(batch, allocate.DEFAULT_TOL))
  jax_s, loop_s, heur_s = (float(np.median(t)) for t in (jax_times, loop_times, heur_times))
  compile_s = max(first_s - jax_s, 0.0)
  ours = np.array([np.sum(predict_loss(p[0], sol.fractions[k] * p[1], xp=np)) for k, p in enumerate(problems)])
  # Measured (noise-free truth) mean-loss gain of transfer-aware over data-proportional, per resample.
  m = len(budgets)
  counts = sol.fractions[:len(laws) * m].reshape(-1, m, 6) * budgets[None, :, None]
  prop = planted.available / planted.available.sum() * budgets[:, None]
  ta = np.asarray(predict_loss(planted.law, counts, xp=np)).mean(-1)
  dp = np.asarray(predict_loss(planted.law, prop, xp=np)).mean(-1)
  gain = 1 - ta / dp[None]
  n_heur = len(laws) * len(heuristics) * m
  jax_total, ref_total = jax_s + heur_s, loop_s + heur_s
  return {"task": "compare", "count": len(problems) + n_heur, "resamples_requested": r,
          "resamples_converged": len(laws), "budgets": m, "strategies": len(strategies.STRATEGIES),
          "allocator_problems": len(problems), "heuristic_problems": n_heur,
          "compile_s": compile_s, "jax_s": jax_total, "reference_s": ref_total,
          "allocator_jax_s": jax_s, "allocator_reference_s": loop_s, "heuristics_s": heur_s,
          "reference_runs_s": loop_times, "reference_repeats": args.reference_repeats,
          "speedup": ref_total / jax_total, "speedup_with_compile": ref_total / (jax_total + compile_s),
          "allocator_speedup": loop_s / jax_s, "allocator_speedup_with_compile": loop_s / (jax_s + compile_s),
          "heuristics_note": "data_proportional, uniform, temperature are closed form (capped shares); both "
                             "columns run the same numpy code for them and include its time (heuristics_s)",
          "max_rel_diff": float(np.max(np.abs(ours - ref) / np.abs(ref))),
          "jax_better_or_equal": float(np.mean(ours <= np.array(ref) * (1 + 1e-9))),
          "converged": float(sol.converged.mean()), "bootstrap_fit_s": fit_s,
          "gain_vs_dp_ci95": np.percentile(gain, [2.5, 97.5], axis=0).tolist()}


def _huber_losses(d, loss, weights, params):
  e, a, b = params[..., 0:1], params[..., 1:2], params[..., 2:3]
  r = np.log(e + a * d[None] ** -b) - np.log(loss)[None]
  delta = powerlaw.DEFAULT_DELTA
  h = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * np.abs(r) - 0.5 * delta * delta)
  return (weights * h).sum(-1)


def run(args) -> int:
  tasks = {"allocate": bench_allocate, "fit": bench_fit, "transfer": bench_transfer, "compare": bench_compare}
  rows = [tasks[t](args) for t in args.tasks.split(",") if t]
  for row in rows:
    row["name"], row["median_s"] = row["task"], row["jax_s"]
  common.print_table(rows, ["task", "count", "compile_s", "jax_s", "reference_s", "speedup",
                            "speedup_with_compile", "max_rel_diff", "converged"])
  for row in rows:
    print({k: v for k, v in row.items() if k not in ("compile_s", "jax_s", "reference_s", "name", "median_s")})
  common.write_results(args, "scaling", rows, ratios={**{f"{r['task']}_speedup_over_scipy": r["speedup"] for r in rows},
                               **{f"{r['task']}_speedup_with_compile": r["speedup_with_compile"] for r in rows}},
                       compile_s={r["task"]: r["compile_s"] for r in rows},
                       shapes={r["task"]: r["count"] for r in rows})
  return 0
