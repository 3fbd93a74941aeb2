"""Checkpoints: one module for every trainer (Orbax CheckpointManager, async, keep-N, integrity checks).

A checkpoint step folder holds two items and a manifest:
  state  the train state pytree (step, params, optimiser state, ...), restored sharded for the
         current mesh from an abstract target;
  data   the Grain iterator state, so a resumed run sees exactly the batches it would have seen (also on
         another process count: distributed.ElasticIteratorHandler);
  m2dino_manifest.json  size + CRC-32 of every file, written once the (asynchronous) save has finalised.

Guarantees (see train/integrity.py):
  * a state holding a NaN / Inf is never saved (`save` raises NonFiniteError naming the leaf);
  * keep-N counts verified steps only: older steps are deleted after the newest one's manifest is written,
    so a save that dies half-way never costs the last good checkpoint;
  * `resume` walks the steps newest first: a step whose files do not match its manifest, or that fails a
    restore trial, is moved aside to CKPT-damaged/STEP (never deleted) with one warning line, and the
    previous complete step is restored; a checkpoint that does not fit the model (a changed config) is an
    error naming the weight, not damage;
  * `close` (also on exceptions, via `with Checkpointer(...)`) waits for the save in flight.

`save_params` writes a params-only checkpoint (e.g. the best eval's params under WORKDIR/best, for `init_from`
/ predict).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from m2dino_jax.errors import CheckpointError, NonFiniteError
from m2dino_jax.train import distributed, integrity


def _abstract(tree):
  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(one, tree)


def _primary() -> bool:
  return jax.process_index() == 0


def _from_primary(value: int) -> int:
  """Process 0's integer on every process (decisions taken on files only process 0 inspects)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


@contextlib.contextmanager
def _quiet_orbax():
  """Silences Orbax's absl log lines (warnings and tracebacks) while probing possibly damaged steps."""
  logger = logging.getLogger("absl")
  old = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(old)


class _DropOrbaxErrors(logging.Filter):
  """Orbax logs every failure of its background save threads as several ERROR tracebacks (hundreds of lines for
  a full disk) and then raises it to the caller, where Checkpointer turns it into one CheckpointError line. Set
  M2DINO_ORBAX_LOGS=1 to see them."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


if not os.environ.get("M2DINO_ORBAX_LOGS"):
  logging.getLogger("absl").addFilter(_DropOrbaxErrors())

_KNOWN = (("RESOURCE_EXHAUSTED", "no space left on the device"), ("No space left", "no space left on the device"),
          ("PERMISSION_DENIED", "permission denied"), ("Permission denied", "permission denied"),
          ("Read-only file system", "read-only file system"))


def _short(e: BaseException) -> str:
  text = str(e).strip()
  for needle, meaning in _KNOWN:
    if needle in text:
      return meaning
  lines = text.splitlines()
  return f"{type(e).__name__}: {lines[0][:160]}" if lines else type(e).__name__


def warn(msg: str) -> None:
  if _primary():
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class Checkpointer:
  """Latest-N verified checkpoints of (state, data iterator) in `directory`."""

  def __init__(self, directory, keep: int = 2, async_save: bool = True, data_iter=None):
    if int(keep) < 1:
      raise CheckpointError(directory, f"keep must be >= 1 (got {keep})")
    self.data_iter, self.keep = data_iter, int(keep)
    self.directory = Path(directory).resolve()
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True, enable_async_checkpointing=async_save)
    try:
      with _quiet_orbax():  # a damaged step's missing metadata is reported by `resume`, in one line
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": distributed.ElasticIteratorHandler()})
    except OSError as e:
      raise CheckpointError(self.directory, f"cannot use the checkpoint folder ({e.strerror or e})") from None
    self._pending: list[int] = []
    self._closed = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close(quiet=exc[0] is not None)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _step_dir(self, step: int) -> Path:
    return self.directory / str(step)

  # ------------------------------------------------------------------------- save

  def save(self, step: int, state, data_iter=None, metrics: dict | None = None, force: bool = False) -> bool:
    """Saves (asynchronously) unless this step is already saved; returns whether it saved. Raises
    NonFiniteError (and saves nothing) when a floating leaf of `state` holds a NaN / Inf."""
    if step in self.manager.all_steps():
      return False
    bad = integrity.first_non_finite(state)
    if bad is not None:
      raise NonFiniteError(f"the state at step {step} holds NaN / Inf (first in '{bad}'); not saved: "
                           f"{self.last_good_message()}")
    self._finish_pending()
    data_iter = self.data_iter if data_iter is None else data_iter
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = distributed.IteratorSave(data_iter)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
    except (OSError, ValueError) as e:  # read-only or full disk (TensorStore reports ValueError)
      raise CheckpointError(self.directory, f"cannot write checkpoint step {step} ({_short(e)}); "
                            f"{self.last_good_message(wait=False)}") from None
    if saved:
      self._pending.append(step)
    return saved

  def _finish_pending(self) -> None:
    """Waits for the save in flight, writes the manifests of finalised steps, then prunes to `keep`."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # an async write failed (disk full, permissions): the previous steps are intact
      self._pending.clear()
      raise CheckpointError(self.directory, f"a checkpoint save failed ({_short(e)}); "
                            f"{self.last_good_message(wait=False)}") from None
    if not self._pending:
      return
    if _primary():
      for step in self._pending:
        if self._step_dir(step).is_dir():
          integrity.write_manifest(self._step_dir(step))
    self._pending.clear()
    self._prune()

  def _prune(self) -> None:
    steps = sorted(self.manager.all_steps())
    for step in steps[:-self.keep]:
      self.manager.delete(step)

  def wait(self) -> None:
    self._finish_pending()

  def close(self, quiet: bool = False) -> None:
    """Waits for the save in flight (its manifest written) and closes. `quiet`: on an exception path, a failed
    save is reported as a warning line instead of raising over the original error."""
    if self._closed:
      return
    self._closed = True
    try:
      self._finish_pending()
    except CheckpointError as e:
      if not quiet:
        raise
      warn(str(e))
    finally:
      self.manager.close()

  def last_good_message(self, wait: bool = True) -> str:
    """'the last good checkpoint is step N in DIR' (after the save in flight has finished, if `wait`)."""
    if wait:
      with contextlib.suppress(CheckpointError):
        self._finish_pending()
    steps = [s for s in self.manager.all_steps() if self._step_dir(s).is_dir() and s not in self._pending]
    step = max(steps, default=None)
    if step is None:
      return f"no checkpoint in {self.directory} yet"
    return f"the last good checkpoint is step {step} in {self.directory}"

  # ------------------------------------------------------------------------- restore

  def restore(self, state_like, data_iter=None, step: int | None = None):
    """Restores step `step` (default: the latest) into the shape/sharding of `state_like` (and `data_iter` in
    place); returns the state. No fallback: see `resume`."""
    step = self.manager.latest_step() if step is None else step
    return self._restore(step, state_like, data_iter)

  def _restore(self, step: int, state_like, data_iter=None):
    data_iter = self.data_iter if data_iter is None else data_iter
    items = {"state": ocp.args.StandardRestore(_abstract(state_like))}
    if data_iter is not None:
      items["data"] = distributed.IteratorRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def _candidates(self) -> list[int]:
    if not self.directory.is_dir():
      return []
    return sorted((int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()),
                  reverse=True)

  def resume(self, state_like, data_iter=None):
    """(state, step) of the newest intact checkpoint, or (state_like, None) when there is none.

    Damaged steps (files not matching the manifest, or failing the restore trial or the finiteness check) are
    moved aside with one warning line each. A checkpoint that does not fit `state_like` raises CheckpointError
    naming the weight (the model config changed)."""
    data_iter = self.data_iter if data_iter is None else data_iter
    before = data_iter.get_state() if data_iter is not None else None
    self._remove_unfinished()
    candidates = self._candidates()
    for i, step in enumerate(candidates):
      step_dir = self._step_dir(step)
      problem = None
      with _quiet_orbax():
        problem = _problem_code(integrity.verify(step_dir) if _primary() else None)
        if problem is None:
          problem = self._check_structure(step, state_like)
        if problem is None:
          try:
            state = self._restore(step, state_like, data_iter)
          except Exception as e:
            problem = f"cannot be restored ({_short(e)})"
          else:
            bad = integrity.first_non_finite(state)
            problem = f"holds NaN / Inf in '{bad}'" if bad is not None else None
        if _any_process(problem is not None):
          problem = problem or "failed on another process"
        else:
          if _primary() and not integrity.has_manifest(step_dir):
            integrity.write_manifest(step_dir)  # restorable but never verified (killed before its manifest)
          return state, step
      if data_iter is not None:
        data_iter.set_state(before)
      self._set_aside(step, problem, older=i + 1 < len(candidates))
    return state_like, None

  def _remove_unfinished(self) -> None:
    """Deletes the temporary folders of saves that died half-way (never a finished step). Only the run that
    owns the workdir resumes, so no save of another process is in flight here."""
    if _primary() and self.directory.is_dir():
      for p in self.directory.iterdir():
        if p.is_dir() and ".orbax-checkpoint-tmp" in p.name:
          shutil.rmtree(p, ignore_errors=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("m2dino_ckpt_cleanup")

  def _check_structure(self, step: int, state_like) -> str | None:
    try:
      saved = self.manager.item_metadata(step)["state"]
    except Exception as e:
      return f"unreadable metadata ({_short(e)})"
    if saved is None:
      return "no state metadata"
    mismatch = integrity.structure_mismatch(saved, state_like)
    if mismatch is not None:
      raise CheckpointError(self._step_dir(step), f"does not fit the model the config builds: {mismatch}; "
                            "the model config changed since this checkpoint: use the run's config or a new --workdir")
    return None

  def _set_aside(self, step: int, problem: str, older: bool) -> None:
    dest = integrity.move_aside(self._step_dir(step)) if _primary() else None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"m2dino_ckpt_aside_{step}")
    self.manager.reload()
    warn(f"checkpoint step {step} in {self.directory} is damaged ({problem}); moved to {dest}; "
         + ("falling back to the previous step" if older else "no older checkpoint: training starts from step 0"))


def _problem_code(problem: str | None) -> str | None:
  """The primary's verification verdict on every process (other processes do not read the files)."""
  if jax.process_count() == 1:
    return problem
  return "damaged files (seen by process 0)" if _from_primary(problem is not None) else None


def save_params(directory, params) -> Path:
  """Writes a params-only checkpoint (synchronously) to `directory`, replacing any previous one."""
  path = Path(directory).resolve()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=True)
  return path


def restore_params(directory, like=None):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(Path(directory).resolve(), _abstract(like) if like is not None else None)
