"""`make demo`: the main job on the embedded simulator, sized for a CPU.

1. Simulates the 27-task FMC_UIA ultrasound benchmark with sonosynth (once; reused afterwards) and
   writes it in the challenge's on-disk layout under data_cache/sonosynth.
2. Trains M2DINO in the all-task unified paradigm (AU, MoE on) on it, reading it back through the
   FMC_UIA adapter exactly as a user's real download would be read.
3. Prints the per-task table of official metrics (also in WORKDIR/all/eval/).

`python -m m2dino_jax.demo --all` runs TS, CG and AU and then the paradigm report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from m2dino_jax import cli, main

DATA = Path("data_cache/sonosynth")
RUNS = Path("workdirs/demo")


def ensure_data(seed: int = 0, scale: float = 0.1, size: int = 128) -> Path:
  if (DATA / "data" / "train" / "csv_files").is_dir():
    print(f"simulated data: reusing {DATA}")
    return DATA
  t0 = time.perf_counter()
  code = cli.main(["data", "synth", "--out", str(DATA), "--seed", str(seed), "--scale", str(scale),
                   "--size", str(size)])
  if code:
    sys.exit(code)
  print(f"simulated data: wrote {DATA} in {time.perf_counter() - t0:.0f} s")
  return DATA


def train(paradigm: str, steps: int) -> int:
  return main.main([f"--config=configs/m2dino.py:paradigm={paradigm},smoke,steps={steps}",
                    f"--workdir={RUNS / paradigm}", "--config.data.source.kind=folder",
                    f"--config.data.source.root={DATA}", "--config.log_every=20"])


def run(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--all", action="store_true", help="train TS, CG and AU, then write the report")
  p.add_argument("--steps", type=int, default=30, help="steps per task (budget rule)")
  args = p.parse_args(argv)
  ensure_data()
  t0 = time.perf_counter()
  for paradigm in (("ts", "cg", "au") if args.all else ("au",)):
    code = train(paradigm, args.steps)
    if code:
      return code
  if args.all:
    cli.main(["report", "--runs", *(f"{k}={RUNS / k}" for k in ("ts", "cg", "au")), "--out", str(RUNS / "report")])
  print(f"\ndone in {time.perf_counter() - t0:.0f} s; runs under {RUNS}/ "
        f"(metrics.jsonl, eval/, TensorBoard: tensorboard --logdir {RUNS})")
  return 0


if __name__ == "__main__":
  sys.exit(run())
