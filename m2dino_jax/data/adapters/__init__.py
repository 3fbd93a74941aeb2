"""Adapters that read ultrasound datasets exactly as their authors released them.

Each adapter is a module exposing
  read(root, split='train', *, skip_bad=False, skipped_log=None) -> Iterator[Record]
  items(root, split) -> Iterator[base.Item]   (where each record comes from; nothing decoded yet)
  SPLITS: the split names it knows ('all' is always accepted too)
and yields validated `records.Record`s, lazily (a file is decoded when its record is reached).
Releases without an official split get a stable hash split by file, patient or video
(base.hashed_split). Without `skip_bad` the first bad file or row raises a `DataError` naming it;
with `skip_bad` bad items are skipped, logged, and listed with the reason in `skipped_log`
(a .json or .csv file). Look adapters up by name: `get('busi')(root, 'train')`.
"""

from __future__ import annotations

import importlib

from m2dino_jax.errors import ConfigError

NAMES = ("fmc_uia", "busi", "hc18", "camus", "fetal_planes", "jnu_ifm", "psfhs", "fass", "unlabelled")


def module(name: str):
  """The adapter module for a dataset name; unknown names raise a ConfigError listing the valid ones."""
  if name not in NAMES:
    raise ConfigError("dataset", f"unknown dataset '{name}'; known: {', '.join(NAMES)}")
  return importlib.import_module(f"{__name__}.{name}")


def get(name: str):
  """The `read` function of the named adapter."""
  return module(name).read


def splits(name: str) -> tuple[str, ...]:
  """The split names the named adapter produces (not counting 'all')."""
  return tuple(module(name).SPLITS)
