"""Entry point: `python -m m2dino_jax.main --config=configs/NAME.py:ARGS --workdir=DIR [--config.k=v ...]`.

Loads a locked config (big_vision style, see configlib), applies `--config.*` overrides, starts
`jax.distributed` when the run spans several processes, turns on JAX's persistent compilation cache
(`config.compile_cache`, $M2DINO_COMPILE_CACHE; train/compile_cache.py) and hands over to the trainer
that `config.trainer` names. Also available as `m2dino train ...`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from m2dino_jax import configlib
from m2dino_jax.errors import ConfigError, M2DinoError

# trainer name -> module exposing train_and_evaluate(config, workdir) (registry; imported lazily). It returns
# a status ("completed" / "preempted"); a preempted run has written its checkpoint and exits with 0.
TRAINERS = {
    "multitask": "m2dino_jax.train.multitask",
    "dino": "m2dino_jax.train.dino",
    "mae": "m2dino_jax.train.mae",
    "features": "m2dino_jax.infer.features",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", required=True, help="configs/NAME.py[:ARGS], e.g. configs/m2dino.py:paradigm=au,smoke")
  p.add_argument("--workdir", required=True, help="output folder (checkpoints, metrics, eval)")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates '--config.a.b=v' / '--config.a.b v' overrides from the other arguments."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      body = arg[len("--config."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise ConfigError(body, "override needs a value")
        body, i = f"{body}={argv[i + 1]}", i + 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def get_trainer(name: str):
  if name not in TRAINERS:
    raise ConfigError("trainer", f"unknown trainer '{name}'; known: {', '.join(TRAINERS)}")
  try:
    return importlib.import_module(TRAINERS[name])
  except ModuleNotFoundError as e:
    if e.name == TRAINERS[name]:
      raise ConfigError("trainer", f"trainer '{name}' is not available in this version") from None
    raise


def run(args) -> int:
  config = configlib.load_config(args.config, args.overrides)
  import jax

  from m2dino_jax.train import compile_cache, distributed
  distributed.maybe_initialize(config)
  compile_cache.enable(config.get("compile_cache", ""))
  trainer = get_trainer(config.trainer)
  log_path = os.environ.get(compile_cache.LOG_ENV)
  with compile_cache.CompileLog() as log:
    trainer.train_and_evaluate(config, args.workdir)
  if jax.process_index() == 0:
    print(log.summary_line(), file=sys.stderr)
    if log_path:
      log.write(log_path)
  return 0


def register(sub) -> None:
  p = sub.add_parser("train", help="train from a config (same as python -m m2dino_jax.main)")
  add_arguments(p)
  p.set_defaults(func=run, overrides=[])


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    rest, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m m2dino_jax.main", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(rest)
    args.overrides = overrides
    return run(args)
  except M2DinoError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
