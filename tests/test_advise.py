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
