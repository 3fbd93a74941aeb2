"""`--config.profile.steps=A:B`: a jax.profiler trace of train steps A .. B-1, written to WORKDIR/profile.

Works for every trainer (it is a loop.AFTER_STEP_HOOKS observer installed by the entry point): the trace
starts once step A-1 has finished (before the first step when A = 1, compile included) and stops once step
B-1 has finished, blocking on the state both times so the trace holds exactly those steps. Each process
writes its own trace. View it with TensorBoard's profile plugin (`tensorboard --logdir WORKDIR/profile`) or
drop WORKDIR/profile/plugins/profile/*/*.trace.json.gz / perfetto_trace.json.gz on https://ui.perfetto.dev.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import jax

from m2dino_jax.errors import ConfigError


def parse_steps(spec: str) -> tuple[int, int] | None:
  """'A:B' -> (A, B) with 1 <= A < B; '' -> None."""
  spec = str(spec or "").strip()
  if not spec:
    return None
  a, sep, b = spec.partition(":")
  try:
    start, stop = int(a), int(b)
  except ValueError:
    start = stop = 0
  if not sep or not 1 <= start < stop:
    raise ConfigError("profile.steps", f"bad value '{spec}'; use START:STOP with 1 <= START < STOP (steps "
                      "START .. STOP-1 are traced), e.g. 10:15")
  return start, stop


class StepProfiler:
  """AFTER_STEP_HOOKS observer tracing steps [start, stop)."""

  def __init__(self, start: int, stop: int, logdir):
    self.start, self.stop, self.logdir = start, stop, Path(logdir)
    self.active = self.done = False
    self.steps: list[int] = []

  def _begin(self, state=None) -> None:
    if state is not None:
      jax.block_until_ready(state)
    self.logdir.mkdir(parents=True, exist_ok=True)
    jax.profiler.start_trace(str(self.logdir), create_perfetto_trace=True)
    self.active = True

  def _end(self, state=None) -> None:
    if state is not None:
      jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active, self.done = False, True
    if jax.process_index() == 0:
      print(f"profile of steps {self.steps[0] if self.steps else '-'}..{self.steps[-1] if self.steps else '-'} "
            f"written to {self.logdir}", file=sys.stderr)

  def begin_run(self) -> None:
    """Called before the first step: a trace from step 1 starts here."""
    if self.start == 1 and not self.done:
      self._begin()

  def __call__(self, step: int, state, checkpointer=None) -> None:
    if self.done:
      return
    if self.active:
      self.steps.append(step)
      if step >= self.stop - 1:
        self._end(state)
    elif self.start - 1 <= step < self.stop - 1:
      self._begin(state)

  def close(self) -> None:
    if self.active:
      self._end()


@contextlib.contextmanager
def maybe_profile(config, workdir):
  """Installs a StepProfiler for the run when `config.profile.steps` is set (else does nothing)."""
  from m2dino_jax.train import loop
  prof = config.get("profile") if hasattr(config, "get") else None
  steps = parse_steps(prof.get("steps", "") if prof else "")
  if steps is None:
    yield None
    return
  profiler = StepProfiler(*steps, Path(workdir) / "profile")
  loop.AFTER_STEP_HOOKS.append(profiler)
  profiler.begin_run()
  try:
    yield profiler
  finally:
    loop.AFTER_STEP_HOOKS.remove(profiler)
    profiler.close()
