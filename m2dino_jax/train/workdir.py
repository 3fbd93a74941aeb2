"""Workdir ownership: one run per workdir (a lock file) and one config per run (config.json compared on resume).

  WORKDIR/m2dino.lock   {host, pid, start, argv} of the run holding the workdir, locked with flock(2) for the
                        run's lifetime: the kernel drops the lock when the process dies (even by SIGKILL), so a
                        lock file left by a dead run is stale and taken over with one warning line. On a
                        filesystem without locks, a lock of a live process on this host still refuses.
  WORKDIR/config.json   the run's config, written by the trainer once the config has been validated (built
                        a model and its data). A rerun on the same workdir must bring the same config: a
                        difference is refused naming the keys; `--config.resume_policy=override` accepts
                        changes to safe keys (steps, intervals, checkpointing, mesh, optimiser), never to the
                        model, data or tasks.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from m2dino_jax import fileio
from m2dino_jax.errors import ConfigError, M2DinoError

LOCK = "m2dino.lock"
POLICIES = ("strict", "override")
# keys a rerun may change with --config.resume_policy=override (exact keys, or prefixes ending with '.')
SAFE_KEYS = ("total_steps", "steps_per_task", "epochs", "epoch_length", "log_every", "eval_every", "eval_at_start",
             "tensorboard", "mesh_devices", "sharding", "measurements", "checkpoint.", "mesh.", "distributed.",
             "optim.", "monitor.", "data.worker_count", "data.prefetch")


class WorkdirBusy(M2DinoError):
  """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _describe(info: dict) -> str:
  return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (started {info.get('start', '?')})"


class WorkdirLock:
  """Holds WORKDIR/m2dino.lock for the life of a run (a context manager; `release` is idempotent)."""

  def __init__(self, workdir):
    self.workdir = Path(workdir)
    self.path = self.workdir / LOCK
    self.fd: int | None = None
    self.created_workdir = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, exc_type, *exc):
    self.release(remove_empty_workdir=exc_type is not None)

  def acquire(self) -> None:
    if not self.workdir.exists():
      try:
        self.workdir.mkdir(parents=True)
      except OSError as e:
        raise M2DinoError(f"{self.workdir}: cannot create the workdir ({e.strerror or e})") from None
      self.created_workdir = True
    for _ in range(5):  # retried when the lock file was replaced between open and lock
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      except OSError as e:
        raise M2DinoError(f"{self.path}: cannot create the workdir lock ({e.strerror or e}); "
                          "is the workdir writable?") from None
      previous = self._read(fd)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise WorkdirBusy(f"{self.workdir} is in use by another run: {_describe(previous)} holds {self.path}; "
                          "wait for it to finish or choose another --workdir") from None
      except OSError:  # no locking on this filesystem: fall back to the recorded pid
        if previous and previous.get("host") == socket.gethostname() and previous.get("pid") != os.getpid() \
            and _pid_alive(int(previous.get("pid", -1))):
          os.close(fd)
          raise WorkdirBusy(f"{self.workdir} is in use by another run: {_describe(previous)} holds "
                            f"{self.path}; wait for it to finish or choose another --workdir") from None
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      previous = self._read(fd)
      if previous and previous.get("pid") != os.getpid():
        print(f"warning: {self.workdir}: taking over a stale lock of {_describe(previous)}, which is no longer "
              "running", file=sys.stderr)
      info = {"host": socket.gethostname(), "pid": os.getpid(),
              "start": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "argv": sys.argv}
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
      os.fsync(fd)
      self.fd = fd
      return
    raise WorkdirBusy(f"{self.path}: the lock file keeps changing; is another run starting on {self.workdir}?")

  @staticmethod
  def _read(fd: int) -> dict:
    try:
      os.lseek(fd, 0, os.SEEK_SET)
      data = os.read(fd, 1 << 16)
      info = json.loads(data.decode()) if data.strip() else {}
      return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
      return {}

  def release(self, remove_empty_workdir: bool = False) -> None:
    """Removes the lock file (then unlocks); on a failed start, also the workdir this lock created if it holds
    nothing else (a refused run leaves nothing behind)."""
    if self.fd is None:
      return
    with contextlib.suppress(OSError):
      os.remove(self.path)
    os.close(self.fd)
    self.fd = None
    if remove_empty_workdir and self.created_workdir:
      with contextlib.suppress(OSError):
        self.workdir.rmdir()  # only if empty


def _flatten(obj, prefix: str = "") -> dict:
  if isinstance(obj, dict):
    out = {}
    for k, v in obj.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: obj}


def _safe(key: str) -> bool:
  return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_KEYS)


def config_differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
  """[(key, old value, new value)] over the flattened configs (missing keys show as None)."""
  a, b = _flatten(old), _flatten(new)
  missing = object()
  out = []
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key, missing), b.get(key, missing)
    if va != vb:
      out.append((key, None if va is missing else va, None if vb is missing else vb))
  return out


def check_config(workdir, config, policy: str = "strict") -> None:
  """Refuses a config that differs from the run already in `workdir` (its config.json), naming the keys."""
  if policy not in POLICIES:
    raise ConfigError("resume_policy", f"'{policy}' is not one of {', '.join(POLICIES)}")
  path = Path(workdir) / "config.json"
  if not path.is_file():
    return
  old = fileio.read_json(path, "run config")
  if not isinstance(old, dict):
    raise ConfigError("config", f"{path} is not a config (a JSON object expected)")
  diffs = config_differences(old, json.loads(config.to_json_best_effort()))
  if not diffs:
    return
  unsafe = [d for d in diffs if not _safe(d[0])]
  shown = unsafe if unsafe else diffs
  listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in shown[:4]) + (f" (+{len(shown) - 4} more)"
                                                                         if len(shown) > 4 else "")
  keys = ", ".join(k for k, _, _ in shown[:4])
  if unsafe:
    raise ConfigError(keys, f"differs from the run in {workdir} ({listed}); the model, data and tasks of an "
                      "existing run cannot change: use its config or a new --workdir")
  if policy != "override":
    raise ConfigError(keys, f"differs from the run in {workdir} ({listed}); pass --config.resume_policy=override "
                      "to continue it with these changes, or use a new --workdir")
  print(f"warning: resuming {workdir} with changed keys ({listed})", file=sys.stderr)


def write_config(workdir, config) -> None:
  """WORKDIR/config.json (what predict preprocesses with); call once the config has been validated."""
  text = config.to_json_best_effort(indent=2)
  path = Path(workdir) / "config.json"
  if not path.is_file() or path.read_text() != text:
    fileio.write_text(path, text)
