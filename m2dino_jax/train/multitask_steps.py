"""Pure, jitted train and eval steps of the multi-task model (one task per batch).

The step sees only the encoder and the current task's head: heads of other tasks are not inputs,
so they cost nothing and their optimiser state is untouched (as with PyTorch's skipped None grads).
Graph definitions and hyper-parameters are static arguments; they are hashable and equal for equal
architectures, so models of the same shape (TS's many models, heads with equal class counts) share
compiled programs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from m2dino_jax.tasks import losses, registry
from m2dino_jax.train import optim


@dataclasses.dataclass(frozen=True)
class Hyper:
  """Static step settings (hashable)."""
  lr: float
  min_lr: float
  warmup_steps: int
  total_steps: int
  head_lr_mult: float
  clip_norm: float
  weight_decay: float
  b1: float
  b2: float
  eps: float = 1e-8
  dice_weight: float = 1.0
  label_smoothing: float = 0.0
  box_l1_weight: float = 1.0
  giou_weight: float = 1.0

  @classmethod
  def from_config(cls, config, total_steps: int) -> Hyper:
    o, loss = config.optim, config.loss
    return cls(lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps, total_steps=total_steps,
               head_lr_mult=o.head_lr_mult, clip_norm=o.clip_norm, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
               eps=o.eps,
               dice_weight=loss.dice_weight, label_smoothing=loss.label_smoothing,
               box_l1_weight=loss.box_l1_weight, giou_weight=loss.giou_weight)

  def loss_cfg(self) -> dict:
    return dict(dice_weight=self.dice_weight, label_smoothing=self.label_smoothing,
                box_l1_weight=self.box_l1_weight, giou_weight=self.giou_weight)

  def tx(self):
    return optim.adam_tx(self)

  def schedule(self):
    return optim.lr_schedule(self, self.total_steps)


def forward(gdefs, enc_params, enc_rest, head_params, batch, task: registry.Task, *, train: bool, key=None):
  enc_gdef, head_gdef = gdefs
  # fresh Variables at this trace level, so stateful streams may advance inside grad
  enc_rest = jax.tree.map(lambda x: x, enc_rest)
  encoder = nnx.merge(enc_gdef, enc_params, enc_rest)
  if train and key is not None and jax.tree.leaves(enc_rest):
    # stateful streams (MoE router jitter) restart from the step key: the step stays a pure function of
    # (state, batch, step) and a resumed run draws the same noise
    key, jitter_key = jax.random.split(key)
    nnx.reseed(encoder, jitter=jitter_key)
  head = nnx.merge(head_gdef, head_params)
  out = encoder(batch["image"], batch["task_id"], train=train, key=key)
  return head(out, batch["image"].shape[1:3]), out["moe_aux"]


@functools.partial(jax.jit, static_argnames=("gdefs", "task", "hp"), donate_argnames=("slc",))
def train_step(slc: dict, enc_rest, batch: dict, scales, base_key, task_weight, *, gdefs, task: registry.Task,
               hp: Hyper):
  """One update of (encoder, this task's head). `slc` holds step, encoder, head and their optimiser states."""
  step = slc["step"]
  key = jax.random.fold_in(base_key, step)

  def loss_fn(enc_params, head_params):
    pred, moe_aux = forward(gdefs, enc_params, enc_rest, head_params, batch, task, train=True, key=key)
    loss, metrics = losses.task_loss(task, pred, batch, hp.loss_cfg())
    aux = sum((a["aux_loss"] for a in moe_aux), jnp.zeros(()))
    if moe_aux:
      metrics["moe_drop_fraction"] = jnp.mean(jnp.stack([a["drop_fraction"] for a in moe_aux]))
      metrics["moe_router_entropy"] = jnp.mean(jnp.stack([a["router_entropy"] for a in moe_aux]))
    return task_weight * loss + aux, (loss, aux, metrics)

  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
  (total, (loss, aux, metrics)), grads = grad_fn(slc["encoder"], slc["head"])
  grads, gnorm = optim.clip(grads, hp.clip_norm)
  lr = hp.schedule()(step)
  tx = hp.tx()
  enc, opt_enc = optim.apply(tx, grads[0], slc["opt_encoder"], slc["encoder"], lr, scales)
  head, opt_head = optim.apply(tx, grads[1], slc["opt_head"], slc["head"], lr * hp.head_lr_mult)
  new = {"step": step + 1, "encoder": enc, "head": head, "opt_encoder": opt_enc, "opt_head": opt_head}
  return new, {"loss": total, "task_loss": loss, "moe_aux_loss": aux, "grad_norm": gnorm, "lr": lr, **metrics}


@functools.partial(jax.jit, static_argnames=("gdefs", "task"))
def eval_step(enc_params, enc_rest, head_params, batch: dict, *, gdefs, task: registry.Task):
  """Predictions on the canvas (seg: class map; cls: probabilities; det/reg: [0, 1] coordinates) and the
  tasks x experts usage summed over MoE layers (None without MoE)."""
  pred, moe_aux = forward(gdefs, enc_params, enc_rest, head_params, batch, task, train=False)
  if task.type == registry.SEGMENTATION:
    pred = jnp.argmax(pred, axis=-1).astype(jnp.uint8)
  elif task.type == registry.CLASSIFICATION:
    pred = jax.nn.softmax(pred.astype(jnp.float32), axis=-1)
  usage = sum(a["task_usage"] for a in moe_aux) if moe_aux else None
  return pred, usage
