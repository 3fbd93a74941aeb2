"""Shared benchmark helpers: timing with warm-up, throughput and MFU, a printed table, and the one JSON schema.

Every benchmark writes one JSON object (schema SCHEMA, checked by `validate`):

  schema, benchmark, date (UTC ISO), smoke        what ran, when, and whether at smoke size
  machine   hostname, platform, processor, python, cpu_count (cores this process may use)
  versions  jax, jaxlib, flax, optax, orbax-checkpoint, grain, numpy (+ torch when the benchmark used it)
  device    backend, kind, count (global), local_count, process_count, peak_tflops_per_device, peak_source,
            peak_dtype (bench/peaks.py)
  settings  the command-line settings;  shapes  the sizes that determine the work (batch, image, tokens, ...)
  rows      one dict per measured thing: `name`, `median_s` (seconds per timed call, compile excluded; None for
            rows that are not timings) and, where it applies, min_s, repeats, images_per_s_per_device,
            tflops_per_device (analytic FLOPs), xla_tflops_per_device (XLA cost analysis), mfu
  ratios    {name: value} comparisons taken in this run (e.g. 'jax_over_torch_images_per_s')
  compile_s {name: seconds} compile (or first-call) times, reported apart from the medians
  ... plus benchmark-specific fields.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import socket
import sys
import time

import jax
import numpy as np

from m2dino_jax import fileio
from m2dino_jax.bench import peaks

SCHEMA = "m2dino-bench/1"
REQUIRED = {"schema": str, "benchmark": str, "date": str, "smoke": bool, "machine": dict, "versions": dict,
            "device": dict, "settings": dict, "shapes": dict, "rows": list, "ratios": dict, "compile_s": dict}
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "scipy", "torch", "transformers")


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
  return {"median_s": float(np.median(times)), "min_s": times[0], "warmup_s": first, "repeats": repeats}


def time_interleaved(fns: dict, repeats: int) -> dict:
  """Times several blocking calls round-robin (after one warm-up each), so that a shared machine's changing
  load hits them alike; returns {name: {'median_s', 'min_s', 'repeats'}}."""
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return {name: {"median_s": float(np.median(v)), "min_s": float(np.min(v)), "repeats": repeats}
          for name, v in times.items()}


def config_path(name: str) -> str:
  """configs/NAME of this checkout (benchmarks build their models from the experiment configs)."""
  from pathlib import Path
  here = Path(__file__).resolve().parents[2] / "configs" / name
  return str(here if here.is_file() else Path("configs") / name)


def program_devices(compiled) -> int:
  """Devices a compiled (SPMD) program runs on: the largest device set among its input shardings."""
  try:
    shardings = jax.tree.leaves(compiled.input_shardings)
  except Exception:  # noqa: BLE001 - a backend without sharding information: one device
    return 1
  return max((len(s.device_set) for s in shardings if hasattr(s, "device_set")), default=1)


def xla_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled XLA program, all devices together, from its cost analysis (None when the
  backend gives none). XLA analyses the partitioned per-device program, so its count is multiplied by the
  program's devices (replicated work, such as a data-parallel optimiser update, then counts once per device)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  value = float((cost or {}).get("flops", 0.0))
  return value * program_devices(compiled) if value > 0 else None


# ------------------------------------------------------------------------------------------ machine / device


def machine_info() -> dict:
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"hostname": socket.gethostname(), "platform": platform.platform(), "processor": platform.processor(),
          "python": sys.version.split()[0], "cpu_count": cores}


def versions(extra_modules=()) -> dict:
  """Versions of the packages that shape the numbers (torch and transformers only if imported)."""
  out = {}
  for name in PACKAGES:
    if name in ("torch", "transformers") and name not in sys.modules and name not in extra_modules:
      continue
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return out


def device_info(peak_tflops: float | None = None, smoke: bool = False) -> dict:
  d = jax.devices()[0]
  return {"backend": jax.default_backend(), "kind": d.device_kind, "count": jax.device_count(),
          "local_count": jax.local_device_count(), "process_count": jax.process_count(),
          **peaks.device_peak(d.device_kind, d.platform, peak_tflops, smoke)}


def device_of(args) -> dict:
  """This run's device description (peak measured once per process and cached on `args`)."""
  if getattr(args, "_device", None) is None:
    args._device = device_info(getattr(args, "peak_tflops", None), bool(getattr(args, "smoke", False)))
  return args._device


def throughput(args, *, images: float, seconds: float, flops: float | None = None,
               xla: float | None = None, devices: int = 1, peak_applies: bool = True) -> dict:
  """Per-device rates of a step that processes `images` and does `flops` (analytic) / `xla` FLOPs (all devices
  together) in `seconds` on `devices` devices, and its MFU against the device's peak. `peak_applies=False`
  for a step that did not run on this run's devices (a CPU reference on an accelerator host): no MFU."""
  dev = device_of(args)
  peak = dev["peak_tflops_per_device"] if peak_applies else None
  out = {"images_per_s_per_device": images / seconds / devices if images else None,
         "tflops_per_device": flops / seconds / devices / 1e12 if flops else None,
         "xla_tflops_per_device": xla / seconds / devices / 1e12 if xla else None,
         "mfu": peaks.mfu(flops, seconds, devices, peak) if flops else None}
  return out


def on_accelerator() -> bool:
  """Whether JAX's default backend is an accelerator (GPU / TPU), i.e. the peak is not this CPU's."""
  return jax.default_backend() != "cpu"


# ------------------------------------------------------------------------------------------ output


def print_table(rows: list[dict], columns: list[str]) -> None:
  widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
  print("  ".join(c.ljust(widths[c]) for c in columns))
  for r in rows:
    print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return "" if v is None else str(v)


def settings_of(args) -> dict:
  """The command-line settings of a benchmark (JSON-safe, private and callable fields dropped)."""
  out = {}
  for k, v in vars(args).items():
    if k.startswith("_") or callable(v) or k in ("func",):
      continue
    out[k] = v if isinstance(v, (int, float, str, bool, type(None))) else (list(v) if isinstance(v, (list, tuple))
                                                                           else str(v))
  return out


def result(args, name: str, rows: list[dict], *, shapes: dict | None = None, ratios: dict | None = None,
           compile_s: dict | None = None, **extra) -> dict:
  """The schema's object for one benchmark run (see the module docstring)."""
  out = {"schema": SCHEMA, "benchmark": name,
         "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
         "smoke": bool(getattr(args, "smoke", False)), "machine": machine_info(), "versions": versions(),
         "device": device_of(args), "settings": settings_of(args), "shapes": dict(shapes or {}),
         "rows": rows, "ratios": {k: float(v) for k, v in (ratios or {}).items() if v is not None},
         "compile_s": {k: float(v) for k, v in (compile_s or {}).items() if v is not None}}
  out.update(extra)
  return _jsonable(out)


def _jsonable(v):
  """NumPy scalars / arrays -> Python numbers / lists; NaN and inf -> None (JSON has neither)."""
  if isinstance(v, dict):
    return {str(k): _jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  if isinstance(v, np.ndarray):
    return _jsonable(v.tolist())
  if isinstance(v, (np.bool_, bool)):
    return bool(v)
  if isinstance(v, (np.integer, int)):
    return int(v)
  if isinstance(v, (np.floating, float)):
    return float(v) if np.isfinite(v) else None
  return v


def validate(obj) -> list[str]:
  """Problems with a benchmark JSON object (empty when it follows the schema)."""
  if not isinstance(obj, dict):
    return ["not a JSON object"]
  problems = [f"'{k}' missing or not {t.__name__}" for k, t in REQUIRED.items() if not isinstance(obj.get(k), t)]
  if problems:
    return problems
  if obj["schema"] != SCHEMA:
    problems.append(f"schema '{obj['schema']}' is not '{SCHEMA}'")
  for k in ("backend", "kind", "count", "peak_source"):
    if k not in obj["device"]:
      problems.append(f"device.{k} missing")
  if "jax" not in obj["versions"]:
    problems.append("versions.jax missing")
  if not obj["rows"]:
    problems.append("no rows")
  for i, row in enumerate(obj["rows"]):
    if not isinstance(row, dict) or not isinstance(row.get("name"), str):
      problems.append(f"rows[{i}]: no 'name'")
      continue
    med = row.get("median_s", "missing")
    if med == "missing" or not (med is None or (isinstance(med, (int, float)) and med > 0)):
      problems.append(f"rows[{i}] '{row['name']}': median_s must be a positive number or null")
  for k, v in {**obj["ratios"], **obj["compile_s"]}.items():
    if not isinstance(v, (int, float)):
      problems.append(f"'{k}': not a number")
  return problems


def write_results(args, name: str, rows: list[dict], **fields) -> dict:
  """Builds the schema's object, prints the ratios and compile times, writes args.out; returns the object."""
  obj = result(args, name, rows, **fields)
  problems = validate(obj)
  if problems:
    raise ValueError(f"benchmark '{name}' result does not follow {SCHEMA}: {'; '.join(problems)}")
  dev = obj["device"]
  peak = dev["peak_tflops_per_device"]
  print(f"device: {dev['count']} x {dev['kind']} ({dev['backend']}), peak "
        f"{'?' if peak is None else f'{peak:.4g}'} TFLOP/s per device ({dev['peak_source']})")
  if obj["ratios"]:
    print("ratios: " + ", ".join(f"{k} {v:.3g}" for k, v in obj["ratios"].items()))
  if obj["compile_s"]:
    print("compile / first call (s): " + ", ".join(f"{k} {v:.3g}" for k, v in obj["compile_s"].items()))
  fileio.write_json(args.out, obj)
  print(f"wrote {args.out}")
  return obj


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
