"""The project's own errors: each names the file, row or config key that is wrong.

The CLI catches `M2DinoError`, prints its one-line message and exits with status 2.
"""

from __future__ import annotations

import functools


class M2DinoError(Exception):
  """Base class for user-facing errors (bad config, bad data, bad arguments)."""


class ConfigError(M2DinoError):
  """A config key is unknown or has a bad value."""

  def __init__(self, key: str, message: str):
    self.key, self.detail = key, message
    super().__init__(f"config key '{key}': {message}")


def config_section(prefix: str):
  """Decorator for functions that read one config section (e.g. 'data'): a ConfigError raised inside with
  a key relative to the section ('mixture') is re-raised with the full key ('data.mixture')."""
  def wrap(fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
      try:
        return fn(*args, **kwargs)
      except ConfigError as e:
        if e.key == prefix or e.key.startswith(prefix + "."):
          raise
        raise ConfigError(f"{prefix}.{e.key}", e.detail) from None
    return inner
  return wrap


class DataError(M2DinoError):
  """A data file or record is malformed; names the file and, when known, the row."""

  def __init__(self, path, message: str, row: int | None = None):
    self.path = str(path)
    self.row = row
    where = self.path if row is None else f"{self.path} row {row}"
    super().__init__(f"{where}: {message}")


class SolverError(M2DinoError):
  """An optimisation problem is infeasible or ill-posed (scaling / allocation)."""


class NonFiniteError(M2DinoError):
  """The loss or gradients became NaN / Inf; names the step and task."""


class CheckpointError(M2DinoError):
  """A checkpoint cannot be written or does not fit the model; names the checkpoint folder."""

  def __init__(self, path, message: str):
    self.path = str(path)
    super().__init__(f"{self.path}: {message}")
