"""FMC_UIA challenge bundle (the 27 tasks M2DINO trains on), as released and as sonosynth writes it.

Layout: `<root>/data/{train,val}/csv_files/*.csv` (or `<root>/{train,val}/csv_files/*.csv`), one CSV
per task with columns task_id, task_name (segmentation / classification / detection / Regression),
image_path and mask_path (relative to csv_files/), mask (class label for classification),
num_classes (as the official task table: classes, 1 for detection, point count for regression),
point_{i}_xy (JSON "[x, y]" in pixels) and x_min, y_min, x_max, y_max (pixels). Masks are grey PNGs whose
value is the class id. Records carry `source` = the CSV and `row` = its line number; the resolved image
path is in extra['image_path'], the CSV's own strings (what the official prediction files and evaluator
key on, e.g. `../Classification/...`) in extra['csv_image_path'] and extra['csv_mask_path'].

`csv_folder(root)` also accepts the official `Model.predict(data_root, ...)` form, `<data_root>/csv_files/`,
and `rows(folder)` lists a folder's rows without reading targets (test CSVs carry none).
Binary masks saved as 0/255 (a common export) are read as 0/1; any other value outside the task's
classes is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np

from m2dino_jax.data import imageio, records
from m2dino_jax.data.adapters import base
from m2dino_jax.errors import DataError
from m2dino_jax.tasks import registry

SPLITS = ("train", "val")
REQUIRED_COLUMNS = ("task_id", "task_name", "image_path")
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")
_POINT_COLUMN = re.compile(r"^point_(\d+)_xy$")


def csv_folder(data_root) -> Path:
  """`<data_root>/csv_files` (the official evaluator's data root) or `data_root` itself if it holds the CSVs."""
  root = Path(data_root)
  for cand in (root / "csv_files", root):
    if cand.is_dir() and any(cand.glob("*.csv")):
      return cand
  raise DataError(root / "csv_files", "no FMC_UIA CSV files here (expected <data_root>/csv_files/*.csv)")


def csv_dir(root, split: str) -> Path:
  """The csv_files/ folder of a split, with or without the bundle's top-level data/ folder."""
  root = Path(root)
  for cand in (root / "data" / split / "csv_files", root / split / "csv_files"):
    if cand.is_dir():
      return cand
  raise DataError(root / "data" / split / "csv_files", "FMC_UIA csv_files folder not found")


def _number(row: dict, key: str, csv_path, line: int) -> float:
  v = base.cell(row, key)
  if v is None:
    raise DataError(csv_path, f"column '{key}' is empty", row=line)
  try:
    return float(v)
  except ValueError:
    raise DataError(csv_path, f"column '{key}' is not a number: '{v}'", row=line) from None


def _integer(row: dict, key: str, csv_path, line: int) -> int:
  """A whole number (`2`, `2.0`); inf, NaN or a fraction is a DataError naming the column."""
  v = _number(row, key, csv_path, line)
  if not np.isfinite(v) or v != int(v):
    raise DataError(csv_path, f"column '{key}' is not a whole number: '{base.cell(row, key)}'", row=line)
  return int(v)


def _points(row: dict, header: list[str], csv_path, line: int) -> np.ndarray:
  cols = sorted((int(m.group(1)), h) for h in header if (m := _POINT_COLUMN.match(h)))
  pts = []
  for _, col in cols:
    v = base.cell(row, col)
    if v is None:
      continue
    try:
      xy = json.loads(v)
      pts.append([float(xy[0]), float(xy[1])])
    except (ValueError, TypeError, IndexError, KeyError):
      raise DataError(csv_path, f"column '{col}' is not a JSON [x, y] pair: '{v}'", row=line) from None
  return np.asarray(pts, np.float32).reshape(-1, 2)


def _load_row(csv_path: Path, header: list[str], line: int, row: dict, split: str) -> records.Record:
  """One CSV row to a Record (validation happens in base.read_items)."""
  task_id = base.cell(row, "task_id") or ""
  type_name = base.cell(row, "task_name") or ""
  if type_name not in registry.CSV_TYPE_NAMES:
    raise DataError(csv_path, f"task_name '{type_name}' is not one of segmentation, classification, "
                    "detection, Regression", row=line)
  task_type = registry.CSV_TYPE_NAMES[type_name]
  task = registry.BY_NAME.get(task_id)
  if task is None:
    raise DataError(csv_path, f"unknown task id '{task_id}'", row=line)
  if task.type != task_type:
    raise DataError(csv_path, f"task_name '{type_name}' but task '{task_id}' is {task.type}", row=line)
  rel = base.cell(row, "image_path")
  if rel is None:
    raise DataError(csv_path, "column 'image_path' is empty", row=line)
  base_dir = csv_path.parent
  resolve = lambda rel_path: Path(os.path.normpath(base_dir / rel_path))  # no '..' in messages
  try:
    image = imageio.read_image(resolve(rel))
  except DataError as e:
    raise DataError(csv_path, f"image {e}", row=line) from None
  rec = records.Record(image=image, task=task_id, task_type=task_type, source=str(csv_path), row=line,
                       extra={"split": split, "image_path": str(resolve(rel)), "csv_image_path": rel})
  expected = task.num_points if task.type == registry.REGRESSION else task.num_classes
  n = None if base.cell(row, "num_classes") is None else _integer(row, "num_classes", csv_path, line)
  if n is not None and n != expected:
    raise DataError(csv_path, f"num_classes {n} does not match task '{task_id}' ({expected})", row=line)
  if task_type == registry.SEGMENTATION:
    mrel = base.cell(row, "mask_path")
    if mrel is None:
      raise DataError(csv_path, "column 'mask_path' is empty for a segmentation row", row=line)
    try:
      mask = imageio.read_mask(resolve(mrel))
    except DataError as e:
      raise DataError(csv_path, f"mask {e}", row=line) from None
    if task.num_classes == 2 and mask.max(initial=0) == 255 and not np.isin(mask, (0, 255), invert=True).any():
      mask = (mask > 0).astype(np.uint8)
    rec.mask = mask
    rec.extra["mask_path"] = str(resolve(mrel))
    rec.extra["csv_mask_path"] = mrel
  elif task_type == registry.CLASSIFICATION:
    rec.label = _integer(row, "mask", csv_path, line)
  elif task_type == registry.DETECTION:
    rec.box = np.array([_number(row, k, csv_path, line) for k in BOX_COLUMNS], np.float32)
  elif task_type == registry.REGRESSION:
    rec.points = _points(row, header, csv_path, line)
  return rec


def _csv_items(csv_path: Path, split: str):
  header, rows = base.read_csv_rows(csv_path)
  missing = [c for c in REQUIRED_COLUMNS if c not in header]
  if not header or not rows:
    yield base.failing(csv_path, "empty CSV (no header or no rows)")
    return
  if missing:
    yield base.failing(csv_path, f"missing column(s) {', '.join(missing)}")
    return
  for line, row in rows:
    yield base.Item(str(csv_path), line,
                    lambda line=line, row=row: _load_row(csv_path, header, line, row, split))


@dataclasses.dataclass(frozen=True)
class Row:
  """One CSV row as the official inference reads it: the task, the CSV's own paths and the resolved image."""
  task: registry.Task
  image_path: str        # verbatim from the CSV (the prediction files' key)
  mask_path: str | None  # verbatim; segmentation masks are written at this path minus its '../'
  image_file: Path
  csv: Path
  line: int


def rows(folder) -> list[Row]:
  """Every row of every CSV in a csv_files folder (sorted by file name, then row), without reading targets."""
  folder = Path(folder)
  out = []
  for csv_path in sorted(folder.glob("*.csv")):
    header, csv_rows = base.read_csv_rows(csv_path)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
      raise DataError(csv_path, f"missing column(s) {', '.join(missing)}")
    for line, row in csv_rows:
      task_id = base.cell(row, "task_id") or ""
      task = registry.BY_NAME.get(task_id)
      if task is None:
        raise DataError(csv_path, f"unknown task id '{task_id}'", row=line)
      rel = base.cell(row, "image_path")
      if rel is None:
        raise DataError(csv_path, "column 'image_path' is empty", row=line)
      out.append(Row(task, rel, base.cell(row, "mask_path"), Path(os.path.normpath(folder / rel)), csv_path, line))
  if not out:
    raise DataError(folder, "no CSV rows to predict")
  return out


def read_folder(folder, *, skip_bad: bool = False, skipped_log=None):
  """Yields the validated records of every CSV in one csv_files folder (split name 'eval')."""
  folder = Path(folder)
  csvs = sorted(folder.glob("*.csv"))
  if not csvs:
    raise DataError(folder, "no CSV files in csv_files folder")
  its = (item for c in csvs for item in _csv_items(c, "eval"))
  return base.read_items(its, skip_bad=skip_bad, skipped_log=skipped_log)


def items(root, split: str = "train"):
  """Lists every row of every task CSV of a split (sorted by file name, then row)."""
  for s in (SPLITS if split == "all" else (split,)):
    csvs = sorted(csv_dir(root, s).glob("*.csv"))
    if not csvs:
      raise DataError(csv_dir(root, s), "no CSV files in csv_files folder")
    for csv_path in csvs:
      yield from _csv_items(csv_path, s)


def read(root, split: str = "train", *, skip_bad: bool = False, skipped_log=None):
  """Yields the validated records of an FMC_UIA split ('train', 'val' or 'all')."""
  base.check_split(split, SPLITS, "fmc_uia")
  return base.read_items(items(root, split), skip_bad=skip_bad, skipped_log=skipped_log)
