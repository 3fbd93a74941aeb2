"""Fault injection for resume tests: `python tests/crash_run.py STEP <main args>` runs the trainer and kills the
process (exit 17, no clean-up) right after step STEP, once the checkpoints in flight are on disk."""

import os
import sys

from m2dino_jax import main
from m2dino_jax.train import loop


def _crash_at(target: int):
  def hook(step, state, checkpointer):
    if step == target:
      if checkpointer is not None:
        checkpointer.wait()
      os._exit(17)
  return hook


if __name__ == "__main__":
  loop.AFTER_STEP_HOOKS.append(_crash_at(int(sys.argv[1])))
  sys.exit(main.main(sys.argv[2:]))
