"""Transfer-aware data allocation: minimise sum_i w_i L_i(D_eff_i(x)) over the budget polytope.

Problem for budget B:  min_x  sum_i w_i (E_i + A_i D_eff_i(x)^-beta_i)
                       s.t.   sum_i x_i = B,   floor * B <= x_i <= min(N_i, B).
Solved in budget fractions z = x / B (so every problem lives on the same scale) by accelerated projected
gradient (FISTA) with
  * backtracking on the local Lipschitz constant (sufficient-decrease test), and
  * a monotone safeguard: a step that would raise the objective is refused and the momentum restarted,
    so the objective never increases;
and an exact Euclidean projection onto {sum z = 1, l <= z <= u} (sort the dual breakpoints, find the
segment that brackets the sum, solve the linear piece in closed form). It stops when the projected-gradient
norm L * ||z - P(z - grad/L)|| falls below `tol` (objective units per unit of budget fraction). Everything is
pure JAX, jitted, and vmapped over budgets and problems.

With gamma = 1 the problem is convex (a convex decreasing function of affine maps), so the stationary point
found is the global minimum.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from m2dino_jax.errors import SolverError
from m2dino_jax.scaling.law import Law, predict_loss
from m2dino_jax.scaling.numerics import x64

DEFAULT_FLOOR = 0.05
DEFAULT_TOL = 1e-9
DEFAULT_MAX_ITER = 20000


def project(v, lower, upper):
  """Euclidean projection of v onto {sum z = 1, lower <= z <= upper} (assumed non-empty); exact.

  The projection is clip(v - lam, lower, upper) where g(lam) = sum clip(v - lam, lower, upper) = 1. g is
  piecewise linear and non-increasing with breakpoints v - upper and v - lower: evaluate g at all of them,
  take the nearest breakpoints on either side of the root, and on that linear piece solve for lam over the
  coordinates that are free there. No sort, no iteration: exact up to rounding.
  """
  breaks = jnp.concatenate([v - upper, v - lower])
  sums = jnp.sum(jnp.clip(v[None, :] - breaks[:, None], lower, upper), axis=1)
  left = jnp.max(jnp.where(sums >= 1.0, breaks, -jnp.inf))   # g(left) >= 1
  right = jnp.min(jnp.where(sums <= 1.0, breaks, jnp.inf))   # g(right) <= 1
  left = jnp.where(jnp.isfinite(left), left, right)
  right = jnp.where(jnp.isfinite(right), right, left)
  mid = 0.5 * (left + right)
  at_upper = v - mid >= upper
  at_lower = v - mid <= lower
  free = ~at_upper & ~at_lower
  n_free = jnp.sum(free)
  fixed = jnp.sum(jnp.where(at_upper, upper, 0.0)) + jnp.sum(jnp.where(at_lower, lower, 0.0))
  lam = jnp.where(n_free > 0, (jnp.sum(jnp.where(free, v, 0.0)) + fixed - 1.0) / jnp.maximum(n_free, 1), mid)
  return jnp.clip(v - lam, lower, upper)


class Problem(NamedTuple):
  """One allocation problem in budget fractions (all arrays; batch by stacking)."""
  law: Law
  budget: object   # scalar
  lower: object    # (n,) fractions
  upper: object    # (n,) fractions
  weights: object  # (n,) importance weights


class Solution(NamedTuple):
  fractions: object
  objective: object
  losses: object
  pg_norm: object
  iterations: object
  converged: object


def objective(problem: Problem, z):
  """sum_i w_i L_i(D_eff_i(z B)): the plain definition (the solver uses the fused form below)."""
  x = z * problem.budget
  return jnp.sum(problem.weights * predict_loss(problem.law, x))


def objective_and_grad(problem: Problem, z):
  """Objective and its gradient in z, by hand: one log and one exp per term instead of autodiff's pows.

  D_eff_i = x_i + sum_j tau_ij x_j^gamma_ij, x = z B;  dL_i/dD_eff_i = -beta_i A_i D_eff_i^-beta_i / D_eff_i;
  dD_eff_i/dx_j = [i == j] + tau_ij gamma_ij x_j^gamma_ij / x_j.  (tests compare with jax.grad.)
  """
  law, budget = problem.law, problem.budget
  n = z.shape[-1]
  x = jnp.maximum(z * budget, 1e-300)
  tau = law.tau * (1.0 - jnp.eye(n, dtype=z.dtype))
  xg = jnp.exp(law.gamma * jnp.log(x)[None, :])  # (i, j): x_j^gamma_ij
  deff = x + jnp.sum(tau * xg, axis=1)
  power = jnp.exp(-law.beta * jnp.log(deff))
  value = jnp.sum(problem.weights * (law.E + law.A * power))
  dl_ddeff = -problem.weights * law.beta * law.A * power / deff
  ddeff_dx = jnp.eye(n, dtype=z.dtype) + tau * law.gamma * xg / x[None, :]
  return value, budget * (dl_ddeff @ ddeff_dx)


def solve(problem: Problem, *, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER) -> Solution:
  """Solves one problem (pure JAX; vmap for many).

  Each iteration tries one step from the extrapolated point y with the current Lipschitz estimate; if the
  sufficient-decrease test fails the estimate doubles and the iteration moves nothing (backtracking folded
  into the main loop keeps the vmapped loop flat). Accepted steps shrink the estimate a little so the step
  can grow again.
  """
  lo, hi = problem.lower, problem.upper
  value_and_grad = functools.partial(objective_and_grad, problem)
  proj = lambda v: project(v, lo, hi)
  eps = jnp.finfo(lo.dtype).eps

  def body(state):
    z, z_prev, t, lip, fz, gz, it, _ = state
    t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    y = jnp.clip(z + ((t - 1.0) / t_next) * (z - z_prev), lo, hi)  # stay in the box so f is defined
    fy, gy = value_and_grad(y)
    cand = proj(y - gy / lip)
    f_cand, g_cand = value_and_grad(cand)
    step = cand - y
    sufficient = f_cand <= fy + gy @ step + 0.5 * lip * (step @ step) + 4.0 * eps * jnp.abs(fy)
    # Monotone safeguard: refuse a rise (beyond float64 rounding of f) and restart the momentum.
    better = sufficient & (f_cand <= fz + 4.0 * eps * jnp.abs(fz))
    # Insufficient decrease: retry the same y with a doubled estimate (z, z_prev, t unchanged).
    # Sufficient but not monotone: stay at z and restart the momentum.
    z_next = jnp.where(better, cand, z)
    z_prev_next = jnp.where(sufficient, z, z_prev)
    f_next = jnp.where(better, f_cand, fz)
    g_next = jnp.where(better, g_cand, gz)
    t_new = jnp.where(better, t_next, jnp.where(sufficient, 1.0, t))
    lip_new = jnp.where(sufficient, lip / 1.1, lip * 2.0)
    pg = lip_new * jnp.linalg.norm(z_next - proj(z_next - g_next / lip_new))
    return (z_next, z_prev_next, t_new, lip_new, f_next, g_next, it + 1, better & (pg <= tol))

  def cond(state):
    return (state[6] < max_iter) & ~state[7]

  z0 = proj(jnp.full_like(lo, 1.0 / lo.shape[0]))
  f0, g0 = value_and_grad(z0)
  lip0 = jnp.maximum(jnp.linalg.norm(g0), 1e-8)
  state = (z0, z0, jnp.asarray(1.0, z0.dtype), lip0, f0, g0, 0, jnp.asarray(False))
  z, _, _, lip, fz, gz, it, done = jax.lax.while_loop(cond, body, state)
  losses = predict_loss(problem.law, z * problem.budget)
  pg = lip * jnp.linalg.norm(z - proj(z - gz / lip))
  return Solution(z, fz, losses, pg, it, pg <= tol)


@functools.partial(jax.jit, static_argnames=("max_iter",))
def solve_batch(problems: Problem, tol, max_iter: int = DEFAULT_MAX_ITER) -> Solution:
  """Solves a stacked batch of problems (leading axis) in one compiled call."""
  return jax.vmap(lambda p: solve(p, tol=tol, max_iter=max_iter))(problems)


def bounds(budget: float, available, floor: float, names=None) -> tuple[np.ndarray, np.ndarray]:
  """Lower/upper fractions of the budget; raises SolverError if {sum = B, bounds} is empty."""
  available = np.asarray(available, np.float64)
  n = available.shape[0]
  names = names or [f"domain {i}" for i in range(n)]
  if not (np.isfinite(budget) and budget > 0):
    raise SolverError(f"budget must be a positive number, got {budget}")
  if not (0.0 <= floor and np.isfinite(floor)):
    raise SolverError(f"floor must be >= 0, got {floor}")
  if floor * n > 1.0 + 1e-12:
    raise SolverError(f"infeasible: floor {floor} x {n} domains = {floor * n:.4g} > 1 (the floors alone "
                      "exceed the budget)")
  short = [names[i] for i in range(n) if available[i] < floor * budget]
  if short:
    raise SolverError(f"infeasible: data available in {short} is below the floor {floor} x budget "
                      f"{budget:g} = {floor * budget:g}")
  total = available.sum()
  if budget > total * (1 + 1e-12):
    raise SolverError(f"infeasible: budget {budget:g} exceeds the total data available {total:g}")
  lower = np.full(n, floor)
  upper = np.minimum(available / budget, 1.0)
  return lower, upper


def proportional(budget: float, available) -> np.ndarray:
  """Data-proportional counts x_i = B N_i / sum N (equal split where availability is unknown)."""
  available = np.asarray(available, np.float64)
  share = available / available.sum() if np.isfinite(available).all() else np.full(len(available),
                                                                                     1 / len(available))
  return budget * share


@x64
def allocate(law: Law, budgets, available, *, floor: float = DEFAULT_FLOOR, weights=None,
             relative: bool = False, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
             names=None) -> dict:
  """Allocates each budget (vmapped); returns numpy arrays with a leading budget axis.

  weights: importance w_i (default equal). relative: divide each domain's loss by its loss under the
  data-proportional mixture of the same budget, so domains count by relative improvement.
  """
  budgets = np.atleast_1d(np.asarray(budgets, np.float64))
  n = len(law.E)
  available = np.asarray(available, np.float64)
  base_w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
  if base_w.shape != (n,) or (base_w < 0).any() or not np.isfinite(base_w).all() or base_w.sum() <= 0:
    raise SolverError(f"importance weights must be {n} non-negative finite numbers, not all zero")
  lows, highs, ws, props = [], [], [], []
  for b in budgets:
    lo, hi = bounds(float(b), available, floor, names)
    prop = proportional(float(b), available)
    prop_loss = np.asarray(predict_loss(law, prop, xp=np))
    lows.append(lo), highs.append(hi), props.append(prop)
    ws.append(base_w / prop_loss if relative else base_w)
  m = len(budgets)
  law64 = Law(*(jnp.broadcast_to(jnp.asarray(np.asarray(a, np.float64)), (m, *np.shape(a))) for a in law))
  problems = Problem(law64, jnp.asarray(budgets), jnp.asarray(np.array(lows)), jnp.asarray(np.array(highs)),
                     jnp.asarray(np.array(ws)))
  sol = jax.tree.map(np.asarray, solve_batch(problems, tol, max_iter))
  props = np.array(props)
  prop_losses = np.asarray(predict_loss(law, props, xp=np))
  return {"budgets": budgets, "fractions": sol.fractions, "counts": sol.fractions * budgets[:, None],
          "losses": sol.losses, "objective": sol.objective, "pg_norm": sol.pg_norm,
          "iterations": sol.iterations, "converged": sol.converged, "weights": np.array(ws),
          "proportional_counts": props, "proportional_losses": prop_losses,
          "proportional_objective": np.sum(np.array(ws) * prop_losses, axis=1)}


def random_problems(rng: np.random.Generator, count: int, n: int) -> list[tuple]:
  """`count` random feasible problems over `n` domains, (law, budget, lower, upper, importance weights), for the
  tests and the benchmark (infeasible draws are skipped)."""
  from m2dino_jax.scaling import simulate
  out = []
  while len(out) < count:
    law = simulate.random_law(n, rng)
    available = rng.uniform(1e4, 1e6, n)
    floor = rng.uniform(0.0, 0.9 / n)
    budget = rng.uniform(0.1, 0.95) * available.sum()
    try:
      lower, upper = bounds(budget, available, floor)
    except SolverError:
      continue
    out.append((law, budget, lower, upper, rng.uniform(0.2, 2.0, n)))
  return out
