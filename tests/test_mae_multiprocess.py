"""3D MAE pretraining on 2 local processes joined by jax.distributed (4 simulated CPU devices each) equals one
process with 8 devices: the same global batches, so the same losses and held-out measurements."""

import json
import os
import subprocess
import sys

import pytest

from m2dino_jax.scaling import measurements
from tests.util import ROOT

OVERRIDES = ["total_steps=3", "log_every=1", "data.domains=abd_ct,hn_pet", "data.per_domain=3", "data.heldout=1",
             "data.eval_crops=2", "mesh.fsdp=4", "sharding=fsdp", "optim.eps=1e-6", "optim.warmup_steps=0",
             "eval_at_start=false"]


def _losses(work):
  rows = [json.loads(ln) for ln in (work / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices(tmp_path):
  args = ["--config=configs/mae3d.py:smoke", *(f"--config.{o}" for o in OVERRIDES)]
  two, one = tmp_path / "two", tmp_path / "one"
  proc = subprocess.run([sys.executable, "launch/local.py", "--processes", "2", "--devices-per-process", "4", "--",
                         *args, f"--workdir={two}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
  logs = [(two / "logs" / f"process_{i}.log").read_text() for i in (0, 1)]
  assert proc.returncode == 0, logs[0][-3000:] + logs[1][-3000:]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  ref = subprocess.run([sys.executable, "-m", "m2dino_jax.main", *args, f"--workdir={one}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert ref.returncode == 0, ref.stderr[-3000:]
  a, b = _losses(two), _losses(one)
  assert len(a) == len(b) == 3 and a[0] > 0
  for x, y in zip(a, b):
    assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (a, b)
  (ra,), (rb,) = (measurements.read_measurements(w / "measurements.jsonl") for w in (two, one))
  assert ra.step == rb.step == 3 and set(ra.loss) == {"abd_ct", "hn_pet"}
  for d in ra.loss:
    assert abs(ra.loss[d] - rb.loss[d]) <= 1e-5, (ra.loss, rb.loss)
  assert (two / "final" / "params").is_dir() and json.loads((two / "done.json").read_text())["step"] == 3
