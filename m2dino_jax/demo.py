"""`make demo`: the main job on the embedded simulator, sized for a CPU.

1. Simulates the 27-task FMC_UIA ultrasound benchmark with sonosynth (once; reused while its stamp matches)
   and writes it in the challenge's on-disk layout under data_cache/sonosynth: training sets follow the
   challenge's long tail (sonosynth.task_size at `train_scale`), every task has `val_per_task` validation
   images so each metric is read off enough images.
2. Trains M2DINO in the all-task unified paradigm (AU, MoE on) on it, reading it back through the
   FMC_UIA adapter exactly as a user's real download would be read.
3. Prints the per-task table of official metrics (also in WORKDIR/all/eval/) next to each task's trivial
   baseline (tasks/baselines.py: fitted on the training split, scored with the same metric code) and how
   many tasks beat their baseline.

The data folder carries a stamp (demo_stamp.json: the demo's data settings and a hash of the simulator's
source); a folder whose stamp differs (an older simulator, another demo size) is simulated again.

`python -m m2dino_jax.demo --all` runs TS, CG and AU and then the paradigm report.

Sizing (issue 17): 32 validation images per task (864 in all), training sets twice the old demo's
(3222 images with validation), the smoke model at 64 px, batch 16, 30 steps per task (810 steps). Measured on 2
idle cores (`make demo`, wall): 161 s with no data and an empty compile cache (simulation 6 s, 12 programs
compiled in 37 s), 125 s with both warm (every program loaded from the persistent cache). Seed 0 beats its
trivial baseline on 20 of 27 tasks (segmentation 10/12, classification 6/9, detection 2/3, regression 2/3).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

from m2dino_jax import cli, fileio, main

DATA = Path("data_cache/sonosynth")
RUNS = Path("workdirs/demo")
STAMP = "demo_stamp.json"
# The demo's data: long-tailed training sets (16..240 images per task at 0.2), a fixed validation set per task.
DATA_SETTINGS = {"seed": 0, "train_scale": 0.2, "val_per_task": 32, "size": 128}
# The demo's training: steps per task (budget rule: x 27 tasks), model input side, batch (see `train`).
TRAIN_SETTINGS = {"steps": 30, "image_size": 64, "batch_size": 16}


def simulator_hash() -> str:
  """sha256 of the simulator's source files (m2dino_jax/data/sonosynth/*.py): changes when the simulator does."""
  from m2dino_jax.data import sonosynth

  h = hashlib.sha256()
  for path in sorted(Path(sonosynth.__file__).parent.glob("*.py")):
    h.update(path.name.encode() + b"\0" + path.read_bytes())
  return h.hexdigest()[:16]


def stamp(settings: dict | None = None) -> dict:
  return {"data": dict(settings or DATA_SETTINGS), "simulator": simulator_hash()}


def _read_stamp(root: Path) -> dict | None:
  try:
    return json.loads((root / STAMP).read_text())
  except (OSError, ValueError):
    return None


def _write_task(job) -> tuple[str, dict]:
  """Simulates one task into its own folder: `train` images from the long tail plus `val` images."""
  out, name, seed, train_n, val_n, size = job
  from m2dino_jax.data.sonosynth import generator, writer

  total = train_n + val_n
  base = generator.task_size(name, 1.0)
  manifest = writer.write_dataset(out, seed=seed, scale=total / base, size=size, tasks=[name],
                                  val_fraction=val_n / total, workers=1)
  got = manifest["tasks"][name]
  if (got["train"], got["val"]) != (train_n, val_n):  # float rounding in the writer's split would show here
    raise RuntimeError(f"{name}: simulated {got['train']} / {got['val']} images, asked {train_n} / {val_n}")
  return name, got


def write_data(root: Path, settings: dict | None = None, tasks=None, workers: int | None = None) -> dict:
  """Simulates the demo data set into `root` (replacing it) and stamps it; returns the manifest."""
  from m2dino_jax.data.sonosynth import generator
  from m2dino_jax.tasks import registry

  s = dict(settings or DATA_SETTINGS)
  chosen = registry.resolve(tasks or "all")
  root = Path(root)
  with fileio.atomic_dir(root) as tmp:
    jobs = [(str(tmp / "parts" / t.name), t.name, s["seed"], generator.task_size(t.name, s["train_scale"]),
             s["val_per_task"], s["size"]) for t in chosen]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    t0 = time.perf_counter()
    if workers > 1:
      with multiprocessing.get_context("spawn").Pool(workers) as pool:
        counts = dict(pool.map(_write_task, jobs, chunksize=1))
    else:
      counts = dict(map(_write_task, jobs))
    for part in sorted((tmp / "parts").iterdir()):  # merge: every task's files and CSVs into one layout
      for split_dir in sorted((part / "data").iterdir()):
        for src in sorted(p for p in split_dir.rglob("*") if p.is_file()):
          dst = tmp / "data" / split_dir.name / src.relative_to(split_dir)
          dst.parent.mkdir(parents=True, exist_ok=True)
          os.replace(src, dst)
    shutil.rmtree(tmp / "parts")
    manifest = {"simulated": True, "generator": "m2dino_jax.data.sonosynth (m2dino_jax.demo)",
                "note": "Simulated ultrasound images (convolution model), not patient data.", **s,
                "total_images": sum(c["train"] + c["val"] for c in counts.values()),
                "seconds": round(time.perf_counter() - t0, 2), "tasks": {t.name: counts[t.name] for t in chosen}}
    fileio.write_json(tmp / "manifest.json", manifest)
    fileio.write_text(tmp / "README.md", "# sonosynth: SIMULATED ultrasound data (m2dino_jax demo)\n\nEvery image "
                      "is simulated by m2dino_jax's embedded simulator; none comes from a patient or a scanner. "
                      "The layout is the FMC_UIA challenge's. Sizes per task: manifest.json.\n")
    fileio.write_json(tmp / STAMP, stamp(s))  # last: a folder without a stamp is never reused
  return manifest


def ensure_data(root: Path = DATA, settings: dict | None = None, tasks=None, workers: int | None = None) -> Path:
  """Reuses `root` when its stamp equals this demo's (data settings and simulator hash); else simulates it."""
  want, have = stamp(settings), _read_stamp(root)
  if have == want and (root / "data" / "train" / "csv_files").is_dir():
    print(f"simulated data: reusing {root}")
    return root
  if root.exists():
    why = ("no stamp" if have is None else "simulator changed" if have.get("simulator") != want["simulator"]
           else "demo data settings changed")
    print(f"simulated data: {root} is stale ({why}); simulating it again")
  manifest = write_data(root, settings, tasks, workers)
  print(f"simulated data: wrote {manifest['total_images']} images to {root} in {manifest['seconds']:.0f} s")
  return root


def train(paradigm: str, steps: int) -> int:
  """Trains one paradigm; the trainer prints the per-task table with each task's trivial baseline."""
  s = TRAIN_SETTINGS
  argv = [f"--config=configs/m2dino.py:paradigm={paradigm},smoke,steps={steps}",
          f"--workdir={RUNS / paradigm}", "--config.data.source.kind=folder",
          f"--config.data.source.root={DATA}", "--config.log_every=20", "--config.report_baselines=True",
          f"--config.data.image_size={s['image_size']}", f"--config.data.batch_size={s['batch_size']}"]
  return main.main(argv)


def run(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--all", action="store_true", help="train TS, CG and AU, then write the report")
  p.add_argument("--steps", type=int, default=TRAIN_SETTINGS["steps"], help="steps per task (budget rule)")
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
