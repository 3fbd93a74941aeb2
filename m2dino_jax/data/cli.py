"""`m2dino data COMMAND`: dataset tools (build ArrayRecord datasets, synthesise data, ...).

Each sub-subcommand is a module exposing `add_args(parser)` and `run(args) -> int | None`, listed in
COMMANDS and imported lazily; a module not written yet is simply absent from the help.
"""

from __future__ import annotations

import argparse
import importlib

# sub-subcommand name -> module with add_args(parser) and run(args).
COMMANDS = {
    "build": "m2dino_jax.data.tfds.cli",
    "synth": "m2dino_jax.data.sonosynth.cli",
}


def register(sub) -> None:
  p = sub.add_parser("data", help="dataset tools: build ArrayRecord datasets, synthesise ultrasound")
  dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
  for name, module in COMMANDS.items():
    try:
      mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
      if e.name != module:
        raise
      continue  # not built yet
    doc = (mod.__doc__ or "").strip().splitlines()
    dp = dsub.add_parser(name, help=doc[0] if doc else None, description=mod.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_args(dp)
    dp.set_defaults(func=mod.run)
