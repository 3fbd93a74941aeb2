"""JAX's persistent compilation cache, on by default for training runs, and a log of compiled programs.

`enable(setting)` is called by the entry point (main.py) before anything compiles. Where the cache lives:

  config `compile_cache`   'off' | a folder | '' (auto, the default)
  auto                     $M2DINO_COMPILE_CACHE ('off' or a folder) if set; else JAX's own
                           $JAX_COMPILATION_CACHE_DIR if set (left as JAX configured it); else
                           ~/.cache/m2dino_jax/xla/<host> ($XDG_CACHE_HOME respected)

The default folder is per host kind (machine + CPU feature flags + jax version): XLA:CPU executables are
compiled for the host's instruction set, so a home directory shared by different nodes must not hand
one node's binaries to another. Every program is cached (minimum compile time 0 s, unless
$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise), so a second run of the same config compiles
nothing. Multi-process runs are safe: JAX writes cache entries from process 0 only, the others read; an
entry that cannot be read (e.g. still being written) is a warning and a normal compile, never an error.

`CompileLog` records every program JAX hands to XLA (name, wall and CPU seconds, persistent-cache hit or not), from
JAX's monitoring events; with $M2DINO_COMPILE_LOG set, the entry point writes it there as JSON.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from pathlib import Path

import jax

from m2dino_jax import fileio
from m2dino_jax.errors import ConfigError

ENV = "M2DINO_COMPILE_CACHE"
LOG_ENV = "M2DINO_COMPILE_LOG"
OFF = ("off", "none", "false", "0")


def host_tag() -> str:
  """A short tag of this host kind: machine, CPU feature flags and the jax version."""
  flags = ""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        flags = line
        break
  except OSError:
    pass
  digest = hashlib.sha256(f"{platform.machine()}|{flags}|{jax.__version__}".encode()).hexdigest()[:12]
  return f"{platform.machine()}-{digest}"


def default_dir() -> Path:
  base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
  return base / "m2dino_jax" / "xla" / host_tag()


def resolve(setting: str | None) -> tuple[Path | None, str]:
  """(folder or None when off, where the choice came from) for a config value (see the module doc)."""
  setting = str(setting or "").strip()
  source = "config compile_cache"
  if not setting:
    setting, source = os.environ.get(ENV, "").strip(), f"${ENV}"
  if not setting:
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
      return Path(os.environ["JAX_COMPILATION_CACHE_DIR"]), "$JAX_COMPILATION_CACHE_DIR"
    return default_dir(), "default"
  if setting.lower() in OFF:
    return None, source
  return Path(setting).expanduser(), source


def enable(setting: str | None = "", *, log: bool = True) -> Path | None:
  """Points JAX's persistent compilation cache at the resolved folder (or turns it off); returns the folder."""
  folder, source = resolve(setting)
  if folder is None:
    jax.config.update("jax_enable_compilation_cache", False)
    if log and jax.process_index() == 0:
      print(f"compile cache: off ({source})", file=sys.stderr)
    return None
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    key = "compile_cache" if source.startswith("config") else source
    raise ConfigError(key, f"cannot create the compilation cache folder {folder}: {e.strerror}") from None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if log and jax.process_index() == 0:
    entries = sum(1 for _ in folder.glob("*-cache"))
    print(f"compile cache: {folder} ({entries} entries; {source})", file=sys.stderr)
  return folder


class CompileLog:
  """Context manager recording the programs compiled inside it: `programs` = [{name, seconds, cache_hit}]."""

  _active: list[CompileLog] = []
  _registered = False

  def __init__(self):
    self.programs: list[dict] = []
    self._hit = False
    self._cpu0 = 0.0

  @classmethod
  def _register(cls) -> None:
    if cls._registered:
      return
    from jax import monitoring
    from jax._src import dispatch

    def on_event(event: str, **kwargs) -> None:
      if event == "/jax/compilation_cache/cache_hits":
        for log in cls._active:
          log._hit = True

    def on_start(event: str, value: float, **kwargs) -> None:
      if event == dispatch.BACKEND_COMPILE_EVENT:  # recorded when a compile starts
        for log in cls._active:
          log._cpu0 = time.process_time()

    def on_duration(event: str, seconds: float, **kwargs) -> None:
      if event != dispatch.BACKEND_COMPILE_EVENT:
        return
      for log in cls._active:
        log.programs.append({"name": str(kwargs.get("fun_name", "?")), "seconds": float(seconds),
                             "cpu_seconds": time.process_time() - log._cpu0, "cache_hit": log._hit})
        log._hit = False

    monitoring.register_event_listener(on_event)
    monitoring.register_scalar_listener(on_start)
    monitoring.register_event_duration_secs_listener(on_duration)
    cls._registered = True

  def __enter__(self) -> CompileLog:
    self._register()
    self._active.append(self)
    return self

  def __exit__(self, *exc) -> None:
    self._active.remove(self)

  @property
  def compiled(self) -> list[dict]:
    """The programs XLA really compiled (not loaded from the persistent cache)."""
    return [p for p in self.programs if not p["cache_hit"]]

  def summary(self) -> dict:
    return {"programs": len(self.programs), "compiled": len(self.compiled),
            "cache_hits": len(self.programs) - len(self.compiled),
            "compile_s": sum(p["seconds"] for p in self.compiled),
            "compile_cpu_s": sum(p["cpu_seconds"] for p in self.compiled),
            "total_s": sum(p["seconds"] for p in self.programs), "log": self.programs}

  def summary_line(self) -> str:
    s = self.summary()
    return (f"compiled {s['compiled']} programs in {s['compile_s']:.1f} s ({s['compile_cpu_s']:.1f} CPU s); "
            f"{s['cache_hits']} loaded from the persistent cache in {s['total_s'] - s['compile_s']:.1f} s")

  def write(self, path) -> None:
    fileio.write_json(Path(path), self.summary())
