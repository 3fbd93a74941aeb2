"""The shared training loop: metrics logging, progress, NaN guard, preemption, eval and checkpoints.

Every trainer (multitask, dino, mae) supplies a pure `step_fn(state, batch) -> (state, metrics)` and
hooks; this loop owns the side effects: WORKDIR/metrics.jsonl, TensorBoard events, a progress line
with ETA, checkpoint cadence, SIGTERM (save, then exit cleanly) and the finite-loss check.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from m2dino_jax.errors import NonFiniteError


class MetricWriter:
  """Appends JSON lines to WORKDIR/metrics.jsonl and scalars to TensorBoard (process 0 only)."""

  def __init__(self, workdir, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self.path = Path(workdir) / "metrics.jsonl"
    self.tb = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(Path(workdir) / "tb"))

  def write(self, step: int, metrics: dict, prefix: str = "") -> None:
    if not self.enabled:
      return
    clean = {k: _scalar(v) for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **{prefix + k: v for k, v in clean.items()}}) + "\n")
    if self.tb is not None:
      for k, v in clean.items():
        if isinstance(v, float) and math.isfinite(v):
          self.tb.add_scalar(prefix + k, v, step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _scalar(v):
  if isinstance(v, str):
    return v
  a = np.asarray(v)
  return float(a) if a.size == 1 else a.tolist()


class Progress:
  """A one-line progress bar with rate and ETA on stderr (a plain line every N steps when not a tty)."""

  def __init__(self, total: int, start: int = 0, every: int = 10, name: str = "train"):
    self.total, self.start, self.every, self.name = total, start, every, name
    self.t0 = time.perf_counter()
    self.tty = sys.stderr.isatty()
    self.enabled = jax.process_index() == 0

  def update(self, step: int, info: str = "") -> None:
    if not self.enabled:
      return
    done = step - self.start
    if not self.tty and step % self.every and step != self.total:
      return
    elapsed = time.perf_counter() - self.t0
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    frac = step / max(self.total, 1)
    bar = "#" * int(24 * frac)
    line = (f"{self.name} [{bar:<24}] {step}/{self.total} {rate:.2f} step/s "
            f"ETA {_hms(eta)} {info}")
    print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.tty and self.enabled:
      print(file=sys.stderr)


def _hms(s: float) -> str:
  if not math.isfinite(s):
    return "--:--"
  s = int(s)
  return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class PreemptionGuard:
  """Turns SIGTERM into a flag the loop checks after each step (save, then exit)."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def check_finite(metrics: dict, step: int, label: str = "") -> None:
  loss = float(np.asarray(metrics["loss"]))
  gnorm = float(np.asarray(metrics.get("grad_norm", 0.0)))
  if not (math.isfinite(loss) and math.isfinite(gnorm)):
    where = f" ({label})" if label else ""
    raise NonFiniteError(f"non-finite loss {loss} / grad norm {gnorm} at step {step}{where}; "
                         "the last checkpoint is intact: lower the learning rate or check the data")


def agreed(flag: bool) -> bool:
  """True on every process when `flag` is true on any (a collective: call it at the same steps everywhere)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


# Observers called as hook(step, state, checkpointer) after every step (profilers; fault injection in tests).
AFTER_STEP_HOOKS: list[Callable] = []

COMPLETED, PREEMPTED = "completed", "preempted"


def _labels(metrics: dict) -> str:
  """String entries of the metrics (e.g. the task of a multi-task step) for the progress line."""
  return ", ".join(v for v in metrics.values() if isinstance(v, str))


def run(*, state, batches, step_fn: Callable, start_step: int, total_steps: int, writer: MetricWriter,
        log_every: int = 10, eval_every: int = 0, evaluate: Callable | None = None,
        checkpoint_every: int = 0, checkpointer=None, name: str = "train"):
  """Runs steps start_step+1 .. total_steps of `step_fn(state, batch) -> (state, metrics)`.

  Returns (state, last_step, status) with status COMPLETED or PREEMPTED. Metrics may carry string labels
  (logged as they are). `checkpointer.save(step, state, force)` runs every `checkpoint_every` steps,
  `evaluate(state, step)` every `eval_every`. SIGTERM stops the loop at a step that every process agrees on
  (the flag is all-reduced at the log cadence in multi-process runs, every step otherwise), so the collective
  checkpoint that follows is written once, for the same step everywhere.
  """
  progress = Progress(total_steps, start_step, every=log_every, name=name)
  step = start_step
  status = COMPLETED
  multi = jax.process_count() > 1
  with PreemptionGuard() as guard:
    while step < total_steps:
      state, metrics = step_fn(state, next(batches))
      step += 1
      log_step = step % log_every == 0 or step == total_steps
      if log_step:
        metrics = jax.device_get(metrics)
        label = _labels(metrics)
        check_finite(metrics, step, label)
        writer.write(step, metrics)
        progress.update(step, f"loss {float(metrics['loss']):.4f}" + (f" ({label})" if label else ""))
      for hook in AFTER_STEP_HOOKS:
        hook(step, state, checkpointer)
      if evaluate is not None and eval_every and step % eval_every == 0 and step != total_steps:
        evaluate(state, step)
      if checkpointer is not None and checkpoint_every and step % checkpoint_every == 0:
        checkpointer.save(step, state, force=False)
      if (log_step or not multi) and agreed(guard.requested):
        status = PREEMPTED
        break
  progress.close()
  return state, step, status
