"""`m2dino advise fit`: probe.json -> advice.json (transfer matrix, per-task laws, groups, sampling weights).

* transfer T[i, j] = Z[i, j] / |Z[i, i]|: the effect on task i of a step on task j in units of i's own step
  (1 = as good as i's own data). T groups the tasks.
* tau (the scaling law's transfer, scaling/law.py: D_eff_i = x_i + sum_j tau_ij x_j) is T shrunk by its
  repeat-to-repeat noise: each off-diagonal entry is multiplied by max(0, 1 - (se / |mean|)^2) (positive-part
  James-Stein), then clipped to [0, tau_max]. A one-step lookahead is a noisy, optimistic proxy for what a
  whole training's worth of j's data does for i, so an entry the repeats do not agree on must not let the
  allocator starve task i. With one repeat there is no spread to judge by and tau = 0 (transfer-blind).
* per-task self laws L_i(D) = A_i D^-beta_i (E = 0) from the probe's data-scaling points by the scaling package's
  robust fit (powerlaw.fit_power_laws) where a task has >= 2 distinct sizes and the fit converges; otherwise
  the stated default: beta = `default_beta`, A so that L_i(n_i) = the probe's base loss (source 'default').
* groups: grouping.best_groups on the symmetrised T under `max_groups` (exact up to `exact_max_tasks` tasks).
* weights: for every group the allocator (scaling/allocate.py) splits the group model's batch budget
  (steps_per_task x |group| x batch_size examples, the trainer's budget rule) over its tasks, minimising the
  sum of relative losses (relative=True). Only "informed" tasks take part: a fitted law (not the default)
  with beta >= `min_beta` (a flatter fit from a short probe is noise, and a flat law tells the allocator the
  task needs no data). Uninformed tasks keep their uniform share 1/n; the informed ones split the rest; with
  fewer than two informed tasks the group is uniform. Every task gets at least `floor` x its uniform share.
  A singleton gets weight 1.
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
MIN_BETA = 0.05
FLOOR_SHARE = 0.5  # least weight per task, as a fraction of its uniform share 1/n


def _row_scale(z: np.ndarray) -> np.ndarray:
  """Each task's own-step effect |Z[i, i]| (its row's largest |entry| where that is ~0): the unit of T."""
  own = np.abs(np.diag(z)).copy()
  return np.where(own > 1e-12, own, np.maximum(np.abs(z).max(axis=1), 1e-12))


def transfer_matrix(z) -> np.ndarray:
  z = np.asarray(z, np.float64)
  return z / _row_scale(z)[:, None]


def shrunk_tau(z_per_repeat, tau_max: float = TAU_MAX) -> np.ndarray:
  """tau from the per-repeat affinities (R, T, T): each repeat scaled by the mean diagonal (transfer_matrix's
  units), off-diagonal means shrunk by max(0, 1 - se^2 / mean^2), clipped to [0, tau_max]; zeros if R < 2."""
  zs = np.asarray(z_per_repeat, np.float64)
  n = zs.shape[-1]
  if zs.ndim != 3 or zs.shape[0] < 2:
    return np.zeros((n, n))
  ts = zs / _row_scale(zs.mean(0))[None, :, None]
  m = ts.mean(0)
  se2 = ts.var(0, ddof=1) / ts.shape[0]
  keep = np.clip(1.0 - se2 / np.maximum(m * m, 1e-300), 0.0, 1.0)
  tau = np.clip(m * keep, 0.0, tau_max)
  np.fill_diagonal(tau, 0.0)
  return tau


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


def informed(law: dict, min_beta: float = MIN_BETA) -> bool:
  return law.get("source") == "fit" and law["beta"] >= min_beta


def group_weights(tasks, laws, tau, budget: float, floor_share: float = FLOOR_SHARE,
                  min_beta: float = MIN_BETA) -> dict[str, float]:
  """Sampling weights within one group (sum 1): uniform share for uninformed tasks, the allocator's split of the
  rest over the informed ones, each task >= floor_share / n."""
  n = len(tasks)
  weights = {t: 1.0 / n for t in tasks}
  idx = [k for k, t in enumerate(tasks) if informed(laws[t], min_beta)]
  if len(idx) < 2:
    return weights
  names = [tasks[k] for k in idx]
  share = len(idx) / n  # the informed tasks' combined uniform share
  law = Law(np.array([laws[t]["E"] for t in names]), np.array([laws[t]["A"] for t in names]),
            np.array([laws[t]["beta"] for t in names]), np.asarray(tau, np.float64)[np.ix_(idx, idx)],
            np.ones((len(idx), len(idx))))
  res = allocate.allocate(law, [budget * share], np.full(len(idx), budget * share),
                          floor=floor_share / len(idx), relative=True, names=names)
  weights.update({t: share * float(f) for t, f in zip(names, res["fractions"][0])})
  return weights


def advise(probe: dict, *, max_groups: int, seed: int = 0, floor_share: float = FLOOR_SHARE,
           default_beta: float = DEFAULT_BETA, min_beta: float = MIN_BETA,
           exact_max_tasks: int = grouping.EXACT_MAX_TASKS) -> dict:
  tasks = list(probe["tasks"])
  z = np.asarray(probe["affinity"], np.float64)
  if z.shape != (len(tasks), len(tasks)) or not np.isfinite(z).all():
    raise DataError("probe.json", f"'affinity' must be a finite {len(tasks)}x{len(tasks)} matrix")
  t_mat = transfer_matrix(z)
  tau = shrunk_tau(probe.get("affinity_per_repeat", [z]))
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
    w = group_weights(members, laws, tau[np.ix_(idx, idx)], budget, floor_share, min_beta)
    per_group[name] = w
    weights.update(w)
  return {"format": adviceio.FORMAT, "tasks": tasks, "groups": groups, "weights": weights,
          "group_weights": per_group, "transfer": t_mat.tolist(), "affinity": z.tolist(), "tau": tau.tolist(),
          "laws": laws, "informed": [t for t in tasks if informed(laws[t], min_beta)], "grouping": found,
          "seed": int(seed), "floor_share": float(floor_share), "min_beta": float(min_beta),
          "probe": {"budget": probe.get("budget"), "repeats": probe.get("repeats"), "seed": probe.get("seed")}}
