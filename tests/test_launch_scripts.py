"""Launchers (launch/): each one's dry run prints the exact commands; the SLURM and TPU scripts also run their
real path against stand-in `srun` / `gcloud` / `python` executables that record what they were given."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from m2dino_jax import configlib
from m2dino_jax.train import distributed
from tests.util import ROOT

TRAIN = ["--config=configs/m2dino.py:paradigm=au", "--workdir=/runs/a b"]


def _run(cmd, env=None, expect=0):
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
  assert proc.returncode == expect, proc.stdout + proc.stderr
  return proc


def _fake(bin_dir, name: str, body: str) -> None:
  path = bin_dir / name
  path.write_text("#!/bin/bash\n" + body)
  path.chmod(0o755)


def test_local_dry_run_prints_every_process():
  out = _run([sys.executable, "launch/local.py", "--dry-run", "--port", "12345", "--processes", "2",
              "--devices-per-process", "4", "--python", "py", "--", *TRAIN]).stdout.splitlines()
  assert out == [
      "# 2 processes, coordinator 127.0.0.1:12345, platform cpu",
      "M2DINO_COORDINATOR=127.0.0.1:12345 M2DINO_NUM_PROCESSES=2 M2DINO_PROCESS_ID=0 JAX_PLATFORMS=cpu "
      "XLA_FLAGS=--xla_force_host_platform_device_count=4 py -m m2dino_jax.main "
      "--config=configs/m2dino.py:paradigm=au '--workdir=/runs/a b' > '/runs/a b/logs/process_0.log' 2>&1 &",
      "M2DINO_COORDINATOR=127.0.0.1:12345 M2DINO_NUM_PROCESSES=2 M2DINO_PROCESS_ID=1 JAX_PLATFORMS=cpu "
      "XLA_FLAGS=--xla_force_host_platform_device_count=4 py -m m2dino_jax.main "
      "--config=configs/m2dino.py:paradigm=au '--workdir=/runs/a b' > '/runs/a b/logs/process_1.log' 2>&1 &",
      "wait"]
  auto = _run([sys.executable, "launch/local.py", "--dry-run", "--port", "1", "--processes", "1", "--platform",
               "auto", "--python", "py", "--", "--workdir=w"]).stdout.splitlines()
  assert auto[1] == ("M2DINO_COORDINATOR=127.0.0.1:1 M2DINO_NUM_PROCESSES=1 M2DINO_PROCESS_ID=0 "
                     "py -m m2dino_jax.main --workdir=w > w/logs/process_0.log 2>&1 &")
  err = _run([sys.executable, "launch/local.py", "--dry-run", "--", "--config=x"], expect=2).stderr
  assert "pass --workdir=DIR after --" in err


@pytest.fixture
def slurm_env(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _fake(bin_dir, "scontrol", '[ "$1 $2 $3" = "show hostnames gpu-[a-b]" ] && printf "gpu-a\\ngpu-b\\n"\n')
  return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
          "SLURM_NNODES": "2", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1234"}, bin_dir


TASK = ("export M2DINO_PROCESS_ID=$SLURM_PROCID; if [ \"$M2DINO_TASK_MODE\" = gpu ]; then export "
        "CUDA_VISIBLE_DEVICES=$SLURM_LOCALID; fi; exec \"$M2DINO_TASK_PYTHON\" -m m2dino_jax.main \"$@\"")


def test_slurm_dry_run_one_process_per_gpu(slurm_env):
  env, _ = slurm_env
  out = _run(["bash", "launch/slurm_gpu.sbatch", *TRAIN], {**env, "M2DINO_DRY_RUN": "1"}).stdout.splitlines()
  args = "--config=configs/m2dino.py:paradigm=au --workdir=/runs/a\\ b"
  assert out[0] == "coordinator gpu-a:21234; 4 processes on 2 nodes, one per gpu"  # port 20000 + 1234
  assert out[1] == f"srun --kill-on-bad-exit=1 --ntasks=4 --ntasks-per-node=2 bash -c '{TASK}' m2dino-task {args}"
  for i, (node, gpu) in enumerate([("gpu-a", 0), ("gpu-a", 1), ("gpu-b", 0), ("gpu-b", 1)]):
    assert out[2 + i] == (f"task {i} on {node}: CUDA_VISIBLE_DEVICES={gpu} M2DINO_COORDINATOR=gpu-a:21234 "
                          f"M2DINO_NUM_PROCESSES=4 M2DINO_PROCESS_ID={i} python -m m2dino_jax.main {args}")
  assert len(out) == 6
  per_node = _run(["bash", "launch/slurm_gpu.sbatch", "--workdir=w"],
                  {**env, "SLURM_NTASKS": "2", "M2DINO_PORT": "999", "M2DINO_DRY_RUN": "1"}).stdout.splitlines()
  assert per_node[0] == "coordinator gpu-a:999; 2 processes on 2 nodes, one per node"
  assert per_node[3] == ("task 1 on gpu-b: M2DINO_COORDINATOR=gpu-a:999 M2DINO_NUM_PROCESSES=2 "
                         "M2DINO_PROCESS_ID=1 python -m m2dino_jax.main --workdir=w")
  # without scontrol: a plain node list still works, a bracketed one is refused with a message
  plain = {**env, "PATH": os.environ["PATH"], "SLURM_JOB_NODELIST": "n1,n2", "M2DINO_DRY_RUN": "1"}
  assert _run(["bash", "launch/slurm_gpu.sbatch", "--workdir=w"], plain).stdout.splitlines()[0] == \
      "coordinator n1:21234; 4 processes on 2 nodes, one per gpu"
  err = _run(["bash", "launch/slurm_gpu.sbatch", "--workdir=w"], {**plain, "SLURM_JOB_NODELIST": "n[1-2]"},
             expect=2).stderr
  assert "scontrol is needed to expand SLURM_JOB_NODELIST=n[1-2]" in err


def test_slurm_real_path_runs_every_task_with_its_ids(slurm_env, tmp_path):
  """A stand-in srun runs the task command once per task (as SLURM would, with SLURM_PROCID / LOCALID);
  a stand-in python prints what the entry point would receive."""
  env, bin_dir = slurm_env
  _fake(bin_dir, "srun", 'n=1; k=1\nwhile [[ "$1" == --* ]]; do case "$1" in --ntasks=*) n=${1#*=};; '
        '--ntasks-per-node=*) k=${1#*=};; esac; shift; done\n'
        'for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$((i % k)) "$@" || exit $?; done\n')
  _fake(bin_dir, "fakepy", 'echo "pid=$M2DINO_PROCESS_ID cuda=${CUDA_VISIBLE_DEVICES-unset} '
        'coord=$M2DINO_COORDINATOR n=$M2DINO_NUM_PROCESSES nccl=$NCCL_DEBUG args=$*"\n')
  out = _run(["bash", "launch/slurm_gpu.sbatch", *TRAIN], {**env, "M2DINO_PYTHON": "fakepy"}).stdout.splitlines()
  assert out[1:] == [f"pid={i} cuda={i % 2} coord=gpu-a:21234 n=4 nccl=WARN args=-m m2dino_jax.main "
                     "--config=configs/m2dino.py:paradigm=au --workdir=/runs/a b" for i in range(4)]
  err = _run(["bash", "launch/slurm_gpu.sbatch", "--workdir=w"], {"SLURM_JOB_NODELIST": ""}, expect=2).stderr
  assert "submit with sbatch" in err


def test_tpu_pod_dry_run_and_real_path(tmp_path):
  base = ["bash", "launch/tpu_pod.sh", "--tpu", "v5p-64", "--zone", "us-east5-a", "--project", "proj"]
  out = _run([*base, "--dry-run", "--setup", "git pull", "--", *TRAIN]).stdout.splitlines()
  ssh = "gcloud compute tpus tpu-vm ssh v5p-64 --zone=us-east5-a --worker=all --project=proj --command"
  assert out == [f"{ssh} 'cd ~/m2dino_jax && git pull'",
                 f"{ssh} 'cd ~/m2dino_jax && M2DINO_DISTRIBUTED_AUTO=1 python3 -m m2dino_jax.main "
                 "--config=configs/m2dino.py:paradigm=au --workdir=/runs/a\\ b'"]
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _fake(bin_dir, "gcloud", 'for a in "$@"; do echo "[$a]"; done\n')
  got = _run([*base, "--dir", "/srv/m2", "--", *TRAIN], {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
  assert got.stdout.splitlines() == [
      "[compute]", "[tpus]", "[tpu-vm]", "[ssh]", "[v5p-64]", "[--zone=us-east5-a]", "[--worker=all]",
      "[--project=proj]", "[--command]", "[cd /srv/m2 && M2DINO_DISTRIBUTED_AUTO=1 python3 -m m2dino_jax.main "
      "--config=configs/m2dino.py:paradigm=au --workdir=/runs/a\\ b]"]
  assert "--tpu and --zone are required" in _run(["bash", "launch/tpu_pod.sh", "--", "x"], expect=2).stderr


def test_auto_detection_from_the_environment(monkeypatch):
  for k in ("M2DINO_COORDINATOR", "M2DINO_NUM_PROCESSES", "M2DINO_PROCESS_ID", "M2DINO_DISTRIBUTED_AUTO",
            "M2DINO_LOCAL_DEVICE_IDS"):
    monkeypatch.delenv(k, raising=False)
  c = configlib.load_config("configs/mae3d.py:smoke")
  assert distributed.settings(c) is None
  monkeypatch.setenv("M2DINO_DISTRIBUTED_AUTO", "1")  # what tpu_pod.sh sets on every worker
  assert distributed.settings(c) == {}
  monkeypatch.delenv("M2DINO_DISTRIBUTED_AUTO")
  monkeypatch.setenv("M2DINO_COORDINATOR", "h:1")
  monkeypatch.setenv("M2DINO_NUM_PROCESSES", "8")
  monkeypatch.setenv("M2DINO_PROCESS_ID", "5")
  monkeypatch.setenv("M2DINO_LOCAL_DEVICE_IDS", "1")
  assert distributed.settings(c) == {"coordinator_address": "h:1", "num_processes": 8, "process_id": 5,
                                     "local_device_ids": [1]}
