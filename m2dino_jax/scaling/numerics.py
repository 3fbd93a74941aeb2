"""Shared numerics for the scaling code: float64 scope, Huber loss and a small robust Levenberg-Marquardt.

Fits and allocations need float64 (parameters to 1e-4 relative, constraints to 1e-9), but switching x64 on
globally would change every other JAX user in the process. `x64` turns it on only around the scaling entry
points; jit caches are keyed on the flag, so float32 callers elsewhere are unaffected.

`lm_minimise` is a projected Levenberg-Marquardt for problems with a handful of parameters (a power law, a
row of transfer coefficients): it minimises sum_k w_k * huber(r_k(theta)) by iteratively reweighted
Gauss-Newton steps with Marquardt damping, accepts a step only if the loss falls (so it never ascends), and
keeps box bounds by freezing parameters that sit on a bound and are pushed outward. It is written for
`jax.vmap` (over domains, bootstrap resamples and start points) under one `jax.jit`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


def x64(fn):
  """Runs `fn` with JAX float64 enabled (scoped; the global setting is restored afterwards)."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with jax.enable_x64(True):
      return fn(*args, **kwargs)

  return wrapper


def huber(r, delta):
  """Huber penalty: r^2/2 inside |r| <= delta, linear outside (same as scipy's loss='huber', f_scale=delta)."""
  a = jnp.abs(r)
  return jnp.where(a <= delta, 0.5 * r * r, delta * a - 0.5 * delta * delta)


def robust_loss(residuals, weights, delta):
  return jnp.sum(weights * huber(residuals, delta))


def spd_solve(matrix, rhs):
  """Solves a small symmetric positive definite system by an unrolled Cholesky.

  For the few-parameter problems here this beats a batched LAPACK call under vmap by a wide margin.
  """
  p = matrix.shape[-1]
  if p > 16:
    return jnp.linalg.solve(matrix, rhs)
  chol = [[None] * p for _ in range(p)]
  for i in range(p):
    for j in range(i + 1):
      s = matrix[i, j] - sum((chol[i][k] * chol[j][k] for k in range(j)), 0.0)
      chol[i][j] = jnp.sqrt(jnp.maximum(s, 1e-300)) if i == j else s / chol[j][j]
  y = []
  for i in range(p):
    y.append((rhs[i] - sum((chol[i][k] * y[k] for k in range(i)), 0.0)) / chol[i][i])
  x = [None] * p
  for i in reversed(range(p)):
    x[i] = (y[i] - sum((chol[k][i] * x[k] for k in range(i + 1, p)), 0.0)) / chol[i][i]
  return jnp.stack(x)


class LMResult(NamedTuple):
  theta: jax.Array
  loss: jax.Array
  iterations: jax.Array
  converged: jax.Array


def lm_minimise(residual_fn, theta0, *, weights, delta, lower, upper, free=None, max_iter: int = 200,
                rtol: float = 1e-14) -> LMResult:
  """Minimises sum_k weights_k * huber(residual_fn(theta)_k, delta) over lower <= theta <= upper.

  residual_fn: theta (p,) -> residuals (n,). `free` (p,) bool marks parameters to fit (others stay at
  theta0). Stops when a step changes the loss by less than `rtol` relative and moves theta by less than
  sqrt(rtol) relative, or after `max_iter` iterations. All shapes are static, so it vmaps.
  """
  p = theta0.shape[0]
  free = jnp.ones((p,), bool) if free is None else free
  dtype = theta0.dtype

  def loss_of(theta):
    return robust_loss(residual_fn(theta), weights, delta)

  def step_system(theta):
    r = residual_fn(theta)
    jac = jax.jacfwd(residual_fn)(theta)
    inlier = jnp.abs(r) <= delta
    psi = jnp.where(inlier, r, delta * jnp.sign(r))  # Huber derivative
    grad = jac.T @ (weights * psi)
    # IRLS curvature: inliers at full weight, outliers at delta/|r| (the Huber secant weight).
    irls = jnp.where(inlier, 1.0, delta / jnp.maximum(jnp.abs(r), 1e-300))
    hess = jac.T @ ((weights * irls)[:, None] * jac)
    # Freeze parameters that are fixed, or sit on a bound with the gradient pushing them outward.
    at_low = (theta <= lower) & (grad > 0)
    at_high = (theta >= upper) & (grad < 0)
    active = free & ~at_low & ~at_high
    return grad, hess, active

  def body(state):
    theta, loss, lam, it, done = state
    grad, hess, active = step_system(theta)
    mask = active.astype(dtype)
    hess = hess * mask[:, None] * mask[None, :]
    diag = jnp.diag(hess)
    scale = jnp.where(active, jnp.maximum(diag, 1e-12 * jnp.max(diag) + 1e-300), 1.0)
    system = hess + lam * jnp.diag(scale) + jnp.diag(1.0 - mask)
    delta_theta = -spd_solve(system, grad * mask)
    cand = jnp.clip(theta + delta_theta, lower, upper)
    cand_loss = loss_of(cand)
    ok = jnp.isfinite(cand_loss) & (cand_loss <= loss)
    new_theta = jnp.where(ok, cand, theta)
    new_loss = jnp.where(ok, cand_loss, loss)
    new_lam = jnp.where(ok, jnp.maximum(lam / 3.0, 1e-12), jnp.minimum(lam * 4.0, 1e12))
    # Converged when the proposed step (taken or not) changes neither the loss nor theta materially;
    # near the optimum a step may be refused only for rounding, which must not stall the loop.
    small_change = jnp.abs(loss - cand_loss) <= rtol * jnp.abs(loss) + 1e-300
    small_step = jnp.all(jnp.abs(cand - theta) <= jnp.sqrt(rtol) * (jnp.abs(theta) + 1e-8))
    converged = (small_change & small_step) | (lam >= 1e12)
    return new_theta, new_loss, new_lam, it + 1, converged

  def cond(state):
    return (state[3] < max_iter) & ~state[4]

  theta0 = jnp.clip(theta0, lower, upper)
  init = (theta0, loss_of(theta0), jnp.asarray(1e-3, dtype), jnp.asarray(0), jnp.asarray(False))
  theta, loss, _, it, done = jax.lax.while_loop(cond, body, init)
  return LMResult(theta, loss, it, done)
