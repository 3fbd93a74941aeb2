"""`m2dino data ...`: dataset commands.

SUBCOMMANDS is a small registry: name -> (help, add_args(parser), run(args)). Each run imports
what it needs lazily, so `m2dino data --help` stays fast. Add a command by adding an entry.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable


def _synth_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
  p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same data")
  p.add_argument("--scale", type=float, default=1.0,
                 help="dataset size multiplier (1: 80..1200 images per task; 0.1: the CPU demo, 8..120)")
  p.add_argument("--size", type=int, default=256, help="image side in pixels")
  p.add_argument("--tasks", nargs="+", default=None, help="task ids (default: all 27)")
  p.add_argument("--val-fraction", type=float, default=0.2, help="share of each task in data/val")
  p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                 help="simulation processes (the output is identical for any count)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
  p.add_argument("--nuisance", default=None,
                 help="opt-in scanner artefacts, comma separated: gain, tgc, crop, text, calipers (leak the "
                      "label, as in real data), jpeg, or all (default: none)")


def _synth_run(args) -> int:
  from m2dino_jax.data.sonosynth import writer

  tasks = [t for item in args.tasks for t in item.split(",") if t] if args.tasks else None
  manifest = writer.write_dataset(args.out, seed=args.seed, scale=args.scale, size=args.size, tasks=tasks,
                                  val_fraction=args.val_fraction, workers=args.workers,
                                  overwrite=args.overwrite, nuisance=args.nuisance)
  print(f"wrote {manifest['total_images']} simulated images for {len(manifest['tasks'])} tasks to "
        f"{args.out} in {manifest['seconds']:.1f} s")
  return 0


def _build_args(p: argparse.ArgumentParser) -> None:
  from m2dino_jax.data.tfds import cli as tfds_cli

  tfds_cli.add_args(p)


def _build_run(args) -> int:
  from m2dino_jax.data.tfds import cli as tfds_cli

  return tfds_cli.run(args)


SUBCOMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "build": ("convert a dataset as released (--manual-dir) to ArrayRecord with TFDS, no TensorFlow",
              _build_args, _build_run),
    "synth": ("simulate the 27-task ultrasound dataset (sonosynth) in the FMC_UIA layout",
              _synth_args, _synth_run),
}


def register(sub) -> None:
  p = sub.add_parser("data", help="dataset commands: " + ", ".join(SUBCOMMANDS))
  dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
  for name, (help_text, add_args, run) in SUBCOMMANDS.items():
    sp = dsub.add_parser(name, help=help_text, description=help_text)
    add_args(sp)
    sp.set_defaults(func=run)
