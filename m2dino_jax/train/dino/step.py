"""The DINOv2 train step: a pure `(state, batch) -> (state, metrics)` on the shared TrainState.

  state.params   {"backbone", "head"}: the student (trained)
  state.extras   {"teacher": {"backbone", "head"}, "center": [1, K], "ibot_center": [1, K]}
  state.opt_state  optax.scale_by_adam over the student

One step: teacher forward on the 2 global crops (no grad, no drop-path, no masks) -> targets (centred
softmax or Sinkhorn-Knopp at the scheduled temperature); student forward on the masked global crops and the
local crops (drop-path on) -> DINO + iBOT + KoLeo; per-module clipping (backbone, head; DINOv2); AdamW with
scheduled lr / weight decay, layer decay, patch-embedding x0.2 and the prototype layer frozen for the first
`freeze_last_layer_steps`; then the EMA teacher with the scheduled momentum (from the updated student) and
the EMA centres. Global and local crops have their own shapes; the step is compiled once for both.
iBOT runs the head only on the first `max_masked` patch positions of each image (a static bound: the
block-mask generator never masks more), with validity weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from m2dino_jax.train import optim
from m2dino_jax.train.core import TrainState
from m2dino_jax.train.dino import losses, schedules


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the step needs from the config, read once (bound, never passed per call)."""
  enc_gdef: object
  head_gdef: object
  enc_rest: object
  lr: object
  wd: object
  momentum: object
  teacher_temp: object
  student_temp: float
  centering: str
  sinkhorn_iters: int
  center_momentum: float
  dino_weight: float
  ibot_weight: float
  koleo_weight: float
  koleo_group: int
  clip: float
  freeze_last_layer_steps: int
  max_masked: int
  scales: object  # per-parameter lr multipliers of the student (layer decay, patch-embed x0.2)


def settings_from_config(config, enc_gdef, head_gdef, enc_rest, params, depth: int, total: int,
                         max_masked: int) -> Settings:
  o, lo = config.optim, config.loss
  epoch = int(config.epoch_length)
  lr = schedules.scaled_lr(o.base_lr, config.data.batch_size) if o.scale_lr else float(o.base_lr)
  layer_cfg = optim.default_optim_config()
  layer_cfg.layer_decay = float(o.layer_decay)
  bb = optim.encoder_lr_scales(params["backbone"], layer_cfg, depth)
  bb = jax.tree_util.tree_map_with_path(
      lambda p, s: s * float(o.patch_embed_lr_mult) if "patch_embed" in optim._path_str(p) else s, bb)
  head = jax.tree.map(lambda _: 1.0, params["head"])
  return Settings(
      enc_gdef=enc_gdef, head_gdef=head_gdef, enc_rest=enc_rest,
      lr=schedules.cosine(lr, o.min_lr, total, int(o.warmup_epochs * epoch)),
      wd=schedules.cosine(o.weight_decay, o.weight_decay_end, total),
      momentum=schedules.cosine(config.teacher.momentum, config.teacher.final_momentum, total),
      teacher_temp=schedules.linear_warmup_then_constant(
          config.teacher.warmup_temp, config.teacher.temp, int(config.teacher.warmup_temp_epochs * epoch)),
      student_temp=float(lo.student_temp), centering=str(lo.centering), sinkhorn_iters=int(lo.sinkhorn_iters),
      center_momentum=float(lo.center_momentum), dino_weight=float(lo.dino_weight),
      ibot_weight=float(lo.ibot_weight), koleo_weight=float(lo.koleo_weight), koleo_group=int(lo.koleo_group),
      clip=float(o.clip_grad), freeze_last_layer_steps=int(o.freeze_last_layer_epochs * epoch),
      max_masked=max_masked, scales={"backbone": bb, "head": head})


def crop_major(x):
  """[B, n, ...] (image-major, as sharded) -> [n * B, ...] (crop-major, DINOv2's order)."""
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def masked_positions(masks, k: int):
  """First k masked positions per row of masks [N, P] -> (indices [N, k], valid [N, k])."""
  idx = jnp.argsort(~masks, axis=-1, stable=True)[:, :k]
  return idx, jnp.take_along_axis(masks, idx, axis=-1)


def forward(s: Settings, params, images, *, train: bool, key=None, mask=None):
  encoder = nnx.merge(s.enc_gdef, params["backbone"], jax.tree.map(lambda x: x, s.enc_rest))
  return encoder(images, train=train, key=key, mask=mask)


def head_apply(s: Settings, head_params, x):
  return nnx.merge(s.head_gdef, head_params)(x)


def teacher_outputs(s: Settings, teacher, center, ibot_center, glob, masks, temp):
  """Teacher targets for the CLS tokens [2B, K] and the masked patches [2B, k, K], plus raw logits."""
  out = forward(s, teacher, glob, train=False)
  idx, valid = masked_positions(masks, s.max_masked)
  patches = jnp.take_along_axis(out["patch_tokens"], idx[..., None], axis=1)
  t_cls = head_apply(s, teacher["head"], out["cls"])
  t_patch = head_apply(s, teacher["head"], patches)
  cls_targets = losses.teacher_targets(t_cls, center, temp, s.centering, s.sinkhorn_iters)
  flat = t_patch.reshape(-1, t_patch.shape[-1])
  patch_targets = losses.teacher_targets(flat, ibot_center, temp, s.centering, s.sinkhorn_iters,
                                         weights=valid.reshape(-1)).reshape(t_patch.shape)
  return cls_targets, patch_targets, t_cls, t_patch, idx, valid


def make_step(s: Settings):
  tx = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)

  def step(state: TrainState, batch: dict):
    key = state.key()
    glob = crop_major(batch["global"])
    b = batch["global"].shape[0]
    n_local = batch["local"].shape[1]
    masks = crop_major(batch["masks"])
    temp = s.teacher_temp(state.step)
    ex = state.extras
    teacher = jax.lax.stop_gradient(ex["teacher"])
    cls_t, patch_t, t_cls, t_patch, idx, valid = teacher_outputs(s, teacher, ex["center"], ex["ibot_center"], glob,
                                                                 masks, temp)
    cls_t, patch_t = jax.lax.stop_gradient(cls_t), jax.lax.stop_gradient(patch_t)
    k_glob, k_loc = jax.random.split(key)

    def loss_fn(params):
      out = forward(s, params, glob, train=True, key=k_glob, mask=masks)
      s_cls = head_apply(s, params["head"], out["cls"])
      patches = jnp.take_along_axis(out["patch_tokens"], idx[..., None], axis=1)
      s_patch = head_apply(s, params["head"], patches)
      k = s_cls.shape[-1]
      if n_local:
        loc = crop_major(batch["local"])
        s_loc = head_apply(s, params["head"], forward(s, params, loc, train=True, key=k_loc)["cls"])
        s_loc = s_loc.reshape(n_local, b, k)
      else:
        s_loc = jnp.zeros((0, b, k), s_cls.dtype)
      dino = losses.dino_loss(s_cls.reshape(2, b, k), s_loc, cls_t.reshape(2, b, k), s.student_temp)
      ibot = losses.ibot_loss(s_patch, patch_t, valid, s.student_temp)
      cls_feat = out["cls"].reshape(2, b, -1)
      koleo = sum(losses.koleo_loss(cls_feat[i], s.koleo_group) for i in range(2))
      total = s.dino_weight * dino + s.ibot_weight * ibot + s.koleo_weight * koleo
      swapped = cls_t.reshape(2, b, k)[::-1].reshape(2 * b, k)
      kl = losses.kl_divergence(swapped, s_cls, s.student_temp)
      return total, {"dino_loss": dino, "ibot_loss": ibot, "koleo_loss": koleo, "student_teacher_kl": kl}

    (total, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    g_bb, n_bb = optim.clip(grads["backbone"], s.clip)
    g_head, n_head = optim.clip(grads["head"], s.clip)
    grads = {"backbone": g_bb, "head": g_head}
    lr, wd, mom = s.lr(state.step), s.wd(state.step), s.momentum(state.step)
    last_on = (state.step >= s.freeze_last_layer_steps).astype(jnp.float32)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)

    def upd(path, p, u, scale):
      name = optim._path_str(path)
      mult = scale * (last_on if name.startswith("head/last_") else 1.0)
      decay = wd * p if p.ndim >= 2 else 0.0  # DINOv2: no decay on biases, norms, LayerScale
      return p - (lr * mult) * (u + decay).astype(p.dtype)

    params = jax.tree_util.tree_map_with_path(upd, state.params, updates, s.scales)
    teacher_new = jax.tree.map(lambda t, p: mom * t + (1.0 - mom) * p, ex["teacher"], params)
    extras = dict(ex, teacher=teacher_new)
    if s.centering == "ema":
      extras["center"] = losses.ema_center(ex["center"], t_cls, s.center_momentum)
      extras["ibot_center"] = losses.ema_center(ex["ibot_center"], t_patch, s.center_momentum, valid)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extras=extras)
    metrics = dict(metrics, loss=total, grad_norm=jnp.sqrt(n_bb ** 2 + n_head ** 2), backbone_grad_norm=n_bb,
                   lr=lr, weight_decay=wd, momentum=mom, teacher_temp=temp,
                   teacher_entropy=losses.mean_entropy(cls_t), masked_fraction=jnp.mean(masks))
    return new, metrics

  return step
