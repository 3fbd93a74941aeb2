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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Appends "(default: X)" only where a default is worth showing: not on required options or flags, not
  for None / '' / [] defaults, and not where the help already states its default (no doubled default)."""

  def _get_help_string(self, action):
    text, d = action.help or "", action.default
    empty = d is None or d is argparse.SUPPRESS or (isinstance(d, str | list | tuple) and not d)
    if action.required or action.nargs == 0 or empty or any(k in text for k in ("(default", "default:", "%(default")):
      return text
    return super()._get_help_string(action)


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
  """`HelpFormatter` keeping the description's line breaks (module docstrings with usage lines)."""


class Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line (no usage block; `--help` still shows it), exit status 2,
  and whose help shows defaults by `HelpFormatter`. Subcommand parsers inherit the class."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("formatter_class", HelpFormatter)
    super().__init__(*args, **kwargs)

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
  describe(parser)
  return parser


def subcommands(parser: argparse.ArgumentParser):
  """(subparsers action, {name: parser}, {name: one-line help}) of each subcommand level under `parser`; an alias
  (`m2dino bench dino` for `ssl`) is left out: it is the same parser as its command."""
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      choices = {}
      for name, sub in action.choices.items():
        if all(sub is not seen for seen in choices.values()):
          choices[name] = sub
      yield action, choices, {a.dest: a.help for a in action._choices_actions}


def describe(parser: argparse.ArgumentParser) -> None:
  """Gives every subcommand without its own description its one-line help as description (recursively)."""
  for _, choices, helps in subcommands(parser):
    for name, sub in choices.items():
      if not sub.description and helps.get(name):
        sub.description = helps[name]
      describe(sub)


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
