"""Entry point: `python -m m2dino_jax.main --config=configs/NAME.py:ARGS --workdir=DIR [--config.k=v ...]`.

Loads a locked config (big_vision style, see configlib), applies `--config.*` overrides, starts
`jax.distributed` when the run spans several processes, turns on JAX's persistent compilation cache
(`config.compile_cache`, $M2DINO_COMPILE_CACHE; train/compile_cache.py) and hands over to the trainer
that `config.trainer` names. Also available as `m2dino train ...`.

One run per workdir: WORKDIR/m2dino.lock refuses a second run while the first lives; a rerun must bring the
run's config (WORKDIR/config.json) unless `--config.resume_policy=override` accepts changed safe keys (see
train/workdir.py). Exit status: 0 done; 2 a bad input (one line naming the file or config key); 75
(EX_TEMPFAIL) stopped by SIGTERM / SIGINT with its checkpoint written: rerun the same command to resume.

Every config also gets the entry point's own section `profile.steps` ('' = off; 'A:B' writes a
jax.profiler trace of steps A .. B-1 to WORKDIR/profile, see bench/profile.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from m2dino_jax import configlib
from m2dino_jax.errors import ConfigError, M2DinoError

EXIT_BAD_INPUT, EXIT_PREEMPTED = 2, 75  # loop.EXIT_PREEMPTED (not imported here: JAX loads lazily)

# trainer name -> module exposing train_and_evaluate(config, workdir) (registry; imported lazily). It returns
# a status ("completed" / "preempted"); a preempted run has written its checkpoint and exits with 75. A module may
# also expose resolve_config(config): the config's final form (e.g. the architecture adopted from init_from), applied
# before the workdir's config check so that a rerun of the same command compares equal and resumes.
TRAINERS = {
    "multitask": "m2dino_jax.train.multitask",
    "dino": "m2dino_jax.train.dino",
    "mae": "m2dino_jax.train.mae",
    "mae_finetune": "m2dino_jax.train.mae_finetune",
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


def load_config(spec: str, overrides: list[str]):
  """The locked config with the entry point's sections (profile) added, then the overrides applied."""
  import ml_collections
  config = configlib.load_config(spec)
  if "profile" not in config:
    with config.unlocked():
      config.profile = ml_collections.ConfigDict(dict(steps=""))
    config.lock()
  for item in overrides:
    key, eq, raw = item.partition("=")
    if not eq:
      raise ConfigError(key, "override needs the form --config.key=value")
    configlib.set_key(config, key, raw)
  return config


def _pop_policy(overrides: list[str]) -> tuple[list[str], str]:
  """Takes `resume_policy=...` out of the overrides (a property of this invocation, not of the run's config)."""
  rest, policy = [], "strict"
  for item in overrides:
    key, _, value = item.partition("=")
    if key.strip() == "resume_policy":
      policy = value.strip()
    else:
      rest.append(item)
  return rest, policy


def run(args) -> int:
  overrides, policy = _pop_policy(list(args.overrides))
  config = load_config(args.config, overrides)
  configlib.check_ranges(config)
  from m2dino_jax.bench import profile
  from m2dino_jax.train import compile_cache, distributed, loop
  from m2dino_jax.train import workdir as workdir_lib
  if policy not in workdir_lib.POLICIES:
    raise ConfigError("resume_policy", f"'{policy}' is not one of {', '.join(workdir_lib.POLICIES)}")
  distributed.maybe_initialize(config)
  # reported after the run, so that a bad input stays one line
  cache_dir = compile_cache.enable(config.get("compile_cache", ""), log=False)
  trainer = get_trainer(config.trainer)
  if hasattr(trainer, "resolve_config"):  # e.g. init_from_adopt: the config as the run will store it
    trainer.resolve_config(config)
  import jax
  lock = workdir_lib.WorkdirLock(args.workdir)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
      workdir_lib.check_config(args.workdir, config, policy)
    except M2DinoError as e:
      error = e
  if loop.agreed(error is not None):  # every process stops when process 0 cannot own the workdir
    lock.release(remove_empty_workdir=True)
    raise error or M2DinoError(f"{args.workdir}: process 0 could not take the workdir")
  ok = False
  log_path = os.environ.get(compile_cache.LOG_ENV)
  try:
    with loop.InterruptGuard(), profile.maybe_profile(config, args.workdir), compile_cache.CompileLog() as log:
      status = trainer.train_and_evaluate(config, args.workdir)
    ok = True
    if jax.process_index() == 0:
      print(f"compile cache: {cache_dir or 'off'}", file=sys.stderr)
      print(log.summary_line(), file=sys.stderr)
      if log_path:
        log.write(log_path)
  except loop.Interrupted as e:
    print(f"interrupted by {e}: the checkpoints in {args.workdir} are intact; rerun the same command to resume",
          file=sys.stderr)
    return EXIT_PREEMPTED
  finally:
    lock.release(remove_empty_workdir=not ok)
  return EXIT_PREEMPTED if status == loop.PREEMPTED else 0


def register(sub) -> None:
  p = sub.add_parser("train", help="train from a config (same as python -m m2dino_jax.main)",
                     description="Train from a config (same as python -m m2dino_jax.main); any config key can be "
                     "overridden after the options with --config.KEY=VALUE, e.g. --config.total_steps=100.")
  add_arguments(p)
  p.set_defaults(func=run, overrides=[])


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    rest, overrides = split_overrides(argv)
    from m2dino_jax.cli import Parser
    p = Parser(prog="python -m m2dino_jax.main", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(rest)
    args.overrides = overrides
    return run(args)
  except M2DinoError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except OSError as e:  # read-only or full disk, a missing folder: one line naming the path
    print(f"error: {configlib.os_error_line(e)}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
  sys.exit(main())
