"""Runs one training on N local processes joined by jax.distributed (a one-machine stand-in for multi-host).

  python launch/local.py --processes 2 --devices-per-process 4 -- \
      --config=configs/m2dino.py:paradigm=au,smoke --workdir=/tmp/au2p
  python launch/local.py --dry-run --port 12345 -- --config=... --workdir=...   # print the commands only

Each process gets M2DINO_COORDINATOR / M2DINO_NUM_PROCESSES / M2DINO_PROCESS_ID (read by
m2dino_jax/train/distributed.py) and, with --platform cpu (the default), its own simulated CPU devices;
--platform auto leaves the platform to JAX (each process then sees all local accelerators, so use one
process per machine, or set CUDA_VISIBLE_DEVICES yourself). Output of process i goes to
WORKDIR/logs/process_i.log; the exit status is the first non-zero one. SIGTERM / SIGINT are passed on to
every process (each saves a checkpoint and exits 0; rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def parse(argv: list[str]):
  split = argv.index("--") if "--" in argv else len(argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--processes", type=int, default=2)
  p.add_argument("--devices-per-process", type=int, default=4, help="simulated CPU devices per process")
  p.add_argument("--platform", default="cpu", choices=("cpu", "auto"),
                 help="cpu: force the CPU platform with --devices-per-process simulated devices (default); "
                      "auto: let JAX pick the accelerators (each process sees all local devices)")
  p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0 = a free one)")
  p.add_argument("--python", default=sys.executable, help="interpreter that runs the entry point")
  p.add_argument("--dry-run", action="store_true", help="print each process's environment and command, run nothing")
  args = p.parse_args(argv[:split])
  args.train_args = argv[split + 1:]
  args.workdir = next((a.split("=", 1)[1] for a in args.train_args if a.startswith("--workdir=")), None)
  if args.workdir is None:
    p.error("pass --workdir=DIR after --")
  if args.processes < 1:
    p.error("--processes must be >= 1")
  return args


def plan(args, coordinator: str) -> list[tuple[dict, list[str], Path]]:
  """[(environment additions, command, log file)] of every process."""
  out = []
  for i in range(args.processes):
    env = {"M2DINO_COORDINATOR": coordinator, "M2DINO_NUM_PROCESSES": str(args.processes),
           "M2DINO_PROCESS_ID": str(i)}
    if args.platform == "cpu":
      env["JAX_PLATFORMS"] = "cpu"
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices_per_process}"
    out.append((env, [args.python, "-m", "m2dino_jax.main", *args.train_args],
                Path(args.workdir) / "logs" / f"process_{i}.log"))
  return out


def describe(env: dict, cmd: list[str], log: Path) -> str:
  """One shell line: VAR=value ... command > log 2>&1."""
  return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd), ">",
                   shlex.quote(str(log)), "2>&1"])


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else list(argv))
  coordinator = f"127.0.0.1:{args.port or free_port()}"
  processes = plan(args, coordinator)
  if args.dry_run:
    print(f"# {args.processes} processes, coordinator {coordinator}, platform {args.platform}")
    for env, cmd, log in processes:
      print(describe(env, cmd, log) + " &")
    print("wait")
    return 0
  (Path(args.workdir) / "logs").mkdir(parents=True, exist_ok=True)
  procs = []
  for env, cmd, log_path in processes:
    log = open(log_path, "w")
    procs.append((subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT), log))

  def forward(signum, frame):
    for proc, _ in procs:
      if proc.poll() is None:
        proc.send_signal(signum)

  old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    codes = []
    for proc, log in procs:
      codes.append(proc.wait())
      log.close()
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
  return next((c for c in codes if c), 0)


if __name__ == "__main__":
  sys.exit(main())
