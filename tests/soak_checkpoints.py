"""Checkpoint soak (not in CI): many save / resume cycles of the smoke multi-task trainer in one process; memory,
open files, threads and files on disk must stay flat. Also times the integrity checks on a state of a given size.

  python tests/soak_checkpoints.py --cycles 60 --steps 3 [--json soak.json]
  python tests/soak_checkpoints.py --overhead-params 22000000   # finite check + manifest on a ViT-S-sized state

Each cycle builds a fresh Checkpointer and data iterator, resumes the newest checkpoint (verifying it), runs
`--steps` steps with a checkpoint every step (keep=2) and closes: what a preempted job that is restarted many
times does, without the process restarts.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _rss_mb() -> float:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) / 1024
  return float("nan")


def soak(cycles: int, steps: int, workdir: Path) -> list[dict]:
  from m2dino_jax import configlib
  from m2dino_jax.data import pipeline
  from m2dino_jax.tasks import registry
  from m2dino_jax.train import checkpointing, loop
  from m2dino_jax.train.multitask import trainer
  config = configlib.load_config("configs/m2dino.py:paradigm=au,smoke,tasks=breast_2cls", [
      "data.image_size=32", "data.source.synthetic_count=16", "data.batch_size=4", "tensorboard=False"])
  run = trainer._Run(config, workdir, "all", registry.resolve(config.tasks))
  writer = loop.MetricWriter(workdir, tensorboard=False)
  rows, state = [], run.state
  for cycle in range(cycles):
    it = pipeline.make_train_iterator(config.data, run.tasks, seed=0)
    t0 = time.perf_counter()
    with checkpointing.Checkpointer(workdir / "ckpt", keep=2, data_iter=it) as ckpt:
      state, step = ckpt.resume(state)
      t_resume = time.perf_counter() - t0
      start = 0 if step is None else step
      t1 = time.perf_counter()
      state, last, _ = loop.run(state=state, batches=map(run.prepare, it), step_fn=run.step, start_step=start,
                                total_steps=start + steps, writer=writer, log_every=steps, checkpoint_every=1,
                                checkpointer=ckpt, name="soak")
      t_steps = time.perf_counter() - t1
    it.close()
    files = sum(1 for _ in (workdir / "ckpt").rglob("*"))
    rows.append({"cycle": cycle, "step": last, "rss_mb": round(_rss_mb(), 1), "fds": len(os.listdir("/proc/self/fd")),
                 "threads": threading.active_count(), "ckpt_entries": files,
                 "step_dirs": sorted(int(p.name) for p in (workdir / "ckpt").iterdir() if p.name.isdigit()),
                 "resume_s": round(t_resume, 3), "steps_s": round(t_steps, 3)})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def overhead(n_params: int) -> dict:
  """Seconds for the pre-save finite check and the manifest CRC of a float32 state of `n_params` x 3 (Adam)."""
  from m2dino_jax.train import integrity
  leaves = 24
  shape = (n_params // leaves,)
  tree = {"params": [jnp.ones(shape, jnp.float32) for _ in range(leaves)],
          "mu": [jnp.ones(shape, jnp.float32) for _ in range(leaves)],
          "nu": [jnp.ones(shape, jnp.float32) for _ in range(leaves)]}
  integrity.first_non_finite(tree)  # compile
  t0 = time.perf_counter()
  for _ in range(5):
    integrity.first_non_finite(tree)
  finite_s = (time.perf_counter() - t0) / 5
  with tempfile.TemporaryDirectory() as d:
    step = Path(d) / "1"
    step.mkdir()
    for i, x in enumerate(jax.tree.leaves(tree)):
      np.asarray(x).tofile(step / f"leaf{i}")
    t0 = time.perf_counter()
    integrity.write_manifest(step)
    manifest_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert integrity.verify(step) is None
    verify_s = time.perf_counter() - t0
  size_mb = 3 * n_params * 4 / 2**20
  return {"params": n_params, "state_mb": round(size_mb, 1), "finite_check_s": round(finite_s, 4),
          "manifest_s": round(manifest_s, 3), "verify_s": round(verify_s, 3),
          "crc_mb_per_s": round(size_mb / manifest_s, 1)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cycles", type=int, default=60)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--overhead-params", type=int, default=0, help="only time the integrity checks at this size")
  p.add_argument("--json", default="", help="write the rows here")
  args = p.parse_args()
  if args.overhead_params:
    out = overhead(args.overhead_params)
    print(json.dumps(out))
  else:
    with tempfile.TemporaryDirectory() as d:
      rows = soak(args.cycles, args.steps, Path(d))
    first, last = rows[min(2, len(rows) - 1)], rows[-1]  # after warm-up (compiles, caches)
    out = {"rows": rows, "summary": {k: [first[k], last[k]] for k in ("rss_mb", "fds", "threads", "ckpt_entries")}}
    print("after warm-up -> last cycle:", json.dumps(out["summary"]))
  if args.json:
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
