"""Writes sonosynth data in the FMC_UIA challenge's on-disk layout, so the FMC_UIA adapter reads
simulated and real data alike:

    OUT/README.md, OUT/manifest.json                     (states that the data are simulated)
    OUT/data/{train,val}/csv_files/<task>.csv            (one CSV per task)
    OUT/data/{split}/Classification/<task>/images/*.png
    OUT/data/{split}/Segmentation/{Two,Three,Four,Five}/<task>/{images,MASKS}/*.png
    OUT/data/{split}/Detection/<task>/images/*.png
    OUT/data/{split}/Regression/<task>/images/*.png

CSV paths are relative to csv_files/ (`../Classification/...`). Columns: task_id, task_name
(segmentation / classification / detection / Regression), image_path, num_classes, then by type
mask_path (PNG of class ids), mask (class label), x_min, y_min, x_max, y_max (pixels), or
point_1_xy .. point_K_xy (JSON "[x, y]", pixels). num_classes follows the official task table: classes for
segmentation / classification, 1 for detection, K (points) for regression.

Everything is written under a temporary folder beside OUT and renamed into place at the end, so an
interrupted run leaves no OUT at all. Samples are seeded one by one, so the output is identical for
any number of worker processes.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
from PIL import Image

from m2dino_jax import fileio
from m2dino_jax.data.sonosynth import generator, physics, scenes
from m2dino_jax.data.sonosynth import nuisance as nuisances
from m2dino_jax.errors import ConfigError, DataError
from m2dino_jax.tasks import registry

SEG_FOLDERS = {2: "Two", 3: "Three", 4: "Four", 5: "Five"}
TYPE_FOLDERS = {registry.CLASSIFICATION: "Classification", registry.DETECTION: "Detection",
                registry.REGRESSION: "Regression", registry.SEGMENTATION: "Segmentation"}
CSV_TYPE = {registry.CLASSIFICATION: "classification", registry.DETECTION: "detection",
            registry.REGRESSION: "Regression", registry.SEGMENTATION: "segmentation"}
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")


def csv_columns(task: registry.Task) -> list[str]:
  cols = ["task_id", "task_name", "image_path", "num_classes"]
  if task.type == registry.SEGMENTATION:
    cols.append("mask_path")
  elif task.type == registry.CLASSIFICATION:
    cols.append("mask")
  elif task.type == registry.DETECTION:
    cols.extend(BOX_COLUMNS)
  else:
    cols.extend(f"point_{i + 1}_xy" for i in range(task.num_points))
  return cols


def _task_dir(task: registry.Task) -> str:
  """Folder of a task's files relative to data/<split>/."""
  if task.type == registry.SEGMENTATION:
    return f"Segmentation/{SEG_FOLDERS[task.num_classes]}/{task.name}"
  return f"{TYPE_FOLDERS[task.type]}/{task.name}"


def split_indices(task: registry.Task, n: int, seed: int, val_fraction: float) -> set[int]:
  """Seeded random validation subset (at least one image when n >= 2 and val_fraction > 0)."""
  n_val = int(round(n * val_fraction))
  if val_fraction > 0 and n >= 2:
    n_val = min(max(n_val, 1), n - 1)
  order = np.random.default_rng([seed, task.index, 99]).permutation(n)
  return {int(i) for i in order[:n_val]}


def _write_png(path: Path, array: np.ndarray):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, compress_level=3)


def _write_sample(job) -> tuple[str, str, int, dict]:
  """Simulates one sample, writes its PNG(s) under `root`, returns (task, split, index, CSV row)."""
  root, task_name, index, split, seed, size, nuisance = job
  task = registry.get(task_name)
  rec = generator.sample(task_name, index, seed=seed, size=size, nuisance=nuisance)
  rel_dir = _task_dir(task)
  name = f"{task.name}_{index:05d}.png"
  split_dir = Path(root) / "data" / split
  row = {"task_id": task.name, "task_name": CSV_TYPE[task.type], "num_classes": task.num_classes}
  if task.type == registry.SEGMENTATION:
    _write_png(split_dir / rel_dir / "images" / name, rec.image)
    _write_png(split_dir / rel_dir / "MASKS" / name, rec.mask)
    row["image_path"] = f"../{rel_dir}/images/{name}"
    row["mask_path"] = f"../{rel_dir}/MASKS/{name}"
  else:
    _write_png(split_dir / rel_dir / "images" / name, rec.image)
    row["image_path"] = f"../{rel_dir}/images/{name}"
  if task.type == registry.CLASSIFICATION:
    row["mask"] = rec.label
  elif task.type == registry.DETECTION:
    row.update({k: f"{v:g}" for k, v in zip(BOX_COLUMNS, rec.box.tolist(), strict=True)})
  elif task.type == registry.REGRESSION:
    row["num_classes"] = task.num_points
    for i, (x, y) in enumerate(rec.points.tolist()):
      row[f"point_{i + 1}_xy"] = json.dumps([round(x, 2), round(y, 2)])
  return task.name, split, index, row


def _readme(manifest: dict) -> str:
  lines = [
      "# sonosynth: SIMULATED ultrasound data",
      "",
      "Every image in this folder is simulated by m2dino_jax's embedded ultrasound simulator",
      "(`m2dino data synth`). No image comes from a patient or a scanner. The folder mimics the",
      "FMC_UIA challenge layout (27 tasks) so the same reader loads real and simulated data.",
      "Results on these images say nothing about clinical performance.",
      "",
      f"seed {manifest['seed']}, scale {manifest['scale']}, size {manifest['size']} px; "
      f"{manifest['total_images']} images. Label conventions: m2dino_jax/data/sonosynth/scenes.py.",
      "",
      "| task | type | train | val |",
      "|---|---|---|---|",
  ]
  for name, t in manifest["tasks"].items():
    lines.append(f"| {name} | {t['type']} | {t['train']} | {t['val']} |")
  return "\n".join(lines) + "\n"


def write_dataset(out_dir, *, seed: int, scale: float = 1.0, size: int = 256, tasks=None,
                  val_fraction: float = 0.2, workers: int = 1, overwrite: bool = False, nuisance=None) -> dict:
  """Simulates the tasks (default: all 27) and writes them in the FMC_UIA layout; returns the manifest.
  `nuisance`: opt-in scanner / operator artefacts for every image (sonosynth.nuisance; default none)."""
  out = Path(out_dir)
  nuisance = nuisances.parse(nuisance)
  if scale <= 0:
    raise ConfigError("scale", f"must be > 0, got {scale}")
  if size < 32:
    raise ConfigError("size", f"must be at least 32 pixels, got {size}")
  if workers < 1:
    raise ConfigError("workers", f"must be at least 1, got {workers}")
  if not 0 <= val_fraction < 1:
    raise ConfigError("val_fraction", f"must be in [0, 1), got {val_fraction}")
  if out.exists() and not overwrite:
    raise DataError(out, "already exists; choose a new output folder or pass --overwrite")
  chosen = registry.resolve(tasks if tasks else "all")
  jobs, counts = [], {}
  for task in chosen:
    n = generator.task_size(task.name, scale)
    val = split_indices(task, n, seed, val_fraction)
    counts[task.name] = {"type": task.type, "train": n - len(val), "val": len(val)}
    jobs.extend((task.name, i, "val" if i in val else "train") for i in range(n))

  with fileio.atomic_dir(out) as tmp:
    t0 = time.perf_counter()
    work = [(str(tmp), name, i, split, seed, size, nuisance) for name, i, split in jobs]
    if workers > 1:
      with multiprocessing.get_context("spawn").Pool(workers) as pool:
        results = pool.map(_write_sample, work, chunksize=8)
    else:
      results = [_write_sample(job) for job in work]
    seconds = time.perf_counter() - t0
    rows: dict[tuple[str, str], list] = {}
    for name, split, _, row in sorted(results, key=lambda r: (r[0], r[1], r[2])):
      rows.setdefault((name, split), []).append(row)
    for split in ("train", "val"):
      csv_dir = tmp / "data" / split / "csv_files"
      csv_dir.mkdir(parents=True, exist_ok=True)
      for task in chosen:
        with open(csv_dir / f"{task.name}.csv", "w", newline="") as f:
          writer = csv.DictWriter(f, fieldnames=csv_columns(task))
          writer.writeheader()
          writer.writerows(rows.get((task.name, split), []))
    manifest = {
        "simulated": True,
        "generator": "m2dino_jax.data.sonosynth",
        "note": "Simulated ultrasound images (convolution model), not patient data.",
        "seed": seed, "scale": scale, "size": size, "val_fraction": val_fraction, "nuisance": list(nuisance),
        "total_images": len(jobs), "seconds": round(seconds, 2),
        "probes": {task.name: _probe_summary(scenes.SPECS[task.name].probe) for task in chosen},
        "tasks": counts,
    }
    fileio.write_json(tmp / "manifest.json", manifest)
    fileio.write_text(tmp / "README.md", _readme(manifest))
  return manifest


def _probe_summary(probe: physics.Probe) -> dict:
  keys = ("geometry", "depth_mm", "f0_mhz", "focus_mm", "angle_deg", "apex_mm", "width_mm")
  return {k: getattr(probe, k) for k in keys}
