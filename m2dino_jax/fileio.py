"""Atomic file writing: write to a temporary name in the same folder, then rename.

Nothing half-written is ever left under the final name, even if the process dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary path next to `path`; renames it to `path` on success. The file gets the mode an
  ordinary open() would give it (0666 less the umask), not mkstemp's 0600."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.fchmod(fd, 0o666 & ~_umask())
  os.close(fd)
  try:
    yield Path(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path):
  """Yields a temporary folder next to `path`; on success it replaces `path` (an existing folder is swapped out
  only once the new one is complete, then removed). On failure the temporary folder is removed and `path` is
  left as it was."""
  import shutil
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
  try:
    yield tmp
    if path.exists():
      old = path.with_name(f".{path.name}.old-{os.getpid()}")
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def write_text(path, text: str) -> Path:
  with atomic_path(path) as tmp:
    tmp.write_text(text)
  return Path(path)


def write_json(path, obj, indent: int = 2) -> Path:
  return write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def read_json(path, what: str = "file"):
  """Parses a JSON file; a missing file or bad JSON raises DataError naming the file."""
  from m2dino_jax.errors import DataError
  path = Path(path)
  if not path.is_file():
    raise DataError(path, f"{what} not found")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(path, f"not valid JSON ({e.msg} at line {e.lineno})") from None
  except UnicodeDecodeError:
    raise DataError(path, "not valid JSON (not UTF-8 text)") from None
  except RecursionError:
    raise DataError(path, "not valid JSON (nested too deeply)") from None
  except OSError as e:
    raise DataError(path, f"cannot read {what}: {e}") from None


def write_bytes(path, data: bytes) -> Path:
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)
  return Path(path)
