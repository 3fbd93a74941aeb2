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

Auxiliary outputs (a dict of jax values, no globals): balance_loss (Switch, E * sum_e f_e P_e, 1.0 when
uniform), z_loss (mean logsumexp(logits)^2), aux_loss (the two weighted), load [E] (fraction of
assignments per expert, before drops), drop_fraction, router_entropy (mean over tokens, nats),
task_usage [num_tasks, E] (assignment counts per task, before drops; sum it over an eval pass).
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
      "balance_loss_weight": 0.01,
      "z_loss_weight": 1e-3,
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
                       ("grouped_matmul", GROUPED_MATMULS)):
    if cfg[key] not in allowed:
      raise ConfigError(f"moe.{key}", f"'{cfg[key]}' is not one of {allowed}")
  if cfg.num_experts < 1:
    raise ConfigError("moe.num_experts", "must be >= 1")
  if not 1 <= cfg.top_k <= cfg.num_experts:
    raise ConfigError("moe.top_k", f"must be in [1, num_experts={cfg.num_experts}], got {cfg.top_k}")
  if cfg.hidden_mult <= 0 or cfg.block_size < 1 or cfg.jitter < 0:
    raise ConfigError("moe", "hidden_mult and block_size must be positive and jitter >= 0")


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


def routing_aux(r: Routing, task_ids, num_tasks: int, capacity: int, balance_w: float, z_w: float) -> dict:
  """Losses and telemetry of one routing decision (see the module docstring)."""
  num_experts = r.probs.shape[-1]
  hot = jax.nn.one_hot(r.experts, num_experts, dtype=jnp.float32)       # [B, N, k, E]
  per_image = hot.sum(axis=(1, 2))                                       # [B, E]
  load = per_image.sum(axis=0) / jnp.maximum(per_image.sum(), 1.0)      # f_e
  mean_prob = r.probs.astype(jnp.float32).mean(axis=(0, 1))            # P_e
  balance = num_experts * jnp.sum(load * mean_prob)
  z = jnp.mean(jax.nn.logsumexp(r.logits.astype(jnp.float32), axis=-1) ** 2)
  logp = jnp.log(jnp.clip(r.probs.astype(jnp.float32), 1e-30, 1.0))
  entropy = -jnp.mean(jnp.sum(r.probs * logp, axis=-1))
  dropped = jnp.mean((r.positions >= capacity).astype(jnp.float32))
  usage = jax.nn.one_hot(task_ids, num_tasks, dtype=jnp.float32).T @ per_image
  return {"balance_loss": balance, "z_loss": z, "aux_loss": balance_w * balance + z_w * z,
          "load": load, "drop_fraction": dropped, "router_entropy": entropy, "task_usage": usage}


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
    aux = routing_aux(r, task_ids, self.num_tasks, capacity, cfg.balance_loss_weight, cfg.z_loss_weight)
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

