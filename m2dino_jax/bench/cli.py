"""`m2dino bench NAME|all|report`: the benchmark suite.

  m2dino bench train --variant B/16 --jax bfloat16          one benchmark, full size (bf16 JAX step)
  m2dino bench all --smoke                                   every benchmark at smoke size (CI: about a minute)
  m2dino bench report                                        bench_results/*.json -> bench_results/PERFORMANCE.md
  m2dino bench report --readme README.md                     ... and spliced into README.md between its markers

Every indented line that starts with `m2dino bench` in the docstrings of this package parses with the real parser
(tests/test_bench_suite.py); text after two or more spaces is a comment.

Each benchmark is a module in m2dino_jax.bench with `add_args(p)`, `run(args)` and `SMOKE` (the argument
values of its smoke size); results go to bench_results/NAME.json in the schema of bench/common.py.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback

# benchmark name -> module (registry; modules are imported lazily). `all` runs them in this order.
BENCHMARKS = {
    "encoder": "m2dino_jax.bench.encoder",
    "train": "m2dino_jax.bench.train",
    "moe": "m2dino_jax.bench.moe",
    "data": "m2dino_jax.bench.data",
    "scaling": "m2dino_jax.bench.scaling",
    "sonosynth": "m2dino_jax.bench.sonosynth",
    "ssl": "m2dino_jax.bench.ssl",
    "mae3d": "m2dino_jax.bench.mae3d",
    "compile": "m2dino_jax.bench.compile_time",
}
# earlier names of benchmarks that measured the same step (run the one they name; not run again by `all`)
ALIASES = {"ssl": ["dino"], "mae3d": ["mae"]}
RESULTS = "bench_results"


def _load(name: str):
  module = BENCHMARKS[name]
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name != module:
      raise
    return None


def _add_common(p, name: str) -> None:
  p.add_argument("--out", default=f"{RESULTS}/{name}.json", help="JSON file for the results")
  p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds; numbers not meaningful)")
  p.add_argument("--peak-tflops", type=float, default=0.0,
                 help="peak TFLOP/s per device for MFU (default: the table for accelerators, measured on CPU)")


def apply_smoke(args, mod, parser) -> None:
  """Sets the module's SMOKE values on every argument still at its default (explicit flags win)."""
  if not getattr(args, "smoke", False):
    return
  for dest, value in getattr(mod, "SMOKE", {}).items():
    if getattr(args, dest) == parser.get_default(dest):
      setattr(args, dest, value)


def _runner(mod, parser):
  def run(args):
    apply_smoke(args, mod, parser)
    return mod.run(args)
  return run


def register(sub) -> None:
  p = sub.add_parser("bench", help="run benchmarks, print tables and write JSON (bench_results/)")
  bsub = p.add_subparsers(dest="bench", metavar="NAME")
  parsers = {}
  for name in BENCHMARKS:
    mod = _load(name)
    if mod is None:
      continue
    bp = bsub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None,
                         aliases=ALIASES.get(name, []))
    _add_common(bp, name)
    mod.add_args(bp)
    bp.set_defaults(func=_runner(mod, bp))
    parsers[name] = (mod, bp)
  ap = bsub.add_parser("all", help="every benchmark in turn (--smoke for CI)")
  ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds; numbers not meaningful)")
  ap.add_argument("--out-dir", default=RESULTS, help="folder for the JSON results (one file per benchmark)")
  ap.add_argument("--only", default="", help="comma list of benchmarks (default: all)")
  ap.add_argument("--skip", default="", help="comma list of benchmarks to leave out")
  ap.add_argument("--peak-tflops", type=float, default=0.0, help="peak TFLOP/s per device for MFU")
  ap.set_defaults(func=lambda args: run_all(args, parsers))
  rp = bsub.add_parser("report", help="README performance section (Markdown) from the JSON results")
  rp.add_argument("--results", default=RESULTS, help="folder of benchmark JSON files")
  rp.add_argument("--out", default=f"{RESULTS}/PERFORMANCE.md", help="Markdown file to write")
  rp.add_argument("--readme", default="",
                  help="also splice the section into this file between <!-- bench:begin --> and <!-- bench:end --> "
                       "(created under '## Performance' when absent)")
  rp.set_defaults(func=lambda args: importlib.import_module("m2dino_jax.bench.report").run(args))


def run_all(args, parsers: dict) -> int:
  """Runs each benchmark with its defaults (or SMOKE sizes); a failure is reported and the suite goes on."""
  only = [n for n in args.only.split(",") if n]
  skip = set(n for n in args.skip.split(",") if n)
  unknown = [n for n in [*only, *skip] if n not in parsers]
  if unknown:
    from m2dino_jax.errors import ConfigError
    raise ConfigError("bench", f"unknown benchmark(s) {unknown}; known: {', '.join(parsers)}")
  names = [n for n in (only or parsers) if n not in skip]
  device, failed, times = None, [], {}
  for name in names:
    mod, parser = parsers[name]
    sub = parser.parse_args([])
    sub.smoke, sub.peak_tflops, sub.out = args.smoke, args.peak_tflops, f"{args.out_dir}/{name}.json"
    sub._device = device
    apply_smoke(sub, mod, parser)
    print(f"\n=== bench {name}{' (smoke)' if args.smoke else ''} ===", flush=True)
    t0 = time.perf_counter()
    try:
      code = mod.run(sub)
    except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others' numbers
      traceback.print_exc()
      code = 1
    times[name] = time.perf_counter() - t0
    device = getattr(sub, "_device", None) or device
    if code:
      failed.append(name)
    sys.stdout.flush()
  print("\nsuite: " + ", ".join(f"{n} {t:.1f} s" for n, t in times.items()) + f"; total {sum(times.values()):.1f} s")
  if failed:
    print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0
