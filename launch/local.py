"""Runs one training on N local processes joined by jax.distributed (a one-machine stand-in for multi-host).

  python launch/local.py --processes 2 --devices-per-process 4 -- \
      --config=configs/m2dino.py:paradigm=au,smoke --workdir=/tmp/au2p

Each process gets M2DINO_COORDINATOR / M2DINO_NUM_PROCESSES / M2DINO_PROCESS_ID (read by
m2dino_jax/train/distributed.py) and, on CPU, its own simulated devices. Output of process i goes to
WORKDIR/logs/process_i.log; the exit status is the first non-zero one.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  split = argv.index("--") if "--" in argv else len(argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--processes", type=int, default=2)
  p.add_argument("--devices-per-process", type=int, default=4, help="simulated CPU devices per process")
  p.add_argument("--platform", default="cpu", choices=("cpu", "auto"),
                 help="cpu: force the CPU platform with --devices-per-process simulated devices (default); "
                      "auto: let JAX pick the accelerators (each process sees all local devices)")
  args = p.parse_args(argv[:split])
  train_args = argv[split + 1:]
  workdir = next((a.split("=", 1)[1] for a in train_args if a.startswith("--workdir=")), None)
  if workdir is None:
    p.error("pass --workdir=DIR after --")
  logs = Path(workdir) / "logs"
  logs.mkdir(parents=True, exist_ok=True)
  coordinator = f"127.0.0.1:{free_port()}"
  procs = []
  for i in range(args.processes):
    env = dict(os.environ, M2DINO_COORDINATOR=coordinator, M2DINO_NUM_PROCESSES=str(args.processes),
               M2DINO_PROCESS_ID=str(i))
    if args.platform == "cpu":
      env["JAX_PLATFORMS"] = "cpu"
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices_per_process}"
    log = open(logs / f"process_{i}.log", "w")
    procs.append((subprocess.Popen([sys.executable, "-m", "m2dino_jax.main", *train_args], env=env,
                                   stdout=log, stderr=subprocess.STDOUT), log))
  codes = []
  for proc, log in procs:
    codes.append(proc.wait())
    log.close()
  return next((c for c in codes if c), 0)


if __name__ == "__main__":
  sys.exit(main())
