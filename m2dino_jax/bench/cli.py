"""`m2dino bench NAME`: each benchmark is a module in m2dino_jax.bench with `add_args(p)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib

# benchmark name -> module (registry; modules are imported lazily).
BENCHMARKS = {
    "encoder": "m2dino_jax.bench.encoder",
    "moe": "m2dino_jax.bench.moe",
    "data": "m2dino_jax.bench.data",
    "scaling": "m2dino_jax.bench.scaling",
    "train": "m2dino_jax.bench.train",
    "ssl": "m2dino_jax.bench.ssl",
}


def register(sub) -> None:
  p = sub.add_parser("bench", help="run a benchmark, print a table and write JSON")
  bsub = p.add_subparsers(dest="bench", metavar="NAME")
  for name, module in BENCHMARKS.items():
    try:
      mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
      if e.name != module:
        raise
      continue
    bp = bsub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None,
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bp.add_argument("--out", default=f"bench_{name}.json", help="JSON file for the results")
    mod.add_args(bp)
    bp.set_defaults(func=mod.run)
