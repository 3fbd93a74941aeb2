"""Lookahead task affinity (Fifty et al., "Efficiently identifying task groupings", 2021), model-agnostic.

From a shared state theta, one step on task j gives theta'_j; its effect on task i's held-out loss is
  Z[i, j] = 1 - L_i(theta'_j) / L_i(theta)      (> 0: a step on j helps i; the diagonal is i's own step)
averaged over `repeats` draws of (step batch, held-out batch). Z[i, j] is transfer j -> i (the scaling law's
tau[i][j] orientation).

Cost per repeat for T tasks: T steps + T base losses + T^2 lookahead losses (forward only), counted in
"calls". `plan_repeats` turns a budget in calls into a number of repeats, refusing a budget below one repeat.

`lookahead_affinity` takes two callables so the same code serves the multi-task model (probe.py: the
per-type compiled programs) and a planted-truth problem (`LinearPlanted`, whose true transfer is known).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from m2dino_jax.errors import ConfigError


def calls_per_repeat(num_tasks: int) -> int:
  return 2 * num_tasks + num_tasks * num_tasks


def plan_repeats(num_tasks: int, budget: int, wanted: int, *, reserved: int = 0, key: str = "advise.budget") -> int:
  """Repeats that fit `budget` calls after `reserved` ones (at most `wanted`); ConfigError below one."""
  per = calls_per_repeat(num_tasks)
  room = int(budget) - int(reserved)
  if room < per:
    raise ConfigError(key, f"{budget} calls cannot pay for one probe repeat: {num_tasks} tasks need "
                      f"{per} calls (T steps + T base losses + T^2 lookahead losses) after {reserved} reserved")
  return max(1, min(int(wanted), room // per))


def lookahead_affinity(step, loss, state, num_tasks: int, repeats: int) -> dict:
  """Z (num_tasks, num_tasks) and its per-repeat values.

  step(state, j, r) -> state after one step on task j (repeat r's batch of j);
  loss(state, i, r) -> float held-out loss of task i (repeat r's held-out batch of i); must not change state.
  """
  t0 = time.perf_counter()
  zs, base_all, calls = [], [], 0
  for r in range(repeats):
    base = np.array([loss(state, i, r) for i in range(num_tasks)], np.float64)
    calls += num_tasks
    z = np.zeros((num_tasks, num_tasks))
    for j in range(num_tasks):
      moved = step(state, j, r)
      calls += 1
      for i in range(num_tasks):
        z[i, j] = 1.0 - loss(moved, i, r) / base[i]
        calls += 1
    zs.append(z)
    base_all.append(base)
  zs = np.stack(zs)
  return {"affinity": zs.mean(0), "affinity_per_repeat": zs, "base_loss": np.stack(base_all).mean(0),
          "calls": calls, "seconds": time.perf_counter() - t0, "repeats": repeats}


@dataclasses.dataclass
class LinearPlanted:
  """A planted-truth multi-task problem: shared weights w (d,), task i's loss = mean((X_i w - y_i)^2) with
  y_i = X_i w*_{g(i)} and one true vector per planted group. The true transfer is known in closed form:
  tasks of one group share an optimum (positive transfer), groups with opposite optima (w*_{g+1} = -w*_g
  for paired groups, or orthogonal ones) conflict (negative transfer from the shared start)."""
  groups: tuple[int, ...]
  dim: int = 16
  samples: int = 64
  lr: float = 0.05
  noise: float = 0.05
  seed: int = 0

  def __post_init__(self):
    rng = np.random.default_rng(self.seed)
    k = max(self.groups) + 1
    base = rng.normal(size=(k, self.dim))
    q, _ = np.linalg.qr(base.T)  # orthonormal optima: moving towards one group's optimum hurts the others
    self.optima = 3.0 * q.T[:k]
    self.start = np.zeros(self.dim)

  def data(self, task: int, r: int, held_out: bool):
    rng = np.random.default_rng((self.seed, task, r, int(held_out)))
    x = rng.normal(size=(self.samples, self.dim))
    y = x @ self.optima[self.groups[task]] + self.noise * rng.normal(size=self.samples)
    return jnp.asarray(x), jnp.asarray(y)

  def true_transfer(self) -> np.ndarray:
    """Sign of the expected one-step effect: +1 same group, -1 different group (orthogonal optima from a
    start between them raise the other group's loss at any step)."""
    g = np.asarray(self.groups)
    return np.where(g[:, None] == g[None, :], 1.0, -1.0)

  def callables(self):
    loss_fn = jax.jit(lambda w, x, y: jnp.mean((x @ w - y) ** 2))
    grad_fn = jax.jit(jax.grad(lambda w, x, y: jnp.mean((x @ w - y) ** 2)))
    # the shared start: the all-task optimum direction (mean of the optima) scaled, as after joint training
    step = lambda w, j, r: w - self.lr * grad_fn(w, *self.data(j, r, False))
    loss = lambda w, i, r: float(loss_fn(w, *self.data(i, r, True)))
    return step, loss, jnp.asarray(0.5 * self.optima[np.asarray(self.groups)].mean(0))
