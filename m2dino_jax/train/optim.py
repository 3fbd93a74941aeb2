"""Optimiser: AdamW with linear warm-up + cosine decay, layer-wise lr decay, head lr multiplier,
global-norm clipping and frozen parameter groups.

The Adam direction and decoupled weight decay come from optax (`scale_by_adam` +
`add_decayed_weights`); the learning rate is applied afterwards as `-lr(step) * scale(param)`,
where `scale` folds in layer decay (block i of L gets decay**(L - i), embeddings decay**(L + 1))
and freezing (scale 0). The step count comes from the global step, so a head updated only when
its task is sampled still follows the global schedule. No weight decay on biases, norms,
LayerScale, tokens or position embeddings.

Freezing (`freeze`): a preset or a comma list of parameter-path patterns over 'encoder.<path>', e.g.
'encoder.patch_embed,encoder.blocks.*.attn'. A pattern matches a parameter when its dot-separated parts
match the path's leading parts (fnmatch per part); a pattern starting with '!' unfreezes what it matches.
Presets: 'none'; 'backbone' = every encoder weight except the MoE experts and routers (the paper's
"frozen DINOv3 backbone, trainable MoE blocks and heads"); 'all_but_heads' = the whole encoder. Frozen
parameters get no gradient (stop_gradient: they drop out of the clipping norm), no optimiser state
(`optax.masked`) and no update (bit-identical after training). Heads are always trained.
"""

from __future__ import annotations

import fnmatch
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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
      "freeze": "none",  # 'none' | 'backbone' | 'all_but_heads' | patterns, e.g. 'encoder.blocks.*.attn'
      "freeze_encoder": False,  # = freeze 'all_but_heads'
      "frozen_blocks": "",  # e.g. '0,1,2' or 'embed,0,1'
  })


def lr_schedule(cfg, total_steps: int):
  warm = int(cfg.warmup_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warm else cfg.lr, peak_value=cfg.lr, warmup_steps=warm,
      decay_steps=max(total_steps, warm + 1), end_value=cfg.min_lr)


def _path_str(path) -> str:
  parts = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
  return "/".join(p for p in parts if p != ".value")


# MoE parameters inside an encoder block's `mlp` (models/moe.py): experts, router and task conditioning
MOE_PARAMS = ("w_in", "b_in", "w_out", "b_out", "router", "task_bias", "task_gate")
FREEZE_PRESETS = {
    "none": (),
    "backbone": ("encoder", *(f"!encoder.blocks.*.mlp.{n}" for n in MOE_PARAMS)),
    "all_but_heads": ("encoder",),
}


def _freeze_patterns(cfg) -> list[str]:
  items = [s.strip() for s in str(cfg.get("freeze", "none") or "none").split(",") if s.strip()]
  out: list[str] = []
  for item in items:
    out += FREEZE_PRESETS.get(item, (item,))
  if cfg.get("freeze_encoder", False):
    out.append("encoder")
  return out


def _matches(pattern: str, dotted: str) -> bool:
  pat, parts = pattern.split("."), dotted.split(".")
  return len(parts) >= len(pat) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pat))


def frozen_mask(params, cfg, depth: int):
  """Tree of bools over the encoder params: True = frozen (`freeze` patterns, `freeze_encoder`,
  `frozen_blocks`). A pattern that matches no parameter, or one that names the heads, is a ConfigError."""
  patterns = _freeze_patterns(cfg)
  blocks = _frozen_set(cfg.get("frozen_blocks", ""))
  bad = [f for f in blocks if f != "embed" and not (f.isdigit() and int(f) < depth)]
  if bad:
    raise ConfigError("optim.frozen_blocks", f"{bad} are not block indices < {depth} or 'embed'")
  for p in patterns:
    if p.lstrip("!").split(".")[0] != "encoder":
      raise ConfigError("optim.freeze", f"'{p}': patterns start with 'encoder.' (heads are always trained); "
                        f"presets: {', '.join(FREEZE_PRESETS)}")
  names = [_path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  dotted = ["encoder." + n.replace("/", ".") for n in names]
  for p in patterns:
    if not p.startswith("!") and not any(_matches(p, d) for d in dotted):
      raise ConfigError("optim.freeze", f"'{p}' matches no encoder parameter (e.g. {dotted[0]})")

  def frozen(path, _):
    name = _path_str(path)
    d = "encoder." + name.replace("/", ".")
    on = any(_matches(p, d) for p in patterns if not p.startswith("!"))
    off = any(_matches(p[1:], d) for p in patterns if p.startswith("!"))
    return (on and not off) or _group(name, depth)[1] in blocks

  return jax.tree_util.tree_map_with_path(frozen, params)


def count_params(params, mask=None) -> tuple[int, int]:
  """(trainable, total) element counts; `mask` (True = frozen) as from `frozen_mask`."""
  sizes = [int(np.prod(np.shape(x))) for x in jax.tree.leaves(params)]
  frozen = jax.tree.leaves(mask) if mask is not None else [False] * len(sizes)
  return sum(n for n, f in zip(sizes, frozen) if not f), sum(sizes)


def stop_frozen(params, mask):
  """stop_gradient on the frozen leaves: their gradient is a symbolic zero (no backward work for them)."""
  if mask is None:
    return params
  return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, mask)


def _no_decay(name: str, leaf) -> bool:
  return jnp.ndim(leaf) < 2 or "token" in name or "pos_embed" in name


def adam_tx(cfg, frozen=None) -> optax.GradientTransformation:
  """Adam direction + decoupled weight decay (the learning rate is applied by `apply`). `frozen` (a tree
  of bools, True = frozen, from `frozen_mask`) gives those leaves no state and a zero update."""
  def mask(params):
    return jax.tree_util.tree_map_with_path(lambda p, x: not _no_decay(_path_str(p), x), params)
  adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  tx = optax.chain(adam, optax.add_decayed_weights(cfg.weight_decay, mask))
  if frozen is None or not any(jax.tree.leaves(frozen)):
    return tx
  trainable = jax.tree.map(lambda f: not f, frozen)
  return optax.chain(optax.masked(tx, trainable), optax.masked(optax.set_to_zero(), frozen))


def _frozen_set(spec: str) -> set[str]:
  return {s.strip() for s in str(spec).split(",") if s.strip()}


def _group(name: str, depth: int) -> tuple[int, str]:
  """(layer for layer decay, frozen_blocks group) of an encoder parameter path."""
  m = re.match(r"blocks/(\d+)/", name)
  if m:
    return int(m.group(1)) + 1, m.group(1)
  if name.startswith("norm/"):
    return depth + 1, "norm"
  return 0, "embed"


def encoder_lr_scales(params, cfg, depth: int):
  """Per-parameter multipliers for the encoder: layer decay, and 0 where frozen (`frozen_mask`)."""
  frozen = frozen_mask(params, cfg, depth)

  def scale(path, _, is_frozen):
    layer, _ = _group(_path_str(path), depth)
    return 0.0 if is_frozen else float(cfg.layer_decay) ** (depth + 1 - layer)

  return jax.tree_util.tree_map_with_path(scale, params, frozen)


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
