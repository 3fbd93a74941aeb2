"""Fault injection on the real trainer (subprocesses, tests/crash_run.py): a NaN between two log steps, a damaged
newest checkpoint, a SIGKILL mid-save and SIGINT each end in the exact recovery: the resumed run is bit-identical
to an uninterrupted one, nothing is lost, and the user sees one line."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from m2dino_jax.train import checkpointing, integrity
from tests.util import ROOT

pytestmark = pytest.mark.slow

ARGS = ["--config=configs/m2dino.py:paradigm=au,smoke,tasks=breast_2cls", "--config.data.image_size=32",
        "--config.data.source.synthetic_count=16", "--config.data.batch_size=4", "--config.tensorboard=False",
        "--config.total_steps=8", "--config.checkpoint.every=2", "--config.log_every=10"]


def _run(workdir, fault=None, expect=0, extra=()):
  entry = ["-m", "m2dino_jax.main"] if fault is None else ["tests/crash_run.py", fault]
  proc = subprocess.run([sys.executable, *entry, *ARGS, *extra, f"--workdir={workdir}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=400)
  assert proc.returncode == expect, proc.stderr[-3000:]
  return proc


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "all" / "ckpt").iterdir() if p.name.isdigit())


def _final(workdir):
  return jax.tree.leaves(checkpointing.restore_params(workdir / "all" / "ckpt" / "8" / "state"))


def _assert_same(ref, workdir):
  got = _final(workdir)
  assert len(ref) == len(got) > 20
  for a, b in zip(ref, got):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _lines(text):
  """stderr lines that are not JAX / absl log noise (the user-facing lines)."""
  return [ln for ln in text.splitlines() if ln.strip() and not re.match(r"^[IWE]\d{4} ", ln)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  ref = tmp_path_factory.mktemp("ref")
  _run(ref)
  return _final(ref)


def test_nan_between_log_steps_keeps_the_last_good_checkpoint_and_resumes_exactly(tmp_path, reference):
  """log_every=10 > checkpoint.every=2, NaN at step 5: exit 2 with one line, checkpoints 2 and 4 intact (keep=2,
  nothing after 4), no Orbax traceback; the rerun resumes from 4 and ends bit-identical."""
  work = tmp_path / "nan"
  proc = _run(work, fault="nan@5", expect=2)
  lines = _lines(proc.stderr)
  assert "Traceback" not in proc.stderr and "cannot schedule new futures" not in proc.stderr
  assert lines[-1].startswith("error: non-finite loss nan / grad norm nan at step 5 (breast_2cls); no state from "
                              "step 5 on was saved; the last good checkpoint is step 4"), lines
  assert _steps(work) == [2, 4] and all(integrity.has_manifest(work / "all" / "ckpt" / s) for s in ("2", "4"))
  assert not list((work / "all" / "ckpt").glob("*tmp*"))
  proc = _run(work)
  assert "resumed from step 4" in proc.stderr
  _assert_same(reference, work)


def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(tmp_path, reference):
  """100 flipped bytes in the largest data file of the newest step (it used to load silently and fail later as
  a NaN): the checksum catches it, the step is moved aside, the run resumes from the previous one exactly. Every
  other damage variant: tests/test_checkpoint_integrity.py."""
  from tests.test_checkpoint_integrity import DAMAGE
  work = tmp_path / "damaged"
  _run(work, fault="7", expect=17)  # killed after step 7: steps 4 and 6 on disk
  assert _steps(work) == [4, 6]
  DAMAGE["corrupt_data_file"](work / "all" / "ckpt" / "6")
  proc = _run(work)
  warnings = [ln for ln in _lines(proc.stderr) if ln.startswith("warning:")]
  assert len(warnings) == 2, proc.stderr  # the killed run's lock (stale) and the damaged step, one line each
  assert "taking over a stale lock of pid" in warnings[0]
  assert "checkpoint step 6 " in warnings[1] and "corrupted (checksum mismatch)" in warnings[1]
  assert "resumed from step 4" in proc.stderr and "Traceback" not in proc.stderr
  assert (work / "all" / "ckpt-damaged" / "6").is_dir()  # kept for inspection
  _assert_same(reference, work)


def test_sigkill_mid_save_resumes_exactly(tmp_path, reference):
  work = tmp_path / "kill"
  _run(work, fault="save@6", expect=17)
  proc = _run(work)
  m = re.search(r"resumed from step (\d+)", proc.stderr)
  assert m and int(m.group(1)) in (4, 6), proc.stderr[-2000:]  # 6 only if its async save beat the kill
  assert "Traceback" not in proc.stderr
  _assert_same(reference, work)


def test_sigint_checkpoints_and_exits_75(tmp_path):
  work = tmp_path / "int"
  proc = subprocess.Popen([sys.executable, "-m", "m2dino_jax.main", *ARGS, "--config.log_every=1",
                           "--config.checkpoint.every=100", f"--workdir={work}"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  log = work / "all" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 75, err[-2000:]
  m = re.search(r"preempted at step (\d+)", err)
  assert m and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
  stopped = int(m.group(1))
  assert 2 <= stopped < 8 and _steps(work) == [stopped]
  assert integrity.has_manifest(work / "all" / "ckpt" / str(stopped))
  assert not (work / "m2dino.lock").exists()


def test_interrupt_during_final_eval_exits_75_and_rerun_finishes(tmp_path, reference):
  """A SIGTERM during the final evaluation (after the last checkpoint) exits 75; the rerun evaluates and ends."""
  work = tmp_path / "eval"
  code = ("import os, signal, sys\n"
          "from m2dino_jax import main\n"
          "from m2dino_jax.train.multitask import trainer\n"
          "orig = trainer._Run.evaluate\n"
          "def evaluate(self, state, step):\n"
          "  os.kill(os.getpid(), signal.SIGTERM)\n"
          "  return orig(self, state, step)\n"
          "trainer._Run.evaluate = evaluate\n"
          "sys.exit(main.main(sys.argv[1:]))\n")
  proc = subprocess.run([sys.executable, "-c", code, *ARGS, f"--workdir={work}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=400)
  assert proc.returncode == 75, proc.stderr[-2000:]
  assert "interrupted by SIGTERM" in proc.stderr and "Traceback" not in proc.stderr
  assert not (work / "all" / "done.json").exists()
  proc = _run(work)
  assert (work / "all" / "done.json").exists()
  _assert_same(reference, work)
  shutil.rmtree(work)
