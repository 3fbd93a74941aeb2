"""Config loading in the big_vision style.

`--config=configs/NAME.py:ARGS` imports the file, calls `get_config(ARGS)`, and expects a locked
`ml_collections.ConfigDict`. `ARGS` is a comma list parsed by `parse_arg` into typed fields
(`variant=S/16,smoke` -> variant='S/16', smoke=True). Overrides `--config.a.b=value` are
coerced to the existing field's type; an unknown key or a bad value raises `ConfigError`.
"""

from __future__ import annotations

import ast
import difflib
import errno
import importlib.util
import math
from pathlib import Path

import ml_collections

from m2dino_jax.errors import ConfigError


def parse_arg(arg: str | None, *, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
  """Parses 'a=1,b,c=x' into a ConfigDict typed by the defaults in `spec`.

  A bare name sets a boolean to True. Unknown names raise unless `lazy`.
  """
  out = ml_collections.ConfigDict(dict(spec))
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, eq, raw = item.partition("=")
    key = key.strip()
    if key not in spec:
      if not lazy:
        raise ConfigError(key, f"unknown config argument; expected one of {sorted(spec)}")
      out[key] = _literal(raw) if eq else True
      continue
    default = spec[key]
    if not eq:
      if not isinstance(default, bool):
        raise ConfigError(key, "needs a value (key=value)")
      out[key] = True
      continue
    out[key] = coerce(key, raw, default)
  return out


def _literal(raw: str):
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def coerce(key: str, raw: str, like):
  """Converts string `raw` to the type of `like`, or raises ConfigError naming `key`."""
  raw = raw.strip()
  try:
    if isinstance(like, bool):
      low = raw.lower()
      if low in ("1", "true", "yes", "on"):
        return True
      if low in ("0", "false", "no", "off"):
        return False
      raise ValueError(raw)
    if isinstance(like, int):
      return int(raw)
    if isinstance(like, float):
      return float(raw)
    if isinstance(like, str):
      return raw
    if isinstance(like, (tuple, list)):
      val = ast.literal_eval(raw) if raw.startswith(("(", "[")) else [_literal(s) for s in raw.split(":")]
      if not isinstance(val, (tuple, list)):
        val = [val]
      kinds = {type(x) for x in like}
      if len(kinds) == 1 and kinds <= {int, float, str}:  # elements keep the default's element type
        (kind,) = kinds
        ok = kind is str or all(isinstance(x, kind) and not isinstance(x, bool)
                                or (kind is float and isinstance(x, int) and not isinstance(x, bool)) for x in val)
        if not ok:
          raise ValueError(raw)
        val = [kind(x) for x in val]
      return type(like)(val)
    if like is None:
      return _literal(raw)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    raise ConfigError(key, f"bad value {raw!r}; expected {_kind(like)}") from None
  return _literal(raw)


def _kind(like) -> str:
  if isinstance(like, (tuple, list)) and like:
    return f"a {type(like).__name__} of {type(like[0]).__name__} (e.g. {':'.join(map(str, like))})"
  return type(like).__name__


def load_module(path: str):
  p = Path(path)
  if not p.is_file():
    raise ConfigError("config", f"no config file {path}")
  if p.suffix != ".py":
    raise ConfigError("config", f"{path} is not a Python config file (configs/NAME.py)")
  spec = importlib.util.spec_from_file_location(f"m2dino_config_{p.stem}", p)
  mod = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(mod)
  except SyntaxError as e:
    raise ConfigError("config", f"{path} line {e.lineno}: syntax error ({e.msg})") from None
  except (ImportError, NameError, AttributeError, TypeError, ValueError) as e:
    raise ConfigError("config", f"{path} fails to load ({type(e).__name__}: {e})") from None
  if not hasattr(mod, "get_config"):
    raise ConfigError("config", f"{path} defines no get_config(arg)")
  return mod


def load_config(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """Loads 'path.py[:args]' and applies 'a.b=value' overrides; returns a locked ConfigDict."""
  path, _, arg = spec.partition(":")
  mod = load_module(path)
  config = mod.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError("config", f"{path}: get_config must return an ml_collections.ConfigDict")
  config.lock()
  for item in overrides:
    key, eq, raw = item.partition("=")
    if not eq:
      raise ConfigError(key, "override needs the form --config.key=value")
    set_key(config, key, raw)
  return config


def set_key(config: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
  """Sets config[dotted] from a string, coerced to the existing type; unknown keys raise."""
  parts = dotted.split(".")
  if not all(parts):
    raise ConfigError(dotted, "malformed key (empty part); use --config.group.key=value")
  node = config
  for i, part in enumerate(parts[:-1]):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise ConfigError(".".join(parts[: i + 1]), "unknown config key")
    node = node[part]
  leaf = parts[-1]
  if leaf not in node:
    close = difflib.get_close_matches(leaf, list(node.keys()), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(dotted, f"unknown config key{hint}")
  old = node[leaf]
  if isinstance(old, ml_collections.ConfigDict):
    raise ConfigError(dotted, "is a group of keys; set one of its fields")
  value = coerce(dotted, raw, old)
  with node.unlocked():
    node[leaf] = value


# Range checks on well-known keys (present in some configs only): (key, test, what is expected).
_POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_AT_LEAST_1 = (lambda v: v >= 1, "an integer >= 1")
_RANGES = {
    "optim.lr": _POSITIVE, "optim.min_lr": _NON_NEGATIVE, "optim.eps": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE, "optim.warmup_steps": _NON_NEGATIVE,
    "optim.head_lr_mult": _NON_NEGATIVE, "optim.layer_decay": _POSITIVE,
    "optim.b1": (lambda v: 0 <= v < 1, "in [0, 1)"), "optim.b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.batch_size": _AT_LEAST_1, "data.eval_batch_size": _AT_LEAST_1, "batch_size": _AT_LEAST_1,
    "data.image_size": _AT_LEAST_1, "image_size": _AT_LEAST_1, "data.worker_count": _NON_NEGATIVE,
    "log_every": _AT_LEAST_1, "eval_every": _NON_NEGATIVE, "steps_per_task": _AT_LEAST_1,
    "checkpoint.every": _NON_NEGATIVE, "checkpoint.keep": _AT_LEAST_1, "monitor.every": _NON_NEGATIVE,
    "epochs": _NON_NEGATIVE, "epoch_length": _NON_NEGATIVE,
}


def _leaves(config, prefix: str = ""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def check_ranges(config) -> None:
  """Refuses out-of-range values of well-known keys and any NaN, naming the key (before anything is written)."""
  for key, value in _leaves(config):
    if isinstance(value, float) and math.isnan(value):
      raise ConfigError(key, "is NaN")
    if key in _RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
      test, expected = _RANGES[key]
      if not test(value):
        raise ConfigError(key, f"{value!r} is out of range; expected {expected}")


def os_error_line(e: OSError) -> str:
  """One line for an environment fault (read-only or full disk, missing folder) naming the path."""
  what = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
          errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}.get(e.errno, e.strerror or str(e))
  path = e.filename or "(unknown path)"
  return f"{path}: {what}"
