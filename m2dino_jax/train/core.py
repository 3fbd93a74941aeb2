"""The training core every trainer builds on: a TrainState pytree, sharded initialisation and the step
contract.

  TrainState   step, params, optimiser state, rng (raw uint32 key data, so Orbax saves it as an array)
               and `extras` (model state that is not trained, e.g. NNX stream counters).
  init_state   builds the state directly sharded: `jax.eval_shape` gives its structure and logical axes,
               then one `jax.jit(init, out_shardings=...)` creates every array in place on the mesh (a
               model that does not fit one device is never materialised on one).
  compile_step a step `(state, batch) -> (state, metrics)` jitted with explicit in / out shardings and the
               state donated; settings that do not change during training (graph definitions, the config,
               per-parameter scales) are bound before, never passed per call.

A trainer supplies its init function, its step(s) and its evaluation; `train/loop.py` runs the steps and
owns the side effects (logging, checkpoints, preemption, the finite-loss check).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import struct
from jax.sharding import NamedSharding

from m2dino_jax import mesh as mesh_lib


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  extras: Any = None

  def key(self) -> jax.Array:
    """A typed PRNG key for this step: the run's key folded with the step (same draw on resume)."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def seed_data(seed: int) -> np.ndarray:
  """Raw key data of the run's base key (stored in TrainState.rng)."""
  return np.asarray(jax.random.key_data(jax.random.key(seed)))


def replicate_unnamed(shardings, mesh):
  """Leaves without logical-axis metadata (optimiser counts, the step, the rng) are replicated."""
  rep = mesh_lib.replicated(mesh)
  return jax.tree.map(lambda s: s if isinstance(s, NamedSharding) else rep, shardings,
                      is_leaf=lambda x: isinstance(x, NamedSharding) or x is None)


def init_state(init_fn: Callable[[], TrainState], shardings_fn: Callable[[TrainState], Any]) -> TrainState:
  """Runs `init_fn` under jit with the out shardings `shardings_fn(abstract_state)`."""
  abstract = jax.eval_shape(init_fn)
  return jax.jit(init_fn, out_shardings=shardings_fn(abstract))()


def shardings_of(tree):
  """The shardings of a placed pytree (for in / out shardings of the steps)."""
  return jax.tree.map(lambda x: x.sharding, tree)


def compile_step(step_fn: Callable, state_shardings, batch_shardings, *, donate: bool = True):
  """jit(step_fn) with explicit shardings: state in and out keep `state_shardings`, metrics replicated."""
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, None),
                 donate_argnums=(0,) if donate else ())
