"""The shared training loop: metrics logging, progress, NaN guard, preemption, eval and checkpoints.

Every trainer (multitask, dino, mae, mae_finetune) supplies a pure `step_fn(state, batch) -> (state, metrics)` and
hooks, and calls `train` (checkpoint folder, resume, the loop, the final or preemption save); `run` is the loop
itself. They own the side effects: WORKDIR/metrics.jsonl, TensorBoard events, a progress line
with ETA, checkpoint cadence, SIGTERM / SIGINT (save, then exit with EXIT_PREEMPTED) and the finite check:
the loss and gradient norm of every step are kept on device and read (one transfer) before any log, eval or
save, so a NaN between two log steps never reaches a checkpoint; on any exception the save in flight is
waited for before the error propagates.
"""

from __future__ import annotations

import collections
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
from m2dino_jax.train import checkpointing

RUN_WIDE = ("lr",)  # train metrics that belong to the run, not to the batch's labels


def is_count(key: str) -> bool:
  """Whether a metric key is an example count rather than a curve: its last path part is `n` or `n_<what>`
  (the naming convention of every trainer's metrics; tasks/results.COUNT_KEYS follow it, a test checks)."""
  last = key.rsplit("/", 1)[-1]
  return last == "n" or last.startswith("n_")


def tb_scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
  """The TensorBoard scalars of one metrics.jsonl line: {tag: value}.

  Train lines (prefix "") are tagged `train/<labels>/<name>` when they carry string labels (the trainer's
  own: the multi-task trainer labels each batch with its task), else `train/<name>`; the schedule's values
  (`RUN_WIDE`: lr) stay `train/<name>`, one curve. Other lines keep `<prefix><name>` (e.g. eval/<task>/<metric>).
  Example counts (`is_count`: n, n_train, ... as the last path part) are not curves and are left out, as are
  strings, lists and non-finite values (they stay in metrics.jsonl).
  """
  labels = [v for v in metrics.values() if isinstance(v, str)]
  base = prefix or "/".join(["train", *labels, ""])
  out = {}
  for k, v in metrics.items():
    if isinstance(v, float) and math.isfinite(v) and not is_count(k):
      out[("train/" if not prefix and k in RUN_WIDE else base) + k] = v
  return out


class MetricWriter:
  """Appends JSON lines to WORKDIR/metrics.jsonl (keys as given, with `prefix`) and scalars to TensorBoard
  (tags by `tb_scalars`), process 0 only."""

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
      for tag, v in tb_scalars(clean, prefix).items():
        self.tb.add_scalar(tag, v, step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _scalar(v):
  if isinstance(v, str):
    return v
  a = np.asarray(v)
  return float(a) if a.size == 1 else a.tolist()


class Progress:
  """A one-line progress bar with rate and ETA on stderr (a plain line every N steps when not a tty).

  The rate is a moving average over the last `window` updates: (steps between the oldest and newest kept
  update) / (time between them). The loop calls `step_done` after every step; the first one marks the end of
  the first step, which carries the compilation, so the rate never counts compile time. `clock` (seconds,
  default time.perf_counter) is injectable for tests. `rate` and `eta` hold the last estimate (NaN: none yet).
  """

  def __init__(self, total: int, start: int = 0, every: int = 10, name: str = "train", window: int = 5,
               clock: Callable[[], float] | None = None):
    self.total, self.start, self.every, self.name = total, start, every, name
    self.clock = clock or time.perf_counter
    self.marks: collections.deque = collections.deque(maxlen=window + 1)  # (step, time) of recent updates
    self.rate, self.eta = math.nan, math.nan
    self.tty = sys.stderr.isatty()
    self.enabled = jax.process_index() == 0

  def step_done(self, step: int) -> None:
    """Called after every step: the first call marks the origin of the rate (after the compiling step)."""
    if not self.marks:
      self.marks.append((step, self.clock()))

  def update(self, step: int, info: str = "") -> None:
    if not self.enabled:
      return
    self.marks.append((step, self.clock()))
    (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
    self.rate = (s1 - s0) / (t1 - t0) if s1 > s0 and t1 > t0 else math.nan
    self.eta = (self.total - step) / self.rate if self.rate > 0 else math.nan
    if not self.tty and step % self.every and step != self.total:
      return
    frac = step / max(self.total, 1)
    bar = "#" * int(24 * frac)
    rate = "--" if math.isnan(self.rate) else f"{self.rate:.2f}"
    line = (f"{self.name} [{bar:<24}] {step}/{self.total} {rate} step/s "
            f"ETA {_hms(self.eta)} {info}")
    print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.tty and self.enabled:
      print(file=sys.stderr)


def _hms(s: float) -> str:
  if not math.isfinite(s):
    return "--:--"
  s = int(s)
  return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


# Exit status of a run stopped by SIGTERM / SIGINT after writing its checkpoint (EX_TEMPFAIL): restart-until-success
# wrappers and schedulers rerun the same command, which resumes.
EXIT_PREEMPTED = 75
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):  # noqa: N818 (like KeyboardInterrupt: never caught by `except Exception`)
  """SIGTERM / SIGINT outside the training loop (set-up, final evaluation): the run stops at once; the
  checkpoints on disk are intact and a rerun resumes."""


class PreemptionGuard:
  """Turns SIGTERM and SIGINT into a flag the loop checks after each step (save, then exit)."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    for sig in _SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class InterruptGuard:
  """Outside the loop, SIGTERM / SIGINT raise `Interrupted` (unwinding through the checkpointer's close)."""

  def __init__(self):
    self._old = {}

  def __enter__(self):
    for sig in _SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:
        pass
    return self

  def _handle(self, signum, frame):
    raise Interrupted(signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _check_finite(pending: list, checkpointer) -> None:
  """Raises NonFiniteError naming the first step whose loss or gradient norm is NaN / Inf. `pending` holds
  (step, label, loss, grad norm) of the steps since the last check as device values: one transfer here,
  none per step."""
  if not pending:
    return
  values = jax.device_get([(loss, gnorm) for _, _, loss, gnorm in pending])
  for (step, label, _, _), (loss, gnorm) in zip(pending, values):
    loss = float(np.asarray(loss)) if loss is not None else 0.0
    gnorm = float(np.asarray(gnorm)) if gnorm is not None else 0.0
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
      where = f" ({label})" if label else ""
      last = checkpointer.last_good_message() if checkpointer is not None else "no checkpointing"
      raise NonFiniteError(f"non-finite loss {loss} / grad norm {gnorm} at step {step}{where}; no state from "
                           f"step {step} on was saved; {last}: lower the learning rate or check the data")
  pending.clear()


def check_finite(metrics: dict, step: int, label: str = "") -> None:
  """Raises NonFiniteError when the metrics' loss or gradient norm is NaN / Inf."""
  _check_finite([(step, label, metrics["loss"], metrics.get("grad_norm"))], None)


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
        checkpoint_every: int = 0, checkpointer=None, name: str = "train", clock: Callable[[], float] | None = None):
  """Runs steps start_step+1 .. total_steps of `step_fn(state, batch) -> (state, metrics)`.

  Returns (state, last_step, status) with status COMPLETED or PREEMPTED. Metrics may carry string labels
  (logged as they are). `checkpointer.save(step, state, force)` runs every `checkpoint_every` steps,
  `evaluate(state, step)` every `eval_every`. SIGTERM or SIGINT stops the loop at a step that every process agrees on
  (the flag is all-reduced at the log cadence in multi-process runs, every step otherwise), so the collective
  checkpoint that follows is written once, for the same step everywhere. `clock` times the progress line
  (default time.perf_counter; tests inject a fake one).
  """
  progress = Progress(total_steps, start_step, every=log_every, name=name, clock=clock)
  step = start_step
  status = COMPLETED
  multi = jax.process_count() > 1
  pending = []  # (step, label, loss, grad norm) not yet checked for finiteness (device values)
  try:
    with PreemptionGuard() as guard:
      while step < total_steps:
        state, metrics = step_fn(state, next(batches))
        step += 1
        progress.step_done(step)
        label = _labels(metrics)
        pending.append((step, label, metrics.get("loss"), metrics.get("grad_norm")))
        log_step = step % log_every == 0 or step == total_steps
        eval_step = evaluate is not None and eval_every and step % eval_every == 0 and step != total_steps
        save_step = checkpointer is not None and checkpoint_every and step % checkpoint_every == 0
        if log_step or eval_step or save_step:
          _check_finite(pending, checkpointer)  # before anything reads or saves this state
        if log_step:
          metrics = jax.device_get(metrics)
          writer.write(step, metrics)
          progress.update(step, f"loss {float(metrics['loss']):.4f}" + (f" ({label})" if label else ""))
        for hook in AFTER_STEP_HOOKS:
          hook(step, state, checkpointer)
        if eval_step:
          evaluate(state, step)
        if save_step:
          checkpointer.save(step, state, force=False)
        if (log_step or not multi) and agreed(guard.requested):
          status = PREEMPTED
          break
      _check_finite(pending, checkpointer)
  except BaseException:
    progress.close()
    if checkpointer is not None:  # never leave a save in flight behind an error (it would be lost)
      try:
        checkpointer.wait()
      except Exception as e:  # report, but keep the original error
        print(f"warning: {e}", file=sys.stderr)
    raise
  progress.close()
  return state, step, status


def train(*, workdir, state, batches, step_fn: Callable, total_steps: int, writer: MetricWriter, checkpoint,
          data_iter=None, log_every: int = 10, eval_every: int = 0, evaluate: Callable | None = None,
          eval_at_start: bool = False, name: str = "train", label: str | None = None):
  """A trainer's run on the shared core: opens WORKDIR/ckpt (a Checkpointer with the `checkpoint` config section's
  keep / async_save, saving `data_iter`'s state, default `batches`), resumes from its newest intact step
  ("[label] resumed from step N") or else, with `eval_at_start`, evaluates step 0, runs the loop (`run`, saving
  every `checkpoint.every` steps), writes the final (or preemption) checkpoint and closes the checkpointer.

  Returns (state, last step, status) as `run` does. On PREEMPTED it prints "[label] preempted at step N: checkpoint
  written; rerun the same command to resume" and closes `writer`; on COMPLETED the trainer goes on (final eval,
  exports) and closes the writer itself."""
  label = name if label is None else label
  with checkpointing.Checkpointer(Path(workdir) / "ckpt", keep=checkpoint.keep, async_save=checkpoint.async_save,
                                  data_iter=batches if data_iter is None else data_iter) as ckpt:
    state, resumed = ckpt.resume(state)
    start = 0 if resumed is None else int(state.step)
    if resumed is not None:
      print(f"[{label}] resumed from step {start}", file=sys.stderr)
    elif eval_at_start and evaluate is not None:
      evaluate(state, 0)
    state, step, status = run(
        state=state, batches=batches, step_fn=step_fn, start_step=start, total_steps=total_steps, writer=writer,
        log_every=log_every, eval_every=eval_every, evaluate=evaluate, checkpoint_every=checkpoint.every,
        checkpointer=ckpt, name=name)
    ckpt.save(step, state, force=True)
  if status == PREEMPTED:
    print(f"[{label}] preempted at step {step}: checkpoint written; rerun the same command to resume",
          file=sys.stderr)
    writer.close()
  return state, step, status
