"""Test utilities: run code in a fresh Python with N simulated CPU devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_with_devices(code: str, devices: int = 8, timeout: int = 240, env: dict | None = None) -> str:
  """Runs `code` in a subprocess whose JAX sees `devices` CPU devices; returns stdout.

  XLA_FLAGS must be set before JAX is imported, hence the subprocess. Raises with the
  subprocess's stderr if it fails.
  """
  full_env = dict(os.environ)
  full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  full_env["JAX_PLATFORMS"] = "cpu"
  full_env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{full_env.get('PYTHONPATH', '')}"
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                        timeout=timeout, env=full_env, cwd=ROOT)
  if proc.returncode != 0:
    out, err = proc.stdout[-3000:], proc.stderr[-5000:]
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{out}\n{err}")
  return proc.stdout
