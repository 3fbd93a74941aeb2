"""Simulator images/s per task and size (one core), border CNR per labelled class, optional contact sheet.

Speed: every task is timed on CPU seconds of this process (`time.process_time`: the one-core speed even
when other jobs share the machine), one image at a time, the tasks interleaved so that load changes
hit them all alike; geometry / filter caches are warmed first (generator.warm_caches). Goal (issue 18):
>= 60 images/s per core at 256 px for every task.

Border CNR (segmentation tasks, `--cnr-images` samples each): for every labelled class the smallest
contrast-to-noise ratio over its neighbouring labels, on the displayed images (sonosynth.measure).
Goal: mean >= 0.8 for every class.

`--stats` measures the realism checks of issue 18 (sonosynth.realism: the same functions the tests assert) and
prints one row per check with its target: displayed envelope mean/std and log-envelope std per probe, flatness of
the per-pixel log-envelope std (5th/95th percentile re median, fixed-pattern part, spectral peak), speckle grain
per output size, Nakagami m per tissue, skull side/near-far ratio, cyst level, A-line positions. A few CPU
minutes at the default `--stats-realisations 2000`; `--images 0 --cnr-images 0 --stats` gives the table alone.

`--shortcut N` (classification tasks among `--tasks`): the shortcut measure (sonosynth.measure.task_shortcut, the
one tests/test_sonosynth_shortcuts.py asserts): cross-validated accuracy of a logistic regression on anatomy-free
global statistics (grey-level histogram in the field, depth-band means) of N images per class at 128 px, next to
chance and the bound chance + 2/3 * (1 - chance).

`--contact-sheet PATH` renders `--sheet-per-task` samples of every task at `--sheet-size` px as one PNG,
the labels drawn on top (mask borders, boxes, points; class id in the corner), quantised to 128 colours.
"""

from __future__ import annotations

import time

import numpy as np

from m2dino_jax.bench import common
from m2dino_jax.tasks import registry

CNR_GOAL = 0.8
SPEED_GOAL = 60.0  # images/s per core at 256 px
_COLOURS = ((255, 64, 64), (64, 224, 64), (80, 140, 255), (255, 220, 0), (255, 0, 255))


SMOKE = {"tasks": "fetal_head,breast_2cls,thyroid_nodule_det,fetal_femur", "sizes": [64], "images": 2,
         "cnr_images": 2, "cnr_size": 128}


def add_args(p) -> None:
  p.add_argument("--tasks", default="all", help="task ids (comma separated) or 'all'")
  p.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="image sides to time")
  p.add_argument("--images", type=int, default=6, help="timed images per task and size")
  p.add_argument("--cnr-images", type=int, default=20, help="samples per segmentation task for the CNR (0 = skip)")
  p.add_argument("--cnr-size", type=int, default=256, help="image side for the CNR samples")
  p.add_argument("--seed", type=int, default=0, help="simulator seed")
  p.add_argument("--stats", action="store_true", help="measure and print the realism statistics (issue 18)")
  p.add_argument("--stats-realisations", type=int, default=2000, help="--stats: realisations for the flatness")
  p.add_argument("--shortcut", type=int, default=0,
                 help="classification tasks: shortcut accuracy on global statistics, N images per class (0 = skip)")
  p.add_argument("--contact-sheet", default=None, help="write a contact sheet PNG here")
  p.add_argument("--sheet-size", type=int, default=128, help="contact sheet: image side")
  p.add_argument("--sheet-per-task", type=int, default=2, help="contact sheet: samples per task")
  p.add_argument("--sheet-columns", type=int, default=6, help="contact sheet: columns")


def speed(tasks, sizes, images: int, seed: int = 0) -> list[dict]:
  """Images/s per core for every (task, size), the tasks interleaved image by image."""
  from m2dino_jax.data.sonosynth import generator
  rows = []
  for size in sizes:
    cpu = dict.fromkeys(tasks, 0.0)
    for t in tasks:  # warm the caches: geometry and every jittered PSF filter (the steady state)
      generator.warm_caches(t, size)
      generator.sample(t, 0, seed=seed, size=size)
    for i in range(images):
      for t in tasks:
        t0 = time.process_time()
        generator.sample(t, 1 + i, seed=seed, size=size)
        cpu[t] += time.process_time() - t0
    for t in tasks:
      rate = images / max(cpu[t], 1e-9)
      rows.append({"task": t, "type": registry.get(t).type, "size": size, "images_per_s": rate,
                   "ms_per_image": 1e3 / rate, "goal_met": bool(rate >= SPEED_GOAL) if size == 256 else None})
  return rows


def border_cnr(tasks, n: int, size: int, seed: int = 0) -> list[dict]:
  """Per segmentation task and class, over `n` samples: mean / 10th percentile / min of the local border CNR
  (the target) and the mean of the whole-border one (sonosynth.measure)."""
  from m2dino_jax.data.sonosynth import generator, measure, physics, scenes
  rows = []
  for t in tasks:
    if registry.get(t).type != registry.SEGMENTATION:
      continue
    fov = physics.geometry(scenes.SPECS[t].probe, size, size).fov
    local: dict[int, list[float]] = {}
    whole: dict[int, list[float]] = {}
    for i in range(n):
      rec = generator.sample(t, i, seed=seed, size=size)
      for c, v in measure.border_cnr(rec.image, rec.mask, fov).items():
        local.setdefault(c, []).append(v)
      for c, v in measure.border_cnr_global(rec.image, rec.mask, fov).items():
        whole.setdefault(c, []).append(v)
    for c in sorted(local):
      v = np.asarray(local[c], np.float64)
      v = v[np.isfinite(v)]
      g = np.asarray(whole[c], np.float64)
      g = g[np.isfinite(g)]
      mean = float(v.mean()) if v.size else float("nan")
      rows.append({"task": t, "class": c, "cnr_mean": mean,
                   "cnr_p10": float(np.percentile(v, 10)) if v.size else float("nan"),
                   "cnr_min": float(v.min()) if v.size else float("nan"),
                   "global_mean": float(g.mean()) if g.size else float("nan"),
                   "samples": int(v.size), "goal_met": bool(mean >= CNR_GOAL)})
  return rows


def realism_stats(realisations: int = 2000) -> list[dict]:
  """One row per realism check: {check, target, measured, ok (None: reported, no target)}."""
  from m2dino_jax.data.sonosynth import realism
  rows = []

  def row(check, target, measured, ok=None):
    rows.append({"check": check, "target": target, "measured": measured, "ok": ok})

  for name in ("linear", "convex", "phased"):
    for size in (128, 256):
      sp = realism.speckle(realism.quiet(name), size)
      row(f"envelope mean/std {name} {size}px", "1.913 (Rayleigh; display averaging raises it)",
          round(sp["mean_over_std"], 3))
      row(f"log-envelope std {name} {size}px", "5.57 dB (Rayleigh)", round(sp["log_std_db"], 2))
  for name in ("convex", "phased"):
    f = realism.flatness(realism.quiet(name), 128, realisations)
    row(f"per-pixel log-std p5/p95 re median {name} 128px ({realisations} real.)", "within +-0.3 dB",
        f"{f['lo_db']:+.3f} / {f['hi_db']:+.3f}", -0.3 <= f["lo_db"] and f["hi_db"] <= 0.3)
    row(f"  fixed-pattern std {name}", "(split halves)", round(f["fixed_db"], 3))
    row(f"  spectral peak lateral/axial {name}", "< 3 x neighbours",
        f"{f['peak_lateral']:.2f} / {f['peak_axial']:.2f}", max(f["peak_lateral"], f["peak_axial"]) < 3)
  for name in ("convex", "phased"):
    p = realism.quiet(name)
    g = {size: realism.grain_mm(p, size, (0.75, 0.92), seeds=30) for size in (128, 256, 512)}
    row(f"lateral grain mm {name} 128/256/512", "same +-10%", " / ".join(f"{g[s][0]:.2f}" for s in g))
    row(f"  lateral 256/512, 128/512 {name}", "1 +- 0.1", f"{g[256][0] / g[512][0]:.3f}, {g[128][0] / g[512][0]:.3f}",
        abs(g[256][0] / g[512][0] - 1) <= 0.1 and abs(g[128][0] / g[512][0] - 1) <= 0.1)
    row(f"axial grain mm {name} 128/256/512", "(pixel-limited below 512)", " / ".join(f"{g[s][1]:.2f}" for s in g))
    lat, ax = realism.grain_mm(p, 128, (0.85, 0.98), seeds=8)
    row(f"lateral/axial {name} 128px far field", "> 1.5", round(lat / ax, 2), lat / ax > 1.5)
    shallow = realism.grain_mm(p, 256, (0.3, 0.45), seeds=4)[0]
    deep = realism.grain_mm(p, 256, (0.75, 0.9), seeds=4)[0]
    row(f"lateral grain deep/shallow {name} 256px", "grows with depth", round(deep / shallow, 2), deep > shallow)
  m, theory = realism.tissue_m()
  for t in realism.TISSUES:
    row(f"Nakagami m {t}", f"{theory[t]:.2f} (theory) +-8%", round(m[t], 3), abs(m[t] / theory[t] - 1) <= 0.08)
  ratios = [realism.skull_wall_ratio_db(i) for i in range(3)]
  row("skull near-far / side walls (3 scenes)", ">= 10 dB", " / ".join(f"{r:.1f}" for r in ratios), min(ratios) >= 10)
  caps = [realism.capsule_ratio_db(i) for i in range(3)]
  row("kidney capsule square-on / along (3 scenes)", ">= 6 dB (no issue target)", " / ".join(f"{r:.1f}" for r in caps),
      min(caps) >= 6)
  c = realism.cyst_db()
  row("cyst re tissue", "-20..-25 dB", round(c, 2), -25 <= c <= -20)
  a = realism.a_lines()
  row("A-lines at k x pleural depth", "2, 3", f"{a['echo2_at']:.2f}, {a['echo3_at']:.2f}",
      abs(a["echo2_offset_px"]) <= 2 and abs(a["echo3_offset_px"]) <= 2)
  row("  A-line 2nd - 3rd (per-bounce -8 dB)", "8 +- 2 dB", round(a["fade_db"], 2), abs(a["fade_db"] - 8) <= 2)
  return rows


def shortcuts(tasks, per_class: int, seed: int = 0) -> list[dict]:
  """Per classification task: the shortcut measure (sonosynth.measure.task_shortcut) next to chance and its bound."""
  from m2dino_jax.data.sonosynth import measure
  rows = []
  for t in tasks:
    if registry.get(t).type != registry.CLASSIFICATION:
      continue
    r = measure.task_shortcut(t, per_class=per_class, size=128, seed=seed)
    limit = measure.shortcut_bound(r["chance"])
    rows.append({"task": t, "shortcut_accuracy": round(r["accuracy"], 3), "chance": round(r["chance"], 3),
                 "bound": round(limit, 3), "images": r["images"], "goal_met": r["accuracy"] <= limit})
  return rows


def _outline(mask: np.ndarray) -> np.ndarray:
  edge = np.zeros(mask.shape, bool)
  edge[:-1] |= mask[:-1] != mask[1:]
  edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
  return edge


def _tile(rec, size: int):
  """One sample as an RGB PIL image with its label drawn on it."""
  from PIL import Image, ImageDraw
  rgb = np.repeat(rec.image[..., None], 3, axis=2)
  if rec.mask is not None:
    for c in range(1, int(rec.mask.max()) + 1):
      rgb[_outline(rec.mask == c) & (rec.mask == c)] = _COLOURS[(c - 1) % len(_COLOURS)]
  img = Image.fromarray(rgb)
  draw = ImageDraw.Draw(img)
  if rec.box is not None:
    draw.rectangle([float(v) for v in rec.box], outline=_COLOURS[1])  # PIL: inclusive corners, close enough
  if rec.points is not None:
    for k, (x, y) in enumerate(np.asarray(rec.points, np.float64)):
      col = _COLOURS[k % len(_COLOURS)]
      draw.line([x - 3, y, x + 3, y], fill=col)
      draw.line([x, y - 3, x, y + 3], fill=col)
  if rec.label >= 0:
    draw.text((size - 12, 2), str(rec.label), fill=_COLOURS[3])
  return img


def contact_sheet(path, tasks, size: int = 128, per_task: int = 2, seed: int = 0, columns: int = 6) -> str:
  """All tasks' samples in one PNG (task name on each tile, labels drawn); returns the path."""
  from PIL import Image, ImageDraw

  from m2dino_jax.data.sonosynth import generator
  tiles = []
  for t in tasks:
    for i in range(per_task):
      tile = _tile(generator.sample(t, i, seed=seed, size=size), size)
      ImageDraw.Draw(tile).text((2, size - 12), t[:22], fill=(255, 255, 255))
      tiles.append(tile)
  rows = -(-len(tiles) // columns)
  sheet = Image.new("RGB", (columns * size, rows * size))
  for k, tile in enumerate(tiles):
    sheet.paste(tile, ((k % columns) * size, (k // columns) * size))
  sheet.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)  # half the bytes
  return str(path)


def run(args) -> None:
  tasks = [t.name for t in registry.resolve(args.tasks)]
  rows = speed(tasks, args.sizes, args.images, args.seed) if args.images > 0 else []
  if rows:
    common.print_table(rows, ["task", "type", "size", "images_per_s", "ms_per_image", "goal_met"])
  for size in args.sizes if rows else ():
    rates = [r["images_per_s"] for r in rows if r["size"] == size]
    print(f"{size} px: slowest {min(rates):.1f} images/s, all tasks {len(rates) / sum(1 / r for r in rates):.1f} "
          f"images/s (harmonic mean)")
  cnr = border_cnr(tasks, args.cnr_images, args.cnr_size, args.seed) if args.cnr_images > 0 else []
  if cnr:
    common.print_table(cnr, ["task", "class", "cnr_mean", "cnr_p10", "cnr_min", "global_mean", "samples", "goal_met"])
    print(f"border CNR >= {CNR_GOAL} for {sum(r['goal_met'] for r in cnr)} / {len(cnr)} classes")
  stats = realism_stats(args.stats_realisations) if args.stats else []
  if stats:
    common.print_table(stats, ["check", "target", "measured", "ok"])
  short = shortcuts(tasks, args.shortcut, args.seed) if args.shortcut > 0 else []
  if short:
    common.print_table(short, ["task", "shortcut_accuracy", "chance", "bound", "images", "goal_met"])
  sheet = None
  if args.contact_sheet:
    sheet = contact_sheet(args.contact_sheet, tasks, args.sheet_size, args.sheet_per_task, args.seed,
                          args.sheet_columns)
    print(f"wrote contact sheet {sheet}")
  rows = [{"name": f"{r['task']}@{r['size']}", "median_s": 1.0 / r["images_per_s"], **r} for r in rows] or \
      [{"name": "border_cnr" if cnr else ("shortcuts" if short else "realism_stats"), "median_s": None}]
  common.write_results(args, "sonosynth", rows, shapes={"sizes": list(args.sizes)}, cnr=cnr, stats=stats,
                       shortcuts=short, contact_sheet=sheet,
                       clock="process_time", speed_goal=SPEED_GOAL, cnr_goal=CNR_GOAL)
