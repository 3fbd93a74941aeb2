"""Shared benchmark helpers: timing with warm-up, a printed table, JSON output."""

from __future__ import annotations

import platform
import time

import jax

from m2dino_jax import fileio


def time_fn(fn, *, warmup: int = 1, repeats: int = 5) -> dict:
  """Times `fn()` (which must block until its result is ready); returns seconds per call."""
  t0 = time.perf_counter()
  for _ in range(warmup):
    fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  times.sort()
  return {"median_s": times[len(times) // 2], "min_s": times[0], "warmup_s": first, "repeats": repeats}


def machine_info() -> dict:
  return {"platform": platform.platform(), "processor": platform.processor(),
          "jax_backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}


def print_table(rows: list[dict], columns: list[str]) -> None:
  widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
  print("  ".join(c.ljust(widths[c]) for c in columns))
  for r in rows:
    print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return "" if v is None else str(v)


def write_results(path, name: str, rows: list[dict], **extra) -> None:
  fileio.write_json(path, {"benchmark": name, "machine": machine_info(), "rows": rows, **extra})
  print(f"wrote {path}")


def time_round_robin(fns: dict, repeats: int) -> dict:
  """Times several calls round-robin (after one warm-up each), so that a shared machine's changing load hits
  them alike. Returns {name: {'median_s', 'min_s' (wall), 'cpu_s' (median CPU seconds of this process, all
  threads)}}: on an oversubscribed machine the CPU time is the stable measure of the work done."""
  import numpy as np
  for fn in fns.values():
    fn()
  wall = {name: [] for name in fns}
  cpu = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t, c = time.perf_counter(), time.process_time()
      fn()
      cpu[name].append(time.process_time() - c)
      wall[name].append(time.perf_counter() - t)
  return {name: {"median_s": float(np.median(wall[name])), "min_s": float(np.min(wall[name])),
                 "cpu_s": float(np.median(cpu[name]))} for name in fns}
