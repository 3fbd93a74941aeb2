"""The obviously correct MoE: Python loops over tokens and their chosen experts. Tests only.

Two phases, because routing choices are discrete: `reference_routes` decides, in NumPy and with plain
counters, which (image, token, expert) assignments are kept under the capacity rule; `reference_forward`
then evaluates the output token by token with jnp ops (so `jax.grad` gives reference gradients; the
choices are piecewise constant, so holding them fixed does not change the gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def reference_logits(p: dict, x, task_ids, conditioning: str):
  """Router logits [B, N, E] from a plain parameter dict (float32)."""
  x = jnp.asarray(x, jnp.float32)
  if conditioning == "task":
    g = p["task_gate"][jnp.asarray(task_ids)]
    return jnp.broadcast_to(g[:, None, :], x.shape[:2] + g.shape[-1:])
  return x @ p["router"] + p["task_bias"][jnp.asarray(task_ids)][:, None, :]


def reference_routes(p: dict, x, task_ids, conditioning: str, top_k: int, capacity: int | None):
  """Kept assignments as {(b, n): [expert, ...]} in gate order; capacity None = keep all.

  Priority: for each image, all first choices in token order, then all second choices.
  """
  logits = np.asarray(reference_logits(p, x, task_ids, conditioning), np.float64)
  b, n, e = logits.shape
  choices = np.argsort(-logits, axis=-1, kind="stable")[..., :top_k]
  kept: dict[tuple[int, int], list[int]] = {(i, t): [] for i in range(b) for t in range(n)}
  for i in range(b):
    counts = [0] * e
    for j in range(top_k):
      for t in range(n):
        ex = int(choices[i, t, j])
        if capacity is None or counts[ex] < capacity:
          kept[(i, t)].append(ex)
        counts[ex] += 1
  return kept, choices


def reference_expert(p: dict, e: int, v, activation: str):
  """One expert on one token vector v [D]."""
  h = v @ p["w_in"][e] + p["b_in"][e]
  if activation == "swiglu":
    half = h.shape[-1] // 2
    h = jax.nn.silu(h[:half]) * h[half:]
  else:
    h = 0.5 * h * (1.0 + jax.scipy.special.erf(h / np.sqrt(2.0)))
  return h @ p["w_out"][e] + p["b_out"][e]


def reference_forward(p: dict, x, task_ids, routes, conditioning: str, top_k: int, activation: str):
  """y [B, N, D]: for each token, sum over its kept experts of renormalised gate x expert(token)."""
  logits = reference_logits(p, x, task_ids, conditioning)
  b, n, _ = logits.shape
  kept, choices = routes
  rows = []
  for i in range(b):
    toks = []
    for t in range(n):
      probs = jax.nn.softmax(logits[i, t])
      chosen = [int(c) for c in choices[i, t]]
      denom = sum(probs[c] for c in chosen)
      out = jnp.zeros(x.shape[-1], jnp.float32)
      for ex in kept[(i, t)]:
        out = out + probs[ex] / denom * reference_expert(p, ex, x[i, t], activation)
      toks.append(out)
    rows.append(jnp.stack(toks))
  return jnp.stack(rows)


def _log_softmax(row: np.ndarray) -> np.ndarray:
  top = max(row)
  return row - (top + np.log(sum(np.exp(v - top) for v in row)))


def reference_task_loss(p: dict, x, task_ids, conditioning: str, assignment: dict[int, tuple[int, ...]]) -> float:
  """DAMEX cross-entropy: the mean over images and tokens of -1/|A_t| sum_{e in A_t} log softmax(logits)_e,
  A_t = the experts assigned to the image's task."""
  logits = np.asarray(reference_logits(p, x, task_ids, conditioning), np.float64)
  b, n, _ = logits.shape
  total = 0.0
  for i in range(b):
    experts = assignment[int(task_ids[i])]
    for t in range(n):
      logp = _log_softmax(logits[i, t])
      total += -sum(logp[e] for e in experts) / len(experts)
  return total / (b * n)


def reference_load_and_prob(p: dict, x, task_ids, conditioning: str, top_k: int):
  """(f, P): the share of top-k assignments per expert and the mean router probability, by counting."""
  logits = np.asarray(reference_logits(p, x, task_ids, conditioning), np.float64)
  b, n, e = logits.shape
  counts, prob = [0] * e, [0.0] * e
  for i in range(b):
    for t in range(n):
      probs = np.exp(_log_softmax(logits[i, t]))
      for ex in np.argsort(-probs, kind="stable")[:top_k]:
        counts[int(ex)] += 1
      for ex in range(e):
        prob[ex] += probs[ex] / (b * n)
  return np.array(counts, np.float64) / sum(counts), np.array(prob)


def reference_window_losses(loads_probs, window: int, num_experts: int) -> list[float]:
  """Switch losses of a sequence of batches, each against the mean load of itself and the window - 1
  batches before it; before the first batches the missing ones count as uniform loads (1 / E)."""
  history = [np.full(num_experts, 1.0 / num_experts)] * (window - 1)
  out = []
  for load, prob in loads_probs:
    past = history[len(history) - (window - 1):] if window > 1 else []
    mean_load = (np.asarray(load) + sum(past, np.zeros(num_experts))) / window
    out.append(float(num_experts * sum(mean_load[e] * prob[e] for e in range(num_experts))))
    history = history + [np.asarray(load)]
  return out
