"""Fault injection for resume tests: `python tests/crash_run.py FAULT <main args>` runs the trainer with one fault:

  STEP       kill the process (exit 17, no clean-up) right after step STEP, once the checkpoints in flight are on
             disk;
  save@STEP  kill it right after the asynchronous save of step STEP has started (a SIGKILL mid-save);
  nan@STEP   turn the state and the loss NaN at step STEP (as a diverging learning rate would).
"""

import os
import sys

import jax
import jax.numpy as jnp

from m2dino_jax import main
from m2dino_jax.train import checkpointing, loop


def _crash_at(target: int):
  def hook(step, state, checkpointer):
    if step == target:
      if checkpointer is not None:
        checkpointer.wait()
      os._exit(17)
  return hook


def _crash_mid_save(target: int):
  save = checkpointing.Checkpointer.save

  def patched(self, step, state, *args, **kw):
    saved = save(self, step, state, *args, **kw)
    if step == target:
      os._exit(17)
    return saved
  checkpointing.Checkpointer.save = patched


def _nan_at(target: int):
  run = loop.run

  def patched(**kw):
    step_fn, count = kw["step_fn"], [kw["start_step"]]

    def poisoned(state, batch):
      state, metrics = step_fn(state, batch)
      count[0] += 1
      if count[0] == target:
        nan = lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        state = state.replace(params=jax.tree.map(nan, state.params))
        metrics = {**metrics, "loss": metrics["loss"] * jnp.nan, "grad_norm": metrics["grad_norm"] * jnp.nan}
      return state, metrics
    return run(**{**kw, "step_fn": poisoned})
  loop.run = patched


if __name__ == "__main__":
  fault = sys.argv[1]
  if fault.startswith("save@"):
    _crash_mid_save(int(fault[5:]))
  elif fault.startswith("nan@"):
    _nan_at(int(fault[4:]))
  else:
    loop.AFTER_STEP_HOOKS.append(_crash_at(int(fault)))
  sys.exit(main.main(sys.argv[2:]))
