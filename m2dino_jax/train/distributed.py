"""Multi-process start-up: `jax.distributed.initialize` when a run spans several processes.

The coordinator comes from the config (`distributed.coordinator`, `num_processes`, `process_id`)
or from the environment that the launchers set (M2DINO_COORDINATOR, M2DINO_NUM_PROCESSES,
M2DINO_PROCESS_ID); on SLURM / TPU pods JAX discovers them itself (`distributed.auto = True`).
"""

from __future__ import annotations

import os

import jax

_STARTED = False


def settings(config) -> dict | None:
  """The initialize() arguments for this run, or None for a single-process run."""
  d = config.get("distributed") if hasattr(config, "get") else None
  coord = (d.get("coordinator") if d else None) or os.environ.get("M2DINO_COORDINATOR")
  if d and d.get("auto"):
    return {}
  if not coord:
    return None
  n = int((d.get("num_processes") if d else None) or os.environ.get("M2DINO_NUM_PROCESSES", "1"))
  pid = (d.get("process_id") if d else None)
  pid = int(pid if pid is not None and pid >= 0 else os.environ.get("M2DINO_PROCESS_ID", "0"))
  return {"coordinator_address": coord, "num_processes": n, "process_id": pid}


def maybe_initialize(config) -> bool:
  """Starts jax.distributed once if the config or environment asks for it; returns whether it did."""
  global _STARTED
  kw = settings(config)
  if kw is None or _STARTED:
    return False
  jax.distributed.initialize(**kw)
  _STARTED = True
  return True
