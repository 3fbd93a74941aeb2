"""Checkpoints: one module for every trainer (Orbax CheckpointManager, async, keep-N, best-by-metric).

A checkpoint step folder holds two items:
  state  the train state pytree (step, params, optimiser state, ...), restored sharded for the
         current mesh from an abstract target;
  data   the Grain iterator state, so a resumed run sees exactly the batches it would have seen (also on
         another process count: distributed.ElasticIteratorHandler).

`Checkpointer` keeps the latest `keep` steps under WORKDIR/ckpt for resuming (bind the trainer's data
iterator with `data_iter` and every save / restore carries it); `save_params` writes a params-only
checkpoint (e.g. the best eval's params under WORKDIR/best, for `init_from` / predict).
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from m2dino_jax.train import distributed


def _abstract(tree):
  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(one, tree)


class Checkpointer:
  """Latest-N checkpoints of (state, data iterator) in `directory`."""

  def __init__(self, directory, keep: int = 2, async_save: bool = True, best_metric: str | None = None,
               best_mode: str = "max", data_iter=None):
    self.data_iter = data_iter
    self.directory = Path(directory).resolve()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode=best_mode,
        keep_checkpoints_without_metrics=best_metric is None)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": distributed.ElasticIteratorHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter=None, metrics: dict | None = None, force: bool = False) -> bool:
    """Saves (asynchronously) unless this step is already saved; returns whether it saved."""
    if step in self.manager.all_steps():
      return False
    data_iter = self.data_iter if data_iter is None else data_iter
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = distributed.IteratorSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def restore(self, state_like, data_iter=None, step: int | None = None):
    """Restores into the shape/sharding of `state_like` (and `data_iter` in place); returns the state."""
    step = self.manager.latest_step() if step is None else step
    data_iter = self.data_iter if data_iter is None else data_iter
    items = {"state": ocp.args.StandardRestore(_abstract(state_like))}
    if data_iter is not None:
      items["data"] = distributed.IteratorRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def save_params(directory, params) -> Path:
  """Writes a params-only checkpoint (synchronously) to `directory`, replacing any previous one."""
  path = Path(directory).resolve()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=True)
  return path


def restore_params(directory, like=None):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(Path(directory).resolve(), _abstract(like) if like is not None else None)
