"""MoE FFN: every back-end against the per-token loop reference, capacity drops, losses, task routing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2dino_jax.errors import ConfigError
from m2dino_jax.models import moe_reference as ref
from m2dino_jax.models.moe import MoEFFN, default_moe_config, expert_capacity, moe_layer_indices

DIM, HIDDEN, TASKS = 8, 12, 3


def make_moe(seed=0, dim=DIM, hidden=HIDDEN, scale=0.5, mesh=None, **overrides):
  """An MoEFFN with every parameter drawn N(0, scale^2) (zero-initialised biases would test less)."""
  cfg = default_moe_config()
  cfg.update({"enabled": True, "num_experts": 4, **overrides})
  model = MoEFFN(dim, hidden, cfg, TASKS, rngs=nnx.Rngs(seed), mesh=mesh)
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  keys = iter(jax.random.split(jax.random.key(seed + 100), len(jax.tree.leaves(pure))))
  pure = jax.tree.map(lambda v: scale * jax.random.normal(next(keys), v.shape, v.dtype), pure)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


def call(model, x, task_ids, train=False):
  """The model's forward pass, jitted (eager op-by-op dispatch is slow on a shared CPU)."""
  return nnx.jit(lambda m, x, t: m(x, t, train=train))(model, x, task_ids)


def param_dict(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_value_and_grads(model, x, task_ids, cot, train=False):
  graphdef, state = nnx.split(model)

  def loss(state, x):
    y, _ = nnx.merge(graphdef, state)(x, task_ids, train=train)
    return jnp.sum(y * cot), y

  (_, y), (gs, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
  return y, nnx.to_pure_dict(gs), gx


def reference_value_and_grads(model, x, task_ids, cot, capacity=None):
  cfg = model.cfg
  p = param_dict(model)
  routes = ref.reference_routes(p, x, task_ids, cfg.conditioning, cfg.top_k, capacity)

  def loss(p, x):
    y = ref.reference_forward(p, x, task_ids, routes, cfg.conditioning, cfg.top_k, cfg.activation)
    return jnp.sum(y * cot), y

  (_, y), (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(p, x)
  return y, gp, gx


def inputs(b=2, n=5, dim=DIM, seed=1):
  kx, kc = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (b, n, dim), jnp.float32)
  cot = jax.random.normal(kc, (b, n, dim), jnp.float32)
  return x, jnp.array([0, 2, 1, 0][:b], jnp.int32), cot


def assert_trees_close(a, b, tol=1e-5):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert len(flat_a) == len(flat_b)
  for path, va in flat_a:
    np.testing.assert_allclose(np.asarray(va), np.asarray(flat_b[path]), atol=tol, rtol=tol,
                               err_msg=str(path))


BACKENDS = [("dense", "auto"), ("dropless", "blocked"), ("dropless", "ragged_dot"),
            ("expert_parallel", "auto")]


@pytest.mark.parametrize("conditioning", ["token", "task"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("backend,grouped", BACKENDS)
def test_backends_match_loop_reference(backend, grouped, top_k, conditioning):
  """Dropless capacity (eval): outputs and gradients of every back-end equal the loop, fp32 1e-5."""
  model = make_moe(backend=backend, grouped_matmul=grouped, top_k=top_k, conditioning=conditioning,
                   block_size=4)
  x, task_ids, cot = inputs()
  y, gp, gx = model_value_and_grads(model, x, task_ids, cot, train=False)
  y_ref, gp_ref, gx_ref = reference_value_and_grads(model, x, task_ids, cot)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(gx, gx_ref, atol=1e-5, rtol=1e-5)
  assert_trees_close(gp, gp_ref)
  assert float(np.abs(np.asarray(y)).max()) > 0.1  # not trivially zero


def test_swiglu_matches_reference():
  model = make_moe(activation="swiglu", backend="dense")
  x, task_ids, cot = inputs()
  y, gp, gx = model_value_and_grads(model, x, task_ids, cot)
  y_ref, gp_ref, gx_ref = reference_value_and_grads(model, x, task_ids, cot)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  assert_trees_close(gp, gp_ref)


def _hand_case(backend):
  """E=4, k=2, 4 tokens, C=1: router = identity, so token t's logits are x[t]."""
  model = make_moe(dim=4, backend=backend, top_k=2, capacity_factor=0.5)
  model.router[...] = jnp.eye(4)
  model.task_bias[...] = jnp.zeros((TASKS, 4))
  x = jnp.array([[[3., 2., 0., 0.],     # t0: e0, then e1
                  [3., 0., 2., 0.],     # t1: e0, then e2
                  [2., 3., 0., 0.],     # t2: e1, then e0
                  [0., 0., 2., 3.]]])   # t3: e3, then e2
  return model, x, jnp.array([0], jnp.int32)


@pytest.mark.parametrize("backend", ["dense", "expert_parallel"])
def test_capacity_drops_hand_case(backend):
  """First choices fill slots before second choices: t0->e0, t2->e1, t3->e3, t1->e2 survive; 4 of 8 drop."""
  model, x, task_ids = _hand_case(backend)
  assert expert_capacity(4, 4, 2, 0.5) == 1 and model.capacity(4, train=True) == 1
  from m2dino_jax.models.moe import route
  r = route(model.router_logits(x, task_ids, train=True), 2, 1)
  np.testing.assert_array_equal(r.experts[0], [[0, 1], [0, 2], [1, 0], [3, 2]])
  np.testing.assert_array_equal(r.positions[0], [[0, 1], [1, 0], [0, 2], [0, 1]])
  np.testing.assert_array_equal(np.asarray(r.gates[0]) > 0, [[1, 0], [0, 1], [1, 0], [1, 0]])
  y, aux = call(model, x, task_ids, train=True)
  assert float(aux["drop_fraction"]) == 0.5
  kept = {(0, 0): [0], (0, 1): [2], (0, 2): [1], (0, 3): [3]}
  p = param_dict(model)
  assert ref.reference_routes(p, x, task_ids, "token", 2, 1)[0] == kept
  choices = np.array([[[0, 1], [0, 2], [1, 0], [3, 2]]])
  y_ref = ref.reference_forward(p, x, task_ids, (kept, choices), "token", 2, "gelu")
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  # With no capacity limit the second choices come back and the output changes.
  y_full, aux_full = call(model, x, task_ids, train=False)
  assert float(aux_full["drop_fraction"]) == 0.0 and float(jnp.abs(y_full - y).max()) > 1e-3


def test_dropless_backend_never_drops():
  model = make_moe(backend="dropless", capacity_factor=0.25)
  x, task_ids, _ = inputs()
  _, aux = call(model, x, task_ids, train=True)
  assert float(aux["drop_fraction"]) == 0.0


def test_balance_and_z_loss_hand_computed():
  """E=2, k=1, probs (.75,.25),(.25,.75),(.75,.25),(.75,.25): f=(3/4,1/4), P=(.625,.375)."""
  model = make_moe(dim=2, num_experts=2, top_k=1, balance_loss_weight=0.5, z_loss_weight=0.25)
  model.router[...] = jnp.eye(2)
  model.task_bias[...] = jnp.zeros((TASKS, 2))
  l3 = np.log(3.0)
  x = jnp.array([[[l3, 0.], [0., l3], [l3, 0.], [l3, 0.]]])
  _, aux = call(model, x, jnp.array([1]), train=False)
  balance = 2 * (0.75 * 0.625 + 0.25 * 0.375)                          # 1.125
  z = np.log(4.0) ** 2                                                 # logsumexp = log(3 + 1)
  entropy = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
  np.testing.assert_allclose(aux["balance_loss"], balance, rtol=1e-6)
  np.testing.assert_allclose(aux["z_loss"], z, rtol=1e-6)
  np.testing.assert_allclose(aux["aux_loss"], 0.5 * balance + 0.25 * z, rtol=1e-6)
  np.testing.assert_allclose(aux["router_entropy"], entropy, rtol=1e-6)
  np.testing.assert_allclose(aux["load"], [0.75, 0.25], rtol=1e-6)
  np.testing.assert_allclose(aux["task_usage"], [[0, 0], [3, 1], [0, 0]])
  # Uniform router probabilities give exactly 1, whatever the tie-break.
  _, aux_u = call(model, jnp.zeros((2, 3, 2)), jnp.array([0, 1]), train=False)
  np.testing.assert_allclose(aux_u["balance_loss"], 1.0, rtol=1e-6)


@pytest.mark.parametrize("conditioning", ["token", "task"])
def test_task_conditioning_changes_routing(conditioning):
  """Same images, different tasks: the learned per-task bias/gate sends them to different experts."""
  model = make_moe(conditioning=conditioning, top_k=2, backend="dense")
  table = jnp.array([[4., 4., -4., -4.], [-4., -4., 4., 4.], [0., 0., 0., 0.]])
  if conditioning == "token":
    model.router[...] = 0.01 * model.router[...]
    model.task_bias[...] = table
  else:
    model.task_gate[...] = table + jnp.array([0., 0., 0., 0.1])  # task 2 breaks the tie towards e3
  x = jnp.tile(jax.random.normal(jax.random.key(3), (1, 6, DIM)), (2, 1, 1))
  y, aux = call(model, x, jnp.array([0, 1]), train=False)
  assert float(jnp.abs(y[0] - y[1]).max()) > 1e-3
  np.testing.assert_allclose(aux["task_usage"], [[6, 6, 0, 0], [0, 0, 6, 6], [0, 0, 0, 0]])
  np.testing.assert_allclose(aux["load"], [0.25] * 4, rtol=1e-6)


def test_layer_indices_and_config_errors():
  assert moe_layer_indices("last4", 12) == [8, 9, 10, 11]
  assert moe_layer_indices("first2", 12) == [0, 1]
  assert moe_layer_indices("none", 12) == [] and moe_layer_indices("all", 3) == [0, 1, 2]
  assert moe_layer_indices("1, 3,5", 12) == [1, 3, 5]
  assert moe_layer_indices([11, -2, 3], 12) == [3, 10, 11]
  cfg = default_moe_config()
  cfg.layers = [0, 2]
  assert moe_layer_indices(cfg.layers, 4) == [0, 2]
  for bad in ("last13", "middle", [12]):
    with pytest.raises(ConfigError, match="moe.layers"):
      moe_layer_indices(bad, 12)
  for key, value in (("backend", "magic"), ("top_k", 9), ("activation", "relu")):
    cfg = default_moe_config()
    cfg[key] = value
    with pytest.raises(ConfigError, match=f"moe.{key}"):
      MoEFFN(4, 8, cfg, 2, rngs=nnx.Rngs(0))
  assert expert_capacity(197, 8, 2, 1.25) == 62 and expert_capacity(197, 8, 2, 0) == 197


def test_param_logical_axes():
  model = make_moe(conditioning="token")
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  assert tuple(specs["w_in"]) == ("expert", "embed", "mlp")
  assert tuple(specs["w_out"]) == ("expert", "mlp", "embed")
  assert tuple(specs["router"]) == ("embed", None)
  assert tuple(specs["task_bias"]) == ("task", None)


def test_router_jitter_only_in_training():
  """Switch jitter: router input x * U(1 - j, 1 + j) when training, untouched in evaluation."""
  model = make_moe(dim=4, jitter=0.5)
  model.router[...] = jnp.eye(4)                      # logits - bias = the (noisy) router input itself
  x, task_ids, _ = inputs(dim=4)
  bias = model.task_bias[...][task_ids][:, None, :]
  np.testing.assert_allclose(model.router_logits(x, task_ids, train=False) - bias, x, atol=1e-6)
  factor = np.asarray((model.router_logits(x, task_ids, train=True) - bias) / x)
  assert factor.min() >= 0.5 - 1e-4 and factor.max() <= 1.5 + 1e-4 and factor.std() > 0.1
  second = np.asarray((model.router_logits(x, task_ids, train=True) - bias) / x)
  assert np.abs(second - factor).max() > 1e-3          # fresh noise on every call


def test_output_dtype_follows_input():
  """bf16 activations stay bf16 (router still float32) and agree with the fp32 result to bf16 precision."""
  model = make_moe(backend="dense")
  x, task_ids, _ = inputs()
  y32, _ = call(model, x, task_ids)
  y16, aux = call(model, x.astype(jnp.bfloat16), task_ids)
  assert y16.dtype == jnp.bfloat16 and aux["balance_loss"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.1, rtol=0.05)
