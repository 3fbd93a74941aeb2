"""The `m2dino` command line.

Each subcommand lives in its own module, imported only when used, which exposes
`register(subparsers)`; the registered parser sets `func(args) -> int | None`.
Project errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from m2dino_jax.errors import M2DinoError

# subcommand name -> module defining register(subparsers).
COMMANDS = {
    "advise": "m2dino_jax.advise.cli",
    "bench": "m2dino_jax.bench.cli",
    "convert": "m2dino_jax.models.convert_cli",
    "data": "m2dino_jax.data.cli",
    "eval": "m2dino_jax.evals.cli",
    "predict": "m2dino_jax.infer.predict_cli",
    "report": "m2dino_jax.report.cli",
    "scaling": "m2dino_jax.scaling.cli",
    "train": "m2dino_jax.main",
}


class Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line (no usage block; `--help` still shows it), exit status 2.
  Subcommand parsers inherit the class."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(low: int):
  """argparse type: an integer >= low (one-line error naming the argument otherwise)."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"{value} is out of range; expected an integer >= {low}")
    return value
  parse.__name__ = f"integer >= {low}"
  return parse


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
  parser = Parser(prog="m2dino", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  wanted = argv[0] if argv and argv[0] in COMMANDS else None
  for name, module in COMMANDS.items():
    if wanted is not None and name != wanted:
      sub.add_parser(name)
      continue
    try:
      mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
      if e.name != module:
        raise
      continue  # not built yet
    mod.register(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  overrides: list[str] = []
  if argv and argv[0] in ("train", "advise"):
    from m2dino_jax.main import split_overrides
    try:
      argv, overrides = split_overrides(argv)
    except M2DinoError as e:
      print(f"m2dino train: error: {e}", file=sys.stderr)
      return 2
  parser = build_parser(argv)
  args = parser.parse_args(argv)
  if overrides:
    args.overrides = overrides
  if not getattr(args, "func", None):
    parser.print_help()
    return 2
  try:
    return int(args.func(args) or 0)
  except M2DinoError as e:
    print(f"m2dino {args.command}: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # read-only or full disk, missing folders: one line naming the path
    from m2dino_jax.configlib import os_error_line
    print(f"m2dino {args.command}: error: {os_error_line(e)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
