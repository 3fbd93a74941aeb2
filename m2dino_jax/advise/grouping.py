"""Groups that maximise within-group transfer under a group-count budget.

Score of a partition P of tasks with a symmetric pairwise transfer S (S[i, j] = S[j, i], diagonal ignored):
  score(P) = sum over groups g in P of sum_{i < j in g} S[i, j]
so tasks with negative transfer are pulled apart and tasks with positive transfer pulled together
(correlation clustering). At most `max_groups` groups (= models to train). Singletons score 0: a task alone is
a task-specific model.

* exact: enumerates every partition with <= max_groups blocks as restricted growth strings (canonical labels,
  a fixed order), vectorised in NumPy; ties go to the first in that order, so the answer is deterministic.
  Feasible to about 10-11 tasks (Bell(10) = 115,975 partitions).
* heuristic (more tasks): greedy agglomeration (merge the pair of groups with the best gain, forced merges
  while above max_groups) then single-task moves to a local optimum, from the greedy start and `restarts`
  random starts drawn from `seed`; the best is kept.
  Stated bound, checked after the fact: every partition scores <= U = sum_{i<j} max(S[i, j], 0) (all positive
  pairs together, no negative pair); the result reports `upper_bound` = U and `gap` = U - score, so the
  heuristic is within `gap` of the optimum. On instances small enough for both, tests compare it with exact.
"""

from __future__ import annotations

import itertools

import numpy as np

EXACT_MAX_TASKS = 10


def symmetric(m) -> np.ndarray:
  m = np.asarray(m, np.float64)
  s = 0.5 * (m + m.T)
  np.fill_diagonal(s, 0.0)
  return s


def score(s: np.ndarray, labels) -> float:
  labels = np.asarray(labels)
  same = labels[:, None] == labels[None, :]
  return float(np.sum(np.triu(s * same, 1)))


def upper_bound(s: np.ndarray) -> float:
  return float(np.sum(np.triu(np.maximum(s, 0.0), 1)))


def canonical(labels) -> tuple[int, ...]:
  """Relabels groups in order of first appearance (a restricted growth string)."""
  seen: dict[int, int] = {}
  return tuple(seen.setdefault(int(x), len(seen)) for x in labels)


def partitions(n: int, max_groups: int):
  """Every partition of range(n) into <= max_groups blocks, as restricted growth strings, in lexicographic
  order."""
  if n == 0:
    yield ()
    return
  labels = [0] * n

  def rec(i, used):
    if i == n:
      yield tuple(labels)
      return
    for g in range(min(used + 1, max_groups)):
      labels[i] = g
      yield from rec(i + 1, max(used, g + 1))

  yield from rec(1, 1)


def exact(s, max_groups: int) -> tuple[tuple[int, ...], float]:
  """The best partition by enumeration (first in lexicographic order among ties) and its score."""
  s = symmetric(s)
  n = s.shape[0]
  iu = np.triu_indices(n, 1)
  w = s[iu]
  best, best_score = None, -np.inf
  chunk = []

  def flush():
    nonlocal best, best_score
    lab = np.asarray(chunk)
    scores = (lab[:, iu[0]] == lab[:, iu[1]]) @ w
    k = int(np.argmax(scores))
    if scores[k] > best_score + 1e-12:
      best, best_score = tuple(int(x) for x in lab[k]), float(scores[k])
    chunk.clear()

  for p in partitions(n, max_groups):
    chunk.append(p)
    if len(chunk) == 4096:
      flush()
  if chunk:
    flush()
  return best, best_score


def _local_search(s, labels, max_groups: int) -> list[int]:
  """Moves single tasks to the group (or a new group, if allowed) that raises the score most, until none does."""
  labels = list(labels)
  n = len(labels)
  improved = True
  while improved:
    improved = False
    for i in range(n):
      groups = sorted(set(labels))
      gain_to = {g: sum(s[i, j] for j in range(n) if j != i and labels[j] == g) for g in groups}
      current = gain_to[labels[i]]
      options = dict(gain_to)
      alone = sum(1 for x in labels if x == labels[i]) == 1
      if len(groups) < max_groups and not alone:
        options[max(groups) + 1] = 0.0
      g_best = max(options, key=lambda g: (options[g], -g))
      if options[g_best] > current + 1e-12:
        labels[i] = g_best
        improved = True
  return list(canonical(labels))


def _greedy(s, max_groups: int) -> list[int]:
  n = s.shape[0]
  groups = [[i] for i in range(n)]
  while len(groups) > 1:
    best, pair = -np.inf, None
    for a, b in itertools.combinations(range(len(groups)), 2):
      gain = float(s[np.ix_(groups[a], groups[b])].sum())
      if gain > best:
        best, pair = gain, (a, b)
    if best <= 0 and len(groups) <= max_groups:
      break
    a, b = pair
    groups[a] = groups[a] + groups[b]
    del groups[b]
  labels = [0] * n
  for g, members in enumerate(groups):
    for i in members:
      labels[i] = g
  return list(canonical(labels))


def heuristic(s, max_groups: int, *, seed: int = 0, restarts: int = 8) -> tuple[tuple[int, ...], float]:
  s = symmetric(s)
  n = s.shape[0]
  rng = np.random.default_rng(seed)
  starts = [_greedy(s, max_groups)]
  starts += [list(rng.integers(0, max_groups, n)) for _ in range(restarts)]
  best, best_score = None, -np.inf
  for start in starts:
    labels = tuple(_local_search(s, canonical(start), max_groups))
    sc = score(s, labels)
    if sc > best_score + 1e-12:
      best, best_score = labels, sc
  return best, best_score


def best_groups(s, max_groups: int, *, seed: int = 0, exact_max_tasks: int = EXACT_MAX_TASKS) -> dict:
  """{'labels', 'score', 'upper_bound', 'gap', 'method'} for the symmetric transfer s (n, n)."""
  s = symmetric(s)
  n = s.shape[0]
  max_groups = max(1, min(int(max_groups), n))
  if n <= exact_max_tasks:
    labels, sc = exact(s, max_groups)
    method = "exact"
  else:
    labels, sc = heuristic(s, max_groups, seed=seed)
    method = "heuristic"
  ub = upper_bound(s)
  return {"labels": list(labels), "score": sc, "upper_bound": ub, "gap": ub - sc, "method": method,
          "max_groups": max_groups}
