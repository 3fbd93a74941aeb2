"""advice.json: the groups and per-task sampling weights `m2dino advise fit` recommends.

{"format": "m2dino-advice/1", "tasks": [...], "groups": {name: [task, ...]}, "weights": {task: w},
 "transfer": [[Z]], "tau": [[...]], "laws": {task: {E, A, beta, source}}, "grouping": {...}, "probe": {...}}
The trainer reads "groups" (as CG groups) and the data pipeline "weights" (mixture 'json': within one model the
weights of its tasks are renormalised), so `configs/m2dino.py:paradigm=advised,advice=PATH` trains it.
"""

from __future__ import annotations

from pathlib import Path

from m2dino_jax import fileio
from m2dino_jax.errors import ConfigError

FORMAT = "m2dino-advice/1"


def apply(config, path) -> None:
  """Makes `config` train the advice at `path`: CG with its groups and, within each model, its sampling weights
  (configs/m2dino.py:paradigm=advised and the data-scale sweep's 'advised' paradigm)."""
  config.paradigm = "cg"
  config.advice = str(path)
  config.groups = str(path)
  config.data.mixture = "json"
  config.data.weights_file = str(path)


def is_advice(obj) -> bool:
  return isinstance(obj, dict) and obj.get("format") == FORMAT


def read_groups(path) -> dict[str, list[str]] | None:
  """The groups of an advice file, or None if `path` is not one (then it is an ordinary groups file)."""
  path = Path(path)
  if not path.suffix == ".json" or not path.is_file():
    return None
  obj = fileio.read_json(path, "groups file")
  if not is_advice(obj):
    return None
  groups = obj.get("groups")
  if not isinstance(groups, dict) or not all(isinstance(v, list) and v for v in groups.values()):
    raise ConfigError("groups", f"{path}: 'groups' must be an object {{group: [task, ...]}}")
  return {str(k): [str(t) for t in v] for k, v in groups.items()}
