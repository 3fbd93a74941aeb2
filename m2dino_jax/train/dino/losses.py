"""DINOv2 self-distillation losses: DINO (CLS), iBOT (masked patches), KoLeo, teacher centring, monitors.

Conventions (DINOv2 `ssl_meta_arch.py`, REFERENCE.md section 4):
  teacher targets  softmax((t - c) / T_t) with an EMA centre c (updated after the step from the batch mean,
                   momentum 0.9), or Sinkhorn-Knopp on exp(t / T_t) with global sums (3 rounds), or none.
  DINO             mean over (student crop, teacher global crop) pairs of different views of the batch-mean
                   cross-entropy -sum(p_t * log_softmax(s / T_s)).
  iBOT             the same cross-entropy on the masked patches of the global crops, each patch weighted
                   1 / n_masked(image), summed, divided by the number of global crops (images with no mask
                   add 0). Masks are static [N, P] booleans: nothing is gathered, so shapes never change.
  KoLeo            -mean(log ||x_i - x_nn(i)||) on L2-normalised CLS features, per group of `group` rows.
All functions are pure and take logits in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_centered(teacher_logits, center, temp):
  """softmax((t - center) / temp) over the last axis."""
  return jax.nn.softmax((teacher_logits - center) / temp, axis=-1)


def sinkhorn_knopp(teacher_logits, temp, n_iter: int = 3, weights=None):
  """DINOv2's Sinkhorn-Knopp targets [B, K]. `weights` [B] (0/1) marks valid rows (masked patches); the
  sums run over valid rows only and invalid rows come back 0. Over a sharded batch the sums are global
  (jit inserts the all-reduces), as DINOv2's all_reduce."""
  logits = teacher_logits.astype(jnp.float32) / temp
  if weights is None:
    weights = jnp.ones(logits.shape[0], jnp.float32)
  w = weights.astype(jnp.float32)[:, None]
  # exp relative to the global max: Q is normalised by its total next, so the shift cancels
  q = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(jnp.where(w > 0, logits, -jnp.inf)))) * w
  n = jnp.maximum(jnp.sum(w), 1.0)
  k = logits.shape[-1]
  q = q / jnp.sum(q)
  for _ in range(n_iter):
    q = q / jnp.maximum(jnp.sum(q, axis=0, keepdims=True), 1e-30) / k  # prototypes: 1/K each
    q = q / jnp.maximum(jnp.sum(q, axis=1, keepdims=True), 1e-30) / n * w  # samples: 1/n each
  return q * n


def teacher_targets(logits, center, temp, mode: str, n_iter: int = 3, weights=None):
  if mode == "ema":
    return softmax_centered(logits, center, temp)
  if mode == "sinkhorn":
    return sinkhorn_knopp(logits, temp, n_iter, weights)
  if mode == "none":
    return jax.nn.softmax(logits / temp, axis=-1)
  raise ValueError(f"unknown centering '{mode}'")


def cross_entropy(targets, student_logits, student_temp):
  """-sum(targets * log_softmax(s / T_s), -1) per row."""
  return -jnp.sum(targets * jax.nn.log_softmax(student_logits / student_temp, axis=-1), axis=-1)


def dino_loss(student_global, student_local, teacher_global, student_temp):
  """student_global [G, B, K], student_local [L, B, K] (L may be 0), teacher targets [G, B, K] -> scalar.

  Pairs: every student crop with every teacher global crop of another view (global i vs global j != i,
  local l vs every global); loss = sum over pairs of the batch-mean CE / number of pairs."""
  g = teacher_global.shape[0]
  total, pairs = 0.0, 0
  for i in range(g):
    for j in range(g):
      if i != j:
        total += jnp.mean(cross_entropy(teacher_global[j], student_global[i], student_temp))
        pairs += 1
  for l in range(student_local.shape[0]):
    for j in range(g):
      total += jnp.mean(cross_entropy(teacher_global[j], student_local[l], student_temp))
      pairs += 1
  return total / pairs


def ibot_loss(student_patches, teacher_targets_patches, masks, student_temp):
  """student_patches [N, P, K] logits, teacher targets [N, P, K], masks [N, P] bool -> scalar."""
  m = masks.astype(jnp.float32)
  ce = cross_entropy(teacher_targets_patches, student_patches, student_temp)  # [N, P]
  per_image = jnp.sum(ce * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
  return jnp.sum(per_image) / masks.shape[0]


def koleo_loss(x, group: int = 0, eps: float = 1e-8):
  """Kozachenko-Leonenko entropy estimator term on rows of x [B, D], per group of `group` rows (0: all)."""
  b = x.shape[0]
  group = b if group <= 0 else group
  if b % group:
    raise ValueError(f"KoLeo group {group} does not divide the batch {b}")
  x = x.astype(jnp.float32)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
  xg = x.reshape(b // group, group, -1)
  dots = jnp.einsum("gid,gjd->gij", xg, xg)
  dots = jnp.where(jnp.eye(group, dtype=bool), -1.0, dots)
  nn = jnp.argmax(dots, axis=-1)
  neighbour = jnp.take_along_axis(xg, nn[..., None], axis=1)
  # torch.nn.PairwiseDistance(eps=1e-8): || x - y + eps ||
  dist = jnp.linalg.norm(xg - neighbour + eps, axis=-1)
  return -jnp.mean(jnp.log(dist + eps))


def ema_center(center, teacher_logits, momentum, weights=None):
  """center * m + mean(teacher logits over rows) * (1 - m); `weights` selects rows (masked patches)."""
  t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).astype(jnp.float32)
  if weights is None:
    mean = jnp.mean(t, axis=0, keepdims=True)
  else:
    w = weights.reshape(-1, 1).astype(jnp.float32)
    mean = jnp.sum(t * w, axis=0, keepdims=True) / jnp.maximum(jnp.sum(w), 1.0)
  return center * momentum + mean * (1.0 - momentum)


# ----------------------------------------------------------------------------- collapse monitors


def mean_entropy(p, eps: float = 1e-12):
  """Mean over rows of the entropy (nats) of distributions p [..., K]."""
  return jnp.mean(-jnp.sum(p * jnp.log(p + eps), axis=-1))


def kl_divergence(p, student_logits, student_temp, eps: float = 1e-12):
  """Mean KL(p || softmax(s / T_s))."""
  logq = jax.nn.log_softmax(student_logits / student_temp, axis=-1)
  return jnp.mean(jnp.sum(p * (jnp.log(p + eps) - logq), axis=-1))


def rankme(embeddings, eps: float = 1e-7):
  """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of [B, D]."""
  s = jnp.linalg.svd(embeddings.astype(jnp.float32), compute_uv=False)
  p = s / jnp.sum(s) + eps
  return jnp.exp(-jnp.sum(p * jnp.log(p)))
