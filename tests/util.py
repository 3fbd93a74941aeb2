"""Test utilities: run code in a fresh Python with N simulated CPU devices; signal a training run at a known step;
run the CLI in-process and capture its output."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
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


def signal_run(args: list[str], tmp_path: Path, sig: str, at: int, timeout: int = 300) -> str:
  """Runs the trainer (tests/crash_run.py hold@AT), sends it `sig` while it waits after step `at`, and returns its
  stderr once it exits with EXIT_PREEMPTED (75). Holding the run makes the step deterministic on any machine."""
  marker = tmp_path / f"held-{sig}"
  env = {**os.environ, "M2DINO_HOLD_MARKER": str(marker)}
  proc = subprocess.Popen([sys.executable, "tests/crash_run.py", f"hold@{at}", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + timeout
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(getattr(signal, sig))
  _, err = proc.communicate(timeout=timeout)
  assert marker.exists() and marker.read_text() == str(at), err[-3000:]
  assert proc.returncode == 75, err[-3000:]  # EX_TEMPFAIL: restart wrappers rerun, which resumes
  return err


def run_cli(argv: list[str]) -> tuple[int, str, str]:
  """`m2dino ARGV` in this process: (exit code, stdout, stderr)."""
  from m2dino_jax import cli
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(argv)
  return code, out.getvalue(), err.getvalue()
