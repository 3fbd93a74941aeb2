"""Checkpoint integrity: per-step file manifests (size + CRC-32), verification, moving damaged steps aside,
finiteness of a state and the structural match of a checkpoint with the state the config builds.

A step folder is trusted only when every file its manifest lists is present with the recorded size and
checksum; the manifest is written once the asynchronous save has finalised (so it describes exactly what
Orbax committed). CRC-32 detects accidental damage (truncation, bit flips, lost files), not tampering.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from m2dino_jax import fileio

MANIFEST = "m2dino_manifest.json"
_CHUNK = 1 << 22


def crc32(path: Path) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(step_dir: Path) -> list[Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir) -> dict:
  """Records {relative path: [size, crc32]} of every file of a finalised step folder."""
  step_dir = Path(step_dir)
  files = {str(p.relative_to(step_dir)): [p.stat().st_size, crc32(p)] for p in _files(step_dir)}
  manifest = {"version": 1, "files": files}
  fileio.write_json(step_dir / MANIFEST, manifest, indent=None)
  return manifest


def has_manifest(step_dir) -> bool:
  return (Path(step_dir) / MANIFEST).is_file()


def verify(step_dir) -> str | None:
  """None when the step folder matches its manifest (or has none: then only a restore can tell); else what
  is wrong, in a few words naming the file."""
  step_dir = Path(step_dir)
  if not step_dir.is_dir():
    return "step folder missing"
  if not any(step_dir.iterdir()):
    return "empty step folder"
  path = step_dir / MANIFEST
  if not path.is_file():
    return None
  try:
    files = json.loads(path.read_text())["files"]
  except (ValueError, KeyError, TypeError, OSError):
    return f"unreadable manifest {MANIFEST}"
  for rel, (size, crc) in files.items():
    p = step_dir / rel
    if not p.is_file():
      return f"{rel} missing"
    got = p.stat().st_size
    if got != size:
      return f"{rel} {'truncated' if got < size else 'grown'} ({got} of {size} bytes)"
    if crc32(p) != crc:
      return f"{rel} corrupted (checksum mismatch)"
  return None


def move_aside(step_dir) -> Path:
  """Renames a damaged step folder to CKPT-damaged/STEP[-time] (never deletes it); returns the new path."""
  step_dir = Path(step_dir)
  dest_root = step_dir.parent.parent / f"{step_dir.parent.name}-damaged"
  dest_root.mkdir(parents=True, exist_ok=True)
  dest = dest_root / step_dir.name
  if dest.exists():
    dest = dest_root / f"{step_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
  os.replace(step_dir, dest)
  return dest


def leaf_name(path) -> str:
  """Orbax's dotted name of a pytree leaf ('params.encoder.blocks.0.kernel', 'opt_state.0.mu.w')."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


@jax.jit
def _finite_flags(leaves):
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]) if leaves else jnp.ones((0,), bool)


def first_non_finite(tree) -> str | None:
  """The name of the first floating leaf holding a NaN / Inf, or None (one fused reduction on device)."""
  flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not flat:
    return None
  flags = np.asarray(jax.device_get(_finite_flags([x for _, x in flat])))
  bad = np.flatnonzero(~flags)
  return leaf_name(flat[bad[0]][0]) if bad.size else None


def structure_mismatch(saved, state_like) -> str | None:
  """Compares an Orbax tree metadata with the abstract state the config builds; None when they match, else a
  message naming the first differing leaves (a changed model config, not damage)."""
  def shapes(tree, is_meta):
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if is_meta:
        out[getattr(x, "name", None) or leaf_name(path)] = tuple(getattr(x, "shape", ()) or ())
      elif hasattr(x, "shape"):
        out[leaf_name(path)] = tuple(x.shape)
    return out
  have, want = shapes(saved, True), shapes(state_like, False)
  missing = [k for k in want if k not in have]
  extra = [k for k in have if k not in want]
  wrong = [k for k in want if k in have and have[k] != want[k]]
  problems = []
  if wrong:
    k = wrong[0]
    problems.append(f"{k} has shape {have[k]} in the checkpoint but {want[k]} in the model"
                    + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
  if missing:
    problems.append(f"{len(missing)} weight(s) the model needs are not in the checkpoint (e.g. {missing[0]})")
  if extra:
    problems.append(f"{len(extra)} weight(s) in the checkpoint are not in the model (e.g. {extra[0]})")
  return "; ".join(problems) or None
