"""Pure train and eval programs of the multi-task model: one compiled program per task type.

Every batch holds one task. The program of a task type takes the whole TrainState and the batch, finds
the task's head among the type's heads from `batch["task_id"]` (a constant lookup table) and runs that
head with `lax.switch`: the encoder is traced once, each head once, so a 27-task model compiles 4 train
programs instead of 27, and adding a task of an existing type adds one branch, not one program.
Heads of other tasks are untouched: the optimiser update of the type's heads runs under `lax.cond` on
the head index (inactive heads keep their parameters and optimiser state bit for bit, as PyTorch's
skipped None grads), and heads of other types simply pass through (donated, aliased).

Eval programs return the type's post-processed prediction (class map, probabilities, coordinates), padded
with zeros to the largest class / point count of the type so that every branch has one shape; the host
crops it back (`types.TaskType.crop`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2dino_jax.models import moe as moe_lib
from m2dino_jax.tasks import registry, types
from m2dino_jax.train import optim
from m2dino_jax.train.core import TrainState


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the programs need from the config, read once."""
  lr_schedule: object
  tx: object
  head_lr_mult: float
  clip_norm: float
  loss_cfg: object
  enc_scales: object  # per-parameter lr multipliers of the encoder (layer decay, freezing)
  enc_tx: object = None  # the encoder's transformation (frozen leaves: no state); None = tx
  enc_frozen: object = None  # tree of bools over the encoder params, True = frozen (optim.frozen_mask)
  window_weight: float = 0.0  # MoE routing_loss 'window' (state.extras holds the window; see models/moe.py)


def forward_encoder(enc_gdef, enc_params, enc_rest, batch, *, train: bool, key=None):
  """The encoder output dict and its MoE aux list."""
  # fresh Variables at this trace level, so stateful streams may advance inside grad
  enc_rest = jax.tree.map(lambda x: x, enc_rest)
  encoder = nnx.merge(enc_gdef, enc_params, enc_rest)
  if train and key is not None and jax.tree.leaves(enc_rest):
    # stateful streams (MoE router jitter) restart from the step key: the step stays a pure function of
    # (state, batch) and a resumed run draws the same noise
    key, jitter_key = jax.random.split(key)
    nnx.reseed(encoder, jitter=jitter_key)
  out = encoder(batch["image"], batch["task_id"], train=train, key=key)
  return out, out["moe_aux"]


def _split_static(enc_out: dict):
  """Encoder output -> (array part, a function restoring the full dict): `lax.switch` operands must be arrays,
  while the patch grid is a static Python tuple the heads compute shapes from."""
  arrays = {k: v for k, v in enc_out.items() if k not in ("grid", "moe_aux")}
  return arrays, lambda a: {**a, "grid": enc_out["grid"]}


def bound_inputs(tasks: list[registry.Task], task_weights: dict, enc_rest) -> dict:
  """The per-model inputs bound to a program: the encoder's non-trained state, the task id -> head position
  table and the type's loss weights. Inputs, not constants, so models of equal shapes (TS's many models)
  lower to the same program and share it through the compilation cache."""
  table = np.zeros(registry.NUM_TASKS, np.int32)
  for i, t in enumerate(tasks):
    table[t.task_id] = i
  return {"enc_rest": enc_rest, "head_of_task": table,
          "weights": np.asarray([task_weights.get(t.name, 1.0) for t in tasks], np.float32)}


def _head_index(bound, batch):
  """Position of the batch's task among the type's heads (one task per batch: the first example's id)."""
  return bound["head_of_task"][batch["task_id"][0]]


def _moe_metrics(moe_aux) -> tuple[jax.Array, dict]:
  aux = sum((a["aux_loss"] for a in moe_aux), jnp.zeros(()))
  if not moe_aux:
    return aux, {}
  return aux, {"moe_drop_fraction": jnp.mean(jnp.stack([a["drop_fraction"] for a in moe_aux])),
               "moe_router_entropy": jnp.mean(jnp.stack([a["router_entropy"] for a in moe_aux]))}


def train_program(enc_gdef, head_gdefs: dict, tasks: list[registry.Task], s: Settings):
  """`program(state, batch, bound) -> (state, metrics)` for the heads of `tasks` (one task type); `bound`
  comes from `bound_inputs`."""
  names = [t.name for t in tasks]

  def head_loss(i, restore):
    def branch(head_params, enc_arrays, batch):
      pred = nnx.merge(head_gdefs[names[i]], head_params[i])(restore(enc_arrays), batch["image"].shape[1:3])
      return types.task_loss(tasks[i], pred, batch, s.loss_cfg)
    return branch

  def program(state: TrainState, batch: dict, bound: dict):
    idx = _head_index(bound, batch)
    key = state.key()
    heads = tuple(state.params["heads"][n] for n in names)

    def loss_fn(enc_params, head_params):
      enc_params = optim.stop_frozen(enc_params, s.enc_frozen)
      enc_out, moe_aux = forward_encoder(enc_gdef, enc_params, bound["enc_rest"], batch, train=True, key=key)
      arrays, restore = _split_static(enc_out)
      branches = [head_loss(i, restore) for i in range(len(names))]
      loss, metrics = jax.lax.switch(idx, branches, head_params, arrays, batch)
      aux, moe_metrics = _moe_metrics(moe_aux)
      window, extras = moe_lib.window_balance(state.extras, moe_aux, state.step, s.window_weight)
      aux = aux + window
      return bound["weights"][idx] * loss + aux, (loss, aux, extras, {**metrics, **moe_metrics})

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (total, (loss, aux, extras, metrics)), grads = grad_fn(state.params["encoder"], heads)
    # inactive heads have zero gradients: the global norm is that of (encoder, active head)
    (g_enc, g_heads), gnorm = optim.clip(grads, s.clip_norm)
    lr = s.lr_schedule(state.step)
    enc_tx = s.tx if s.enc_tx is None else s.enc_tx
    enc, opt_enc = optim.apply(enc_tx, g_enc, state.opt_state["encoder"], state.params["encoder"], lr, s.enc_scales)
    new_heads, new_opt = dict(state.params["heads"]), dict(state.opt_state["heads"])
    for i, n in enumerate(names):
      update = lambda h, o, g: optim.apply(s.tx, g, o, h, lr * s.head_lr_mult)
      keep = lambda h, o, g: (h, o)
      new_heads[n], new_opt[n] = jax.lax.cond(idx == i, update, keep, heads[i], state.opt_state["heads"][n],
                                              g_heads[i])
    new = state.replace(step=state.step + 1, params={"encoder": enc, "heads": new_heads},
                        opt_state={"encoder": opt_enc, "heads": new_opt}, extras=extras)
    return new, {"loss": total, "task_loss": loss, "moe_aux_loss": aux, "grad_norm": gnorm, "lr": lr, **metrics}

  program.__name__ = program.__qualname__ = f"train_{tasks[0].type}"  # the name in compile logs
  return program


def _pad_to(x, shape):
  return jnp.pad(x, [(0, w - d) for d, w in zip(x.shape, shape)])


def eval_program(enc_gdef, head_gdefs: dict, tasks: list[registry.Task]):
  """`program(params, batch, bound) -> (prediction, usage)`: the type's post-processed prediction on the
  canvas, zero-padded to the type's largest head output, and the routing counts per MoE layer [layers, tasks,
  experts] (None without MoE)."""
  names = [t.name for t in tasks]

  def head_pred(i, restore, image_hw):
    def branch(head_params, enc_arrays):
      pred = nnx.merge(head_gdefs[names[i]], head_params[i])(restore(enc_arrays), image_hw)
      return types.of(tasks[i]).postprocess(pred)
    return branch

  def program(params, batch, bound):
    enc_out, moe_aux = forward_encoder(enc_gdef, params["encoder"], bound["enc_rest"], batch, train=False)
    heads = tuple(params["heads"][n] for n in names)
    arrays, restore = _split_static(enc_out)
    branches = [head_pred(i, restore, batch["image"].shape[1:3]) for i in range(len(names))]
    shapes = [jax.eval_shape(b, heads, arrays) for b in branches]
    full = tuple(max(s.shape[d] for s in shapes) for d in range(len(shapes[0].shape)))
    padded = [lambda h, e, b=b: _pad_to(b(h, e), full) for b in branches]
    pred = jax.lax.switch(_head_index(bound, batch), padded, heads, arrays)
    usage = jnp.stack([a["task_usage"] for a in moe_aux]) if moe_aux else None  # [MoE layers, tasks, E]
    return pred, usage

  program.__name__ = program.__qualname__ = f"eval_{tasks[0].type}"
  return program
