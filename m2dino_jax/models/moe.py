"""Task-conditioned Mixture-of-Experts FFN: a drop-in for the encoder's FFN in selected blocks.

The router sees the task (one task per image) in one of two ways:
  token  logits[b, n] = x[b, n] @ W + bias[task[b]]: every token is routed, the task shifts the gate;
  task   logits[b, n] = gate[task[b]]: all tokens of a task use the same top-k experts (task-level MoE),
         so a task's expert set is inspectable and a task can be served with only its experts.
Router math runs in `router_dtype` (float32): softmax -> top-k -> renormalise over the k chosen.

Capacity (per image, the routing group): C = min(N, max(1, ceil(cf * N * k / E))); cf <= 0 is
dropless (C = N, enough for every assignment). Slots are filled in priority order: every token's first
choice (token order) before any second choice (GShard); an assignment whose slot is >= C is dropped
(its gate becomes 0; the residual carries the token). Task routing always uses C = N: capacity
balances tokens, and a task-level MoE sends whole images by design.

Back-ends (config `backend`, see moe_dispatch.py): 'dense' (einsum masks), 'dropless' (sort + grouped
matmul, never drops), 'expert_parallel' (shard_map + all_to_all). The expert-parallel back-end finds its
mesh from the `mesh` constructor argument, else from `jax.sharding.get_abstract_mesh()`, i.e. the mesh
set with `with jax.set_mesh(mesh):` around the (jitted) call. With no mesh, or an 'expert' axis of
size 1, it runs the same capacity dispatch on one device.

Routing losses (config `routing_loss`; batches hold one task each, which matters here):
  balance  Switch balance per batch, E * sum_e f_e P_e (f = share of assignments, P = mean router
           probability). With one task per batch it pushes every task toward uniform expert use: against
           the task specialisation the MoE is there for.
  window   the same loss against the load f averaged over the current batch and the `window - 1` batches
           before it (a window of tasks under the mixture): experts are balanced over the data set, while
           a task may concentrate on experts the other tasks leave free. The window's loads live in
           TrainState.extras (`init_window`, `window_balance`, called by the train step); window=1 is
           `balance` exactly.
  task     DAMEX-style (Jain et al. 2023, dataset-aware MoE): cross-entropy between each token's router
           distribution and its task's assigned experts (uniform over them), weight `task_loss_weight`.
           `task_experts` assigns experts ('name:0+1;name:2+3'; tasks not named, or '', get the round-robin
           `round_robin_experts` over all tasks; the multi-task trainer fills it per model over the model's
           tasks, so that a model's tasks get disjoint experts while there are enough).
The z-loss applies in every mode.

Auxiliary outputs (a dict of jax values, no globals): balance_loss (Switch, E * sum_e f_e P_e, 1.0 when
uniform), task_loss (the DAMEX cross-entropy), z_loss (mean logsumexp(logits)^2), aux_loss (the mode's
losses weighted), load [E] (fraction of assignments per expert, before drops), mean_prob [E] (P_e),
drop_fraction, router_entropy (mean over tokens, nats), task_usage [num_tasks, E] (assignment counts per
task, before drops; sum it over an eval pass).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from ml_collections import config_dict

from m2dino_jax.errors import ConfigError
from m2dino_jax.models import moe_dispatch

ACTIVATIONS = ("gelu", "swiglu")
CONDITIONING = ("token", "task")
BACKENDS = ("dense", "dropless", "expert_parallel")
GROUPED_MATMULS = ("auto", "ragged_dot", "blocked")
ROUTING_LOSSES = ("balance", "window", "task")


def default_moe_config() -> ml_collections.ConfigDict:
  """MoE knobs with the project defaults (MoE off; when on: last 4 blocks, E=8, top-2)."""
  return ml_collections.ConfigDict({
      "enabled": False,
      # 'last4' / 'first2' / 'all' / 'none' / '8,9,10,11', or a list of block indices (negative = from end).
      "layers": config_dict.FieldReference("last4", field_type=object),
      "num_experts": 8,
      "top_k": 2,
      "capacity_factor": 1.25,        # training; <= 0 = dropless
      "eval_capacity_factor": 0.0,    # evaluation (train=False); <= 0 = dropless
      "hidden_mult": 1.0,             # expert width = hidden_mult * dense FFN width
      "activation": "gelu",           # 'gelu' | 'swiglu'
      "router_dtype": "float32",
      "jitter": 0.0,                  # multiplicative router-input noise U(1-j, 1+j), training only
      "balance_loss_weight": 0.01,    # 'balance' and 'window'
      "z_loss_weight": 1e-3,
      "routing_loss": "balance",      # 'balance' (per batch) | 'window' (over batches) | 'task' (DAMEX-style)
      "window": 32,                   # 'window': batches the load is averaged over (1 = 'balance')
      "task_loss_weight": 0.01,       # 'task'
      "task_experts": "",             # 'task': 'name:0+1;name:2+3' ('' = round robin, see the docstring)
      "conditioning": "token",        # 'token' | 'task'
      "backend": "dense",             # 'dense' | 'dropless' | 'expert_parallel'
      "grouped_matmul": "auto",       # dropless: 'ragged_dot' | 'blocked' | 'auto' (ragged_dot on TPU)
      "block_size": 256,              # dropless 'blocked': rows per block
  })


def moe_layer_indices(spec, depth: int) -> list[int]:
  """Block indices that get an MoE FFN: 'lastK', 'firstK', 'all', 'none', '1,3,5' or a sequence."""
  if isinstance(spec, str):
    s = spec.strip().lower()
    if s in ("", "none"):
      return []
    if s == "all":
      return list(range(depth))
    for prefix in ("last", "first"):
      if s.startswith(prefix) and s[len(prefix):].isdigit():
        k = int(s[len(prefix):])
        if not 0 <= k <= depth:
          raise ConfigError("moe.layers", f"'{spec}' asks for {k} blocks of a {depth}-block encoder")
        return list(range(depth - k, depth)) if prefix == "last" else list(range(k))
    try:
      spec = [int(p) for p in s.split(",") if p.strip()]
    except ValueError:
      raise ConfigError("moe.layers", f"'{spec}': expected lastK, firstK, all, none or a list") from None
  out = set()
  for i in spec:
    if not -depth <= int(i) < depth:
      raise ConfigError("moe.layers", f"block {i} is outside a {depth}-block encoder")
    out.add(int(i) % depth)
  return sorted(out)


def validate_moe_config(cfg) -> None:
  """Raises ConfigError naming the bad key."""
  for key, allowed in (("activation", ACTIVATIONS), ("conditioning", CONDITIONING), ("backend", BACKENDS),
                       ("grouped_matmul", GROUPED_MATMULS), ("routing_loss", ROUTING_LOSSES)):
    if cfg[key] not in allowed:
      raise ConfigError(f"moe.{key}", f"'{cfg[key]}' is not one of {allowed}")
  if cfg.num_experts < 1:
    raise ConfigError("moe.num_experts", "must be >= 1")
  if not 1 <= cfg.top_k <= cfg.num_experts:
    raise ConfigError("moe.top_k", f"must be in [1, num_experts={cfg.num_experts}], got {cfg.top_k}")
  if cfg.hidden_mult <= 0 or cfg.block_size < 1 or cfg.jitter < 0:
    raise ConfigError("moe", "hidden_mult and block_size must be positive and jitter >= 0")
  if cfg.window < 1:
    raise ConfigError("moe.window", f"must be >= 1 batches, got {cfg.window}")


def round_robin_experts(task_ids, num_experts: int, top_k: int) -> dict[int, tuple[int, ...]]:
  """{task id: top_k experts}: the m-th task gets experts m*k .. m*k + k - 1 (mod E), disjoint while
  len(task_ids) * k <= E."""
  return {int(t): tuple((m * top_k + j) % num_experts for j in range(top_k)) for m, t in enumerate(task_ids)}


def task_expert_table(spec: str, num_tasks: int, num_experts: int, top_k: int) -> tuple[tuple[float, ...], ...]:
  """The DAMEX target [num_tasks, E] (rows uniform over each task's experts) from `task_experts`; a static
  tuple (hashable: it lives in the module's graph definition)."""
  from m2dino_jax.tasks import registry

  chosen = round_robin_experts(range(num_tasks), num_experts, top_k)
  for item in filter(None, (p.strip() for p in str(spec or "").split(";"))):
    name, _, members = (p.strip() for p in item.partition(":"))
    try:
      task = int(name) if name.isdigit() else registry.get(name).task_id
      experts = tuple(sorted({int(e) for e in members.split("+") if e.strip()}))
    except (ConfigError, ValueError):
      raise ConfigError("moe.task_experts", f"bad item '{item}'; use task:expert+expert;...") from None
    if not experts or not 0 <= task < num_tasks or any(not 0 <= e < num_experts for e in experts):
      raise ConfigError("moe.task_experts", f"'{item}': need a task id < {num_tasks} and experts in "
                        f"0..{num_experts - 1}")
    chosen[task] = experts
  return tuple(tuple(1.0 / len(chosen[t]) if e in chosen[t] else 0.0 for e in range(num_experts))
               for t in range(num_tasks))


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """Slots per expert per image; dropless (cf <= 0) gives num_tokens, which can never overflow."""
  if capacity_factor <= 0:
    return num_tokens
  return min(num_tokens, max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


class Routing(NamedTuple):
  logits: jax.Array     # [B, N, E] router dtype
  probs: jax.Array      # [B, N, E]
  experts: jax.Array    # [B, N, k] int32, distinct per token
  gates: jax.Array      # [B, N, k] renormalised, 0 where dropped
  positions: jax.Array  # [B, N, k] slot within (image, expert); >= capacity means dropped


def top_k_gates(logits, top_k: int):
  """softmax -> top-k -> renormalise: probabilities, chosen experts and their gates."""
  probs = jax.nn.softmax(logits, axis=-1)
  top_p, experts = jax.lax.top_k(probs, top_k)
  return probs, experts.astype(jnp.int32), top_p / jnp.sum(top_p, axis=-1, keepdims=True)


def slot_positions(experts, num_experts: int):
  """Slot of each assignment in its expert's queue for the image, first choices before second ones."""
  b, n, k = experts.shape
  hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)           # [B, N, k, E]
  by_priority = hot.transpose(0, 2, 1, 3).reshape(b, k * n, num_experts)
  before = jnp.cumsum(by_priority, axis=1) - by_priority                 # assignments ahead in the queue
  pos = jnp.sum(before * by_priority, axis=-1)
  return pos.reshape(b, k, n).transpose(0, 2, 1)


def route(logits, top_k: int, capacity: int) -> Routing:
  probs, experts, gates = top_k_gates(logits, top_k)
  positions = slot_positions(experts, logits.shape[-1])
  gates = jnp.where(positions < capacity, gates, 0.0)
  return Routing(logits, probs, experts, gates, positions)


def routing_aux(r: Routing, task_ids, num_tasks: int, capacity: int, balance_w: float, z_w: float, *,
                mode: str = "balance", task_w: float = 0.0, task_targets=None) -> dict:
  """Losses and telemetry of one routing decision (see the module docstring). `task_targets` [T, E] is
  the DAMEX target (mode 'task'); in mode 'window' the balance term is left to `window_balance`."""
  num_experts = r.probs.shape[-1]
  hot = jax.nn.one_hot(r.experts, num_experts, dtype=jnp.float32)       # [B, N, k, E]
  per_image = hot.sum(axis=(1, 2))                                       # [B, E]
  load = per_image.sum(axis=0) / jnp.maximum(per_image.sum(), 1.0)      # f_e
  mean_prob = r.probs.astype(jnp.float32).mean(axis=(0, 1))            # P_e
  balance = num_experts * jnp.sum(load * mean_prob)
  z = jnp.mean(jax.nn.logsumexp(r.logits.astype(jnp.float32), axis=-1) ** 2)
  logp = jnp.log(jnp.clip(r.probs.astype(jnp.float32), 1e-30, 1.0))
  entropy = -jnp.mean(jnp.sum(r.probs * logp, axis=-1))
  task_loss = jnp.zeros((), jnp.float32)
  if task_targets is not None:
    target = jnp.asarray(task_targets, jnp.float32)[task_ids]            # [B, E]
    log_softmax = jax.nn.log_softmax(r.logits.astype(jnp.float32), axis=-1)
    task_loss = -jnp.mean(jnp.sum(target[:, None, :] * log_softmax, axis=-1))
  dropped = jnp.mean((r.positions >= capacity).astype(jnp.float32))
  usage = jax.nn.one_hot(task_ids, num_tasks, dtype=jnp.float32).T @ per_image
  routing = {"balance": balance_w * balance, "window": 0.0, "task": task_w * task_loss}[mode]
  return {"balance_loss": balance, "task_loss": task_loss, "z_loss": z, "aux_loss": routing + z_w * z,
          "load": load, "mean_prob": mean_prob, "drop_fraction": dropped, "router_entropy": entropy,
          "task_usage": usage}


WINDOW_KEY = "moe_window"  # TrainState.extras[WINDOW_KEY]: [MoE layers, window - 1, E] loads of past batches


def init_window(num_layers: int, cfg) -> dict | None:
  """The extras entry of the 'window' routing loss (uniform past loads), or None for other modes."""
  if cfg.routing_loss != "window" or num_layers == 0:
    return None
  e = int(cfg.num_experts)
  return {WINDOW_KEY: jnp.full((num_layers, int(cfg.window) - 1, e), 1.0 / e, jnp.float32)}


def window_balance(extras, moe_aux, step, weight: float):
  """(loss, extras): the Switch loss of every MoE layer against the load averaged over the current batch
  and the window's past batches (gradient through the current P only), summed over layers and weighted;
  the current loads replace the oldest entry (slot step mod (window - 1)). No window: (0, extras)."""
  if not moe_aux or not isinstance(extras, dict) or WINDOW_KEY not in extras:
    return jnp.zeros((), jnp.float32), extras
  past = extras[WINDOW_KEY]                                              # [L, W-1, E]
  load = jnp.stack([a["load"] for a in moe_aux])                         # [L, E]
  prob = jnp.stack([a["mean_prob"] for a in moe_aux])                    # [L, E]
  mean_load = (load + past.sum(axis=1)) / (past.shape[1] + 1)
  loss = weight * past.shape[-1] * jnp.sum(jax.lax.stop_gradient(mean_load) * prob)
  if past.shape[1]:
    past = jax.lax.dynamic_update_slice_in_dim(past, load[:, None, :], jnp.asarray(step) % past.shape[1], axis=1)
  return loss, {**extras, WINDOW_KEY: past}


def _param(rngs, init, shape, names, dtype=jnp.float32):
  return nnx.Param(init(rngs.params(), shape, dtype), sharding_names=names)


class MoEFFN(nnx.Module):
  """Task-conditioned MoE FFN: `y, aux = ffn(x [B, N, D], task_ids [B], train=...)`.

  Parameters (logical axes): w_in ('expert', 'embed', 'mlp'), b_in ('expert', 'mlp'), w_out ('expert',
  'mlp', 'embed'), b_out ('expert', 'embed'), router ('embed', None), task_bias / task_gate ('task', None).
  `mesh` (optional) is the mesh for the expert-parallel back-end; otherwise the ambient one is used.
  """

  def __init__(self, dim: int, hidden: int, cfg: ml_collections.ConfigDict, num_tasks: int, *,
               rngs: nnx.Rngs, mesh=None):
    validate_moe_config(cfg)
    self.cfg = ml_collections.FrozenConfigDict(cfg)
    self.num_tasks = max(int(num_tasks), 1)
    self.mesh = mesh
    e = cfg.num_experts
    width = max(1, round(hidden * cfg.hidden_mult))
    width_in = 2 * width if cfg.activation == "swiglu" else width
    kernel = nnx.initializers.truncated_normal(0.02)
    zeros = nnx.initializers.zeros
    self.w_in = _param(rngs, kernel, (e, dim, width_in), ("expert", "embed", "mlp"))
    self.b_in = _param(rngs, zeros, (e, width_in), ("expert", "mlp"))
    self.w_out = _param(rngs, kernel, (e, width, dim), ("expert", "mlp", "embed"))
    self.b_out = _param(rngs, zeros, (e, dim), ("expert", "embed"))
    if cfg.conditioning == "token":
      self.router = _param(rngs, kernel, (dim, e), ("embed", None))
      self.task_bias = _param(rngs, zeros, (self.num_tasks, e), ("task", None))
    else:  # random so that tasks start on different experts
      self.task_gate = _param(rngs, nnx.initializers.normal(1.0), (self.num_tasks, e), ("task", None))
    self.jitter_rngs = rngs["jitter"].fork() if cfg.jitter > 0 else nnx.data(None)
    self.task_targets = (task_expert_table(cfg.task_experts, self.num_tasks, e, cfg.top_k)
                         if cfg.routing_loss == "task" else None)

  def expert_params(self) -> dict:
    return {"w_in": self.w_in[...], "b_in": self.b_in[...], "w_out": self.w_out[...],
            "b_out": self.b_out[...]}

  def router_logits(self, x, task_ids, train: bool):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.router_dtype)
    b, n, _ = x.shape
    if cfg.conditioning == "task":
      gate = self.task_gate[...].astype(dtype)[task_ids]
      return jnp.broadcast_to(gate[:, None, :], (b, n, cfg.num_experts))
    xr = x.astype(dtype)
    if train and cfg.jitter > 0:
      noise = jax.random.uniform(self.jitter_rngs(), xr.shape, dtype, 1.0 - cfg.jitter, 1.0 + cfg.jitter)
      xr = xr * noise
    return xr @ self.router[...].astype(dtype) + self.task_bias[...].astype(dtype)[task_ids][:, None, :]

  def capacity(self, num_tokens: int, train: bool) -> int:
    cfg = self.cfg
    if cfg.backend == "dropless" or cfg.conditioning == "task":
      return num_tokens
    cf = cfg.capacity_factor if train else cfg.eval_capacity_factor
    return expert_capacity(num_tokens, cfg.num_experts, cfg.top_k, cf)

  def __call__(self, x, task_ids, *, train: bool = False):
    cfg = self.cfg
    task_ids = jnp.asarray(task_ids, jnp.int32)
    capacity = self.capacity(x.shape[1], train)
    r = route(self.router_logits(x, task_ids, train), cfg.top_k, capacity)
    aux = routing_aux(r, task_ids, self.num_tasks, capacity, cfg.balance_loss_weight, cfg.z_loss_weight,
                      mode=cfg.routing_loss, task_w=cfg.task_loss_weight, task_targets=self.task_targets)
    params = self.expert_params()
    if cfg.backend == "dense":
      y = moe_dispatch.dense_dispatch(x, r.experts, r.gates, r.positions, capacity, params, cfg.activation)
    elif cfg.backend == "dropless":
      y = moe_dispatch.dropless_dispatch(x, r.experts, r.gates, params, cfg.activation,
                                         self.grouped_matmul_method(), cfg.block_size)
    else:
      mesh = self.mesh if self.mesh is not None else jax.sharding.get_abstract_mesh()
      if moe_dispatch.expert_mesh_size(mesh) > 1:
        y = moe_dispatch.expert_parallel_dispatch(x, r.experts, r.gates, r.positions, capacity, params,
                                                  cfg.activation, mesh)
      else:
        y = moe_dispatch.capacity_dispatch_local(x, r.experts, r.gates, r.positions, capacity, params,
                                                 cfg.activation)
    return y.astype(x.dtype), aux

  def grouped_matmul_method(self) -> str:
    method = self.cfg.grouped_matmul
    if method == "auto":
      return "ragged_dot" if jax.default_backend() == "tpu" else "blocked"
    return method

