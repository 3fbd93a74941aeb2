"""`m2dino advise fit`: probe.json -> advice.json (transfer matrix, per-task laws, groups, sampling weights).

* transfer T[i, j] = Z[i, j] / |Z[i, i]|: the effect on task i of a step on task j in units of i's own step
  (1 = as good as i's own data); tau = clip(T, 0, tau_max) off the diagonal is the scaling law's transfer
  (scaling/law.py: D_eff_i = x_i + sum_j tau_ij x_j).
* per-task self laws L_i(D) = A_i D^-beta_i (E = 0) from the probe's data-scaling points by the scaling package's
  robust fit (powerlaw.fit_power_laws) where a task has >= 2 distinct sizes and the fit converges; otherwise
  the stated default: beta = `default_beta`, A so that L_i(n_i) = the probe's base loss (source 'default').
* groups: grouping.best_groups on the symmetrised T under `max_groups` (exact up to `exact_max_tasks` tasks).
* weights: for every group the allocator (scaling/allocate.py) splits the group model's batch budget
  (steps_per_task x |group| x batch_size examples, the trainer's budget rule) over its tasks, minimising the
  sum of relative losses (relative=True) with a floor per task; a singleton gets weight 1.
Everything is deterministic given probe.json and `seed` (the heuristic's restarts).
"""

from __future__ import annotations

import numpy as np

from m2dino_jax.advise import adviceio, grouping
from m2dino_jax.errors import DataError
from m2dino_jax.scaling import allocate, powerlaw
from m2dino_jax.scaling.law import Law

DEFAULT_BETA = 0.3
TAU_MAX = 2.0


def transfer_matrix(z) -> np.ndarray:
  z = np.asarray(z, np.float64)
  own = np.abs(np.diag(z)).copy()
  scale = np.where(own > 1e-12, own, np.maximum(np.abs(z).max(axis=1), 1e-12))
  return z / scale[:, None]


def fit_laws(probe: dict, default_beta: float = DEFAULT_BETA) -> dict[str, dict]:
  tasks, base = probe["tasks"], probe["base_loss"]
  sizes = {t: max(1, int(probe["train_sizes"][t]["used"])) for t in tasks}
  laws = {t: {"E": 0.0, "A": float(base[k]) * sizes[t] ** default_beta, "beta": default_beta, "source": "default"}
          for k, t in enumerate(tasks)}
  pts = [(t, probe["scaling"][t]) for t in tasks if t in probe.get("scaling", {})]
  pts = [(t, p) for t, p in pts if len(set(p["d"])) >= 2 and all(x > 0 and np.isfinite(x) for x in p["loss"])]
  if pts:
    width = max(len(p["d"]) for _, p in pts)
    d = np.ones((len(pts), width))
    loss = np.ones((len(pts), width))
    w = np.zeros((len(pts), width))
    for k, (_, p) in enumerate(pts):
      m = len(p["d"])
      d[k, :m], loss[k, :m], w[k, :m] = p["d"], p["loss"], 1.0
    out = powerlaw.fit_power_laws(d, loss, w, e_mode="none")
    for k, (t, _) in enumerate(pts):
      if bool(out["converged"][k]) and out["beta"][k] > 1.01e-3:
        laws[t] = {"E": 0.0, "A": float(out["A"][k]), "beta": float(out["beta"][k]), "source": "fit"}
  return laws


def group_weights(tasks, laws, tau, budget: float, floor: float) -> dict[str, float]:
  if len(tasks) == 1:
    return {tasks[0]: 1.0}
  n = len(tasks)
  law = Law(np.array([laws[t]["E"] for t in tasks]), np.array([laws[t]["A"] for t in tasks]),
            np.array([laws[t]["beta"] for t in tasks]), np.asarray(tau, np.float64), np.ones((n, n)))
  res = allocate.allocate(law, [budget], np.full(n, budget), floor=min(floor, 0.5 / n), relative=True,
                          names=list(tasks))
  return {t: float(f) for t, f in zip(tasks, res["fractions"][0])}


def advise(probe: dict, *, max_groups: int, seed: int = 0, floor: float = allocate.DEFAULT_FLOOR,
           default_beta: float = DEFAULT_BETA, exact_max_tasks: int = grouping.EXACT_MAX_TASKS) -> dict:
  tasks = list(probe["tasks"])
  z = np.asarray(probe["affinity"], np.float64)
  if z.shape != (len(tasks), len(tasks)) or not np.isfinite(z).all():
    raise DataError("probe.json", f"'affinity' must be a finite {len(tasks)}x{len(tasks)} matrix")
  t_mat = transfer_matrix(z)
  tau = np.clip(t_mat, 0.0, TAU_MAX)
  np.fill_diagonal(tau, 0.0)
  laws = fit_laws(probe, default_beta)
  found = grouping.best_groups(t_mat, max_groups, seed=seed, exact_max_tasks=exact_max_tasks)
  labels = found["labels"]
  groups = {}
  for g in sorted(set(labels)):
    groups[f"g{g + 1}"] = [t for t, lab in zip(tasks, labels) if lab == g]
  weights, per_group = {}, {}
  steps, batch = int(probe.get("steps_per_task", 1)), int(probe.get("batch_size", 1))
  for name, members in groups.items():
    idx = [tasks.index(t) for t in members]
    budget = float(steps * len(members) * batch)
    w = group_weights(members, laws, tau[np.ix_(idx, idx)], budget, floor)
    per_group[name] = w
    weights.update(w)
  return {"format": adviceio.FORMAT, "tasks": tasks, "groups": groups, "weights": weights,
          "group_weights": per_group, "transfer": t_mat.tolist(), "affinity": z.tolist(), "tau": tau.tolist(),
          "laws": laws, "grouping": found, "seed": int(seed), "floor": float(floor),
          "probe": {"budget": probe.get("budget"), "repeats": probe.get("repeats"), "seed": probe.get("seed")}}
