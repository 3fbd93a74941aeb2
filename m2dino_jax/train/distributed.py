"""Multi-process start-up and elastic resume.

Start-up: `jax.distributed.initialize` when a run spans several processes. The coordinator comes from the
config (`distributed.coordinator`, `num_processes`, `process_id`) or from the environment that the
launchers set (M2DINO_COORDINATOR, M2DINO_NUM_PROCESSES, M2DINO_PROCESS_ID, optionally
M2DINO_LOCAL_DEVICE_IDS); on SLURM / TPU pods JAX can discover them itself (`distributed.auto = True` or
M2DINO_DISTRIBUTED_AUTO=1, which launch/tpu_pod.sh sets).

Elastic resume: a checkpoint written on one mesh and process count restores on another. The train state
is saved as global arrays and restored into the shardings of the current run's state (see
checkpointing.Checkpointer.restore); the data iterator's state is the same on every process (the
pipeline walks one global order, each process materialising its rows), so `ElasticIteratorHandler`
restores it from the state any process wrote when the process count changed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from m2dino_jax import fileio

_STARTED = False


def settings(config) -> dict | None:
  """The initialize() arguments for this run, or None for a single-process run."""
  d = config.get("distributed") if hasattr(config, "get") else None
  coord = (d.get("coordinator") if d else None) or os.environ.get("M2DINO_COORDINATOR")
  if (d and d.get("auto")) or os.environ.get("M2DINO_DISTRIBUTED_AUTO", "").lower() in ("1", "true"):
    return {}
  if not coord:
    return None
  n = int((d.get("num_processes") if d else None) or os.environ.get("M2DINO_NUM_PROCESSES", "1"))
  pid = (d.get("process_id") if d else None)
  pid = int(pid if pid is not None and pid >= 0 else os.environ.get("M2DINO_PROCESS_ID", "0"))
  out = {"coordinator_address": coord, "num_processes": n, "process_id": pid}
  local = os.environ.get("M2DINO_LOCAL_DEVICE_IDS", "").strip()
  if local:
    out["local_device_ids"] = [int(i) for i in local.split(",") if i.strip()]
  return out


def maybe_initialize(config) -> bool:
  """Starts jax.distributed once if the config or environment asks for it; returns whether it did."""
  global _STARTED
  kw = settings(config)
  if kw is None or _STARTED:
    return False
  jax.distributed.initialize(**kw)
  _STARTED = True
  return True


def topology() -> dict:
  """Processes and devices of this run (logged by launchers and written next to benchmark results)."""
  return {"process_index": jax.process_index(), "process_count": jax.process_count(),
          "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
          "platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}


class ElasticIteratorHandler(grain.checkpoint.CheckpointHandler):
  """Grain's Orbax handler (one process_I-of-N.json per process) that also restores into another process
  count: when this process's own file is missing it takes the state every process wrote, after checking
  that those states agree (they do for pipeline.make_train_iterator, whose state is the global position)."""

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own.exists() or not isinstance(item, grain.DatasetIterator):
      return super().restore(directory, item=item)
    files = sorted(directory.glob("process_*-of-*.json"))
    if not files:
      raise ValueError(f"{directory}: no data iterator state (process_*-of-*.json)")
    states = [fileio.read_json(f, "data iterator state") for f in files]
    if any(s != states[0] for s in states[1:]):
      raise ValueError(f"{directory}: the {len(files)} processes saved different data iterator states, so "
                       f"they cannot be re-split over {jax.process_count()} processes")
    item.set_state(states[0])
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(ElasticIteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  """Orbax args saving a Grain iterator with ElasticIteratorHandler."""
  item: Any


@ocp.args.register_with_handler(ElasticIteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  """Orbax args restoring a Grain iterator (in place) with ElasticIteratorHandler."""
  item: Any
