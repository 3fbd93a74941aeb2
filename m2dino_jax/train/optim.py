"""Optimiser: AdamW with linear warm-up + cosine decay, layer-wise lr decay, head lr multiplier,
global-norm clipping and frozen parameter groups.

The Adam direction and decoupled weight decay come from optax (`scale_by_adam` +
`add_decayed_weights`); the learning rate is applied afterwards as `-lr(step) * scale(param)`,
where `scale` folds in layer decay (block i of L gets decay**(L - i), embeddings decay**(L + 1))
and freezing (scale 0). The step count comes from the global step, so a head updated only when
its task is sampled still follows the global schedule. No weight decay on biases, norms,
LayerScale, tokens or position embeddings.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

from m2dino_jax.errors import ConfigError


def default_optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "lr": 1e-4,
      "min_lr": 1e-6,
      "head_lr_mult": 10.0,
      "warmup_steps": 0,
      "weight_decay": 0.05,
      "b1": 0.9,
      "b2": 0.999,
      "eps": 1e-8,
      "clip_norm": 1.0,  # <= 0: no clipping
      "layer_decay": 1.0,  # 1.0 = off
      "freeze_encoder": False,
      "frozen_blocks": "",  # e.g. '0,1,2' or 'embed,0,1'
  })


def lr_schedule(cfg, total_steps: int):
  warm = int(cfg.warmup_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warm else cfg.lr, peak_value=cfg.lr, warmup_steps=warm,
      decay_steps=max(total_steps, warm + 1), end_value=cfg.min_lr)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _no_decay(name: str, leaf) -> bool:
  return jnp.ndim(leaf) < 2 or "token" in name or "pos_embed" in name


def adam_tx(cfg) -> optax.GradientTransformation:
  """Adam direction + decoupled weight decay (the learning rate is applied by `apply`)."""
  def mask(params):
    return jax.tree_util.tree_map_with_path(lambda p, x: not _no_decay(_path_str(p), x), params)
  adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  return optax.chain(adam, optax.add_decayed_weights(cfg.weight_decay, mask))


def _frozen_set(spec: str) -> set[str]:
  return {s.strip() for s in str(spec).split(",") if s.strip()}


def encoder_lr_scales(params, cfg, depth: int):
  """Per-parameter multipliers for the encoder: layer decay and freezing."""
  frozen = _frozen_set(cfg.frozen_blocks)
  bad = [f for f in frozen if f != "embed" and not (f.isdigit() and int(f) < depth)]
  if bad:
    raise ConfigError("optim.frozen_blocks", f"{bad} are not block indices < {depth} or 'embed'")

  def scale(path, _):
    name = _path_str(path)
    m = re.match(r"blocks/(\d+)/", name)
    if m:
      layer, group = int(m.group(1)) + 1, m.group(1)
    elif name.startswith("norm/"):
      layer, group = depth + 1, "norm"
    else:
      layer, group = 0, "embed"
    if cfg.freeze_encoder or group in frozen:
      return 0.0
    return float(cfg.layer_decay) ** (depth + 1 - layer)

  return jax.tree_util.tree_map_with_path(scale, params)


def clip(grads, max_norm: float):
  """Global-norm clipping over a whole gradient tree; returns (grads, norm before clipping)."""
  norm = optax.global_norm(grads)
  if max_norm <= 0:
    return grads, norm
  factor = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
  return jax.tree.map(lambda g: g * factor, grads), norm


def apply(tx, grads, opt_state, params, lr, scales=None):
  """One update: params - lr * scale * (adam direction + wd * params). Returns (params, opt_state)."""
  updates, opt_state = tx.update(grads, opt_state, params)
  if scales is None:
    new = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), params, updates)
  else:
    new = jax.tree.map(lambda p, u, s: p - (lr * s) * u.astype(p.dtype), params, updates, scales)
  return new, opt_state
