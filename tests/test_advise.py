"""Transfer-aware task aggregation: planted-truth affinity, grouping search vs brute force, budgets, advice."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from m2dino_jax.advise import affinity, grouping
from m2dino_jax.errors import ConfigError


def _brute_force(s, max_groups):
  """Independent reference: every label vector in range(max_groups)^n, canonicalised, best score."""
  n = s.shape[0]
  best, best_labels = -np.inf, None
  for labels in itertools.product(range(max_groups), repeat=n):
    sc = sum(s[i, j] for i in range(n) for j in range(i + 1, n) if labels[i] == labels[j])
    if sc > best + 1e-12:
      best, best_labels = sc, labels
  return best, best_labels


def test_partition_enumeration_counts_are_stirling_sums():
  # Bell(6) = 203; partitions of 6 into <= 2 blocks = S(6,1) + S(6,2) = 1 + 31
  assert sum(1 for _ in grouping.partitions(6, 6)) == 203
  assert sum(1 for _ in grouping.partitions(6, 2)) == 32
  assert len(set(grouping.partitions(5, 5))) == 52


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("max_groups", [1, 2, 3, 7])
def test_exact_and_heuristic_search_equal_brute_force(seed, max_groups):
  rng = np.random.default_rng(seed)
  n = 6
  m = rng.normal(size=(n, n))
  s = grouping.symmetric(m)
  best, _ = _brute_force(s, max_groups)
  labels, sc = grouping.exact(m, max_groups)
  assert sc == pytest.approx(best, abs=1e-9)
  assert grouping.score(s, labels) == pytest.approx(best, abs=1e-9)
  assert len(set(labels)) <= max_groups
  h_labels, h_sc = grouping.heuristic(m, max_groups, seed=seed)
  assert len(set(h_labels)) <= max_groups
  assert h_sc <= best + 1e-9
  assert h_sc >= best - 1e-9 or h_sc >= best - 0.15 * abs(best)  # near-optimal on these sizes
  assert grouping.upper_bound(s) >= best - 1e-12


def test_heuristic_recovers_planted_blocks_beyond_exact_size_with_bound():
  n, k = 16, 4
  truth = np.repeat(np.arange(k), n // k)
  rng = np.random.default_rng(0)
  s = np.where(truth[:, None] == truth[None, :], 1.0, -1.0) + 0.3 * rng.normal(size=(n, n))
  out = grouping.best_groups(s, max_groups=6, seed=0, exact_max_tasks=10)
  assert out["method"] == "heuristic"
  assert tuple(out["labels"]) == grouping.canonical(truth)
  assert 0 <= out["gap"] == pytest.approx(out["upper_bound"] - out["score"])


def test_planted_probe_recovers_sign_pattern_and_groups():
  groups = (0, 0, 1, 1, 1, 2, 2)
  problem = affinity.LinearPlanted(groups=groups, seed=3)
  step, loss, start = problem.callables()
  out = affinity.lookahead_affinity(step, loss, start, len(groups), repeats=2)
  z = out["affinity"]
  truth = problem.true_transfer()
  assert np.array_equal(np.sign(z), truth)
  assert out["calls"] == 2 * affinity.calls_per_repeat(len(groups))
  found = grouping.best_groups(z, max_groups=len(groups))
  assert tuple(found["labels"]) == grouping.canonical(groups)
  # under a tighter group budget the planted blocks can only merge, never split
  two = grouping.best_groups(z, max_groups=2)["labels"]
  assert len(set(two)) == 2
  assert all(two[i] == two[j] for i in range(7) for j in range(7) if groups[i] == groups[j])


def test_probe_budget_is_planned_and_refused_below_one_repeat():
  assert affinity.calls_per_repeat(4) == 24
  assert affinity.plan_repeats(4, 100, wanted=10) == 4
  assert affinity.plan_repeats(4, 100, wanted=2) == 2
  assert affinity.plan_repeats(4, 100, wanted=10, reserved=40) == 2
  with pytest.raises(ConfigError, match="advise.budget"):
    affinity.plan_repeats(4, 23, wanted=1)


def _planted_probe(groups=(0, 0, 1, 1, 1, 2, 2), seed=3, beta=0.4):
  from m2dino_jax.tasks import registry
  problem = affinity.LinearPlanted(groups=groups, seed=seed)
  step, loss, start = problem.callables()
  out = affinity.lookahead_affinity(step, loss, start, len(groups), repeats=2)
  names = [t.name for t in registry.TASKS[:len(groups)]]
  d = [50.0, 100.0, 200.0, 400.0]
  scaling = {t: {"d": d, "loss": [2.0 * (1 + k) * x ** -beta for x in d]} for k, t in enumerate(names)}
  return {"tasks": names, "affinity": out["affinity"].tolist(),
          "affinity_per_repeat": out["affinity_per_repeat"].tolist(), "base_loss": out["base_loss"].tolist(),
          "train_sizes": {t: {"used": 400, "available": 400} for t in names}, "scaling": scaling,
          "steps_per_task": 40, "batch_size": 16, "repeats": 2, "seed": seed}


def test_fit_from_planted_probe_recovers_groups_laws_and_is_reproducible():
  from m2dino_jax.advise import fit
  groups = (0, 0, 1, 1, 1, 2, 2)
  probe = _planted_probe(groups)
  a = fit.advise(probe, max_groups=7, seed=0)
  names = probe["tasks"]
  found = [sorted(m) for m in a["groups"].values()]
  want = [sorted(n for n, g in zip(names, groups) if g == k) for k in range(3)]
  assert sorted(found) == sorted(want)
  assert np.array_equal(np.sign(np.asarray(a["transfer"])), np.where(np.equal.outer(groups, groups), 1, -1))
  tau = np.asarray(a["tau"])
  assert (tau >= 0).all() and np.all((tau > 0) == (np.equal.outer(groups, groups) & ~np.eye(7, dtype=bool)))
  for t in names:
    assert a["laws"][t]["source"] == "fit" and a["laws"][t]["beta"] == pytest.approx(0.4, rel=1e-4)
  for members in a["groups"].values():
    w = [a["weights"][t] for t in members]
    assert sum(w) == pytest.approx(1.0, abs=1e-9) and min(w) >= fit.FLOOR_SHARE / len(w) - 1e-9
  b = fit.advise(probe, max_groups=7, seed=0)
  assert a == b
  two = fit.advise(probe, max_groups=2, seed=0)
  assert len(two["groups"]) == 2


def test_group_weights_match_scipy():
  from scipy.optimize import minimize

  from m2dino_jax.advise import fit
  laws = {"a": {"E": 0.0, "A": 3.0, "beta": 0.5, "source": "fit"}, "b": {"E": 0.0, "A": 1.0, "beta": 0.2,
          "source": "fit"}, "c": {"E": 0.0, "A": 2.0, "beta": 0.35, "source": "fit"}}
  tau = np.array([[0, 0.5, 0.0], [0.2, 0, 0.1], [0.0, 0.8, 0]])
  budget, floor = 600.0, 0.05
  got = fit.group_weights(["a", "b", "c"], laws, tau, budget, floor_share=3 * floor)
  A = np.array([3.0, 1.0, 2.0])
  beta = np.array([0.5, 0.2, 0.35])
  loss = lambda x: A * (x + tau @ x) ** -beta
  w = 1.0 / loss(np.full(3, budget / 3))  # relative: each task's loss under the equal split

  res = minimize(lambda z: float(np.sum(w * loss(z * budget))), np.full(3, 1 / 3), method="SLSQP",
                 bounds=[(floor, 1.0)] * 3, constraints=[{"type": "eq", "fun": lambda z: z.sum() - 1}],
                 options={"ftol": 1e-14, "maxiter": 500})
  np.testing.assert_allclose([got[k] for k in "abc"], res.x, atol=2e-4)


def test_uninformed_tasks_keep_their_uniform_share():
  """A default or flat law takes no part in the allocation: its task keeps 1/n, the informed tasks split the
  rest exactly as the allocator splits it among them alone; under two informed tasks the group is uniform."""
  from m2dino_jax.advise import fit
  laws = {"a": {"E": 0.0, "A": 3.0, "beta": 0.5, "source": "fit"}, "b": {"E": 0.0, "A": 1.0, "beta": 0.2,
          "source": "fit"}, "c": {"E": 0.0, "A": 2.0, "beta": 0.3, "source": "default"},
          "d": {"E": 0.0, "A": 2.0, "beta": 0.01, "source": "fit"}}
  tau = np.zeros((4, 4))
  tau[0, 1] = 0.4
  got = fit.group_weights(list("abcd"), laws, tau, 800.0)
  assert got["c"] == got["d"] == 0.25
  alone = fit.group_weights(list("ab"), laws, tau[:2, :2], 400.0)
  assert got["a"] == pytest.approx(0.5 * alone["a"], abs=1e-9) and got["b"] == pytest.approx(0.5 * alone["b"])
  assert alone["a"] != pytest.approx(0.5, abs=1e-3)  # the allocator did move weight
  assert fit.group_weights(list("acd"), laws, tau[np.ix_([0, 2, 3], [0, 2, 3])], 600.0) == {
      t: 1 / 3 for t in "acd"}


def test_tau_is_shrunk_by_repeat_spread():
  """Against a loop: each repeat in units of the mean diagonal, positive-part James-Stein factor per entry."""
  from m2dino_jax.advise import fit
  rng = np.random.default_rng(0)
  zs = rng.normal(0.2, 0.1, size=(4, 3, 3))
  zs[:, 0, 1] = 0.3  # repeats agree exactly: kept whole
  zs[:, 1, 0] = [0.4, -0.4, 0.38, -0.38]  # mean near 0, large spread: shrunk to 0
  got = fit.shrunk_tau(zs)
  diag = np.abs(np.diag(zs.mean(0)))
  want = np.zeros((3, 3))
  for i in range(3):
    for j in range(3):
      if i != j:
        t = zs[:, i, j] / diag[i]
        m, se2 = t.mean(), t.var(ddof=1) / len(t)
        want[i, j] = min(max(m * max(0.0, 1 - se2 / m ** 2), 0.0), fit.TAU_MAX)
  np.testing.assert_allclose(got, want, atol=1e-12)
  assert got[0, 1] == pytest.approx(0.3 / diag[0]) and got[1, 0] == 0.0
  assert not fit.shrunk_tau(zs[:1]).any()  # one repeat: no spread to judge by, transfer-blind


def test_advised_config_needs_advice_and_trainer_reads_groups(tmp_path):
  from m2dino_jax import configlib, fileio
  from m2dino_jax.advise import adviceio
  from m2dino_jax.train.multitask import trainer
  with pytest.raises(ConfigError, match="advice"):
    configlib.load_config("configs/m2dino.py:paradigm=advised")
  path = fileio.write_json(tmp_path / "advice.json", {"format": adviceio.FORMAT, "groups": {
      "g1": ["breast_2cls", "lung_2cls"], "g2": ["fetal_head"]}, "weights": {
      "breast_2cls": 0.7, "lung_2cls": 0.3, "fetal_head": 1.0}})
  c = configlib.load_config(f"configs/m2dino.py:paradigm=advised,advice={path},tasks=fetal_head+breast_2cls+lung_2cls")
  plan = {n: [t.name for t in ts] for n, ts in trainer.plan_models(c)}
  assert plan == {"g1": ["breast_2cls", "lung_2cls"], "g2": ["fetal_head"]}
  from m2dino_jax.data import mixture
  w = mixture.mixture_weights("json", {"breast_2cls": 10, "lung_2cls": 10}, weights_file=str(path))
  assert w == pytest.approx({"breast_2cls": 0.7, "lung_2cls": 0.3})
  bad = fileio.write_json(tmp_path / "bad.json", {"format": adviceio.FORMAT, "groups": {"g": ["nope"]}})
  with pytest.raises(ConfigError):
    trainer.parse_groups(str(bad))


def test_transfer_graph_draws_the_strongest_off_diagonal_entries(tmp_path):
  from m2dino_jax.advise import plot
  rng = np.random.default_rng(3)
  tasks = [f"t{i}" for i in range(5)]
  m = rng.normal(size=(5, 5))
  advice = {"tasks": tasks, "transfer": m.tolist(), "groups": {"a": tasks[:2], "b": tasks[2:]}}
  off = [(abs(m[i, j]), tasks[j], tasks[i], m[i, j]) for i in range(5) for j in range(5) if i != j]
  expect = [(s, d, v) for _, s, d, v in sorted(off, reverse=True)[:4]]
  edges = plot.graph_edges(advice, top=4)
  assert [(s, d) for s, d, _ in edges] == [(s, d) for s, d, _ in expect]
  assert [v for *_, v in edges] == pytest.approx([v for *_, v in expect])
  assert len(plot.graph_edges(advice)) == 10  # default: 2 x tasks
  path = plot.transfer_graph(advice, tmp_path / "g.png")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
