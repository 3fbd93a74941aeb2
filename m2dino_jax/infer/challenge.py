"""The FMC_UIA challenge's prediction files, written and scored as its official code does.

Layout of an output folder OUT (what the official `Model.predict(data_root, OUT)` writes and the official
`evaluate.py` reads):
  segmentation   OUT/<the CSV's mask_path without '../'>: PNG of class ids at the original size
  classification OUT/classification_predictions.json
  detection      OUT/detection_predictions.json
  regression     OUT/regression_predictions.json
Each JSON file is a list of records, one per image, keyed by `task_id` and `image_path` (verbatim from the
CSV, e.g. `../Classification/...`), and holding, by type: `predicted_class` and `predicted_probs`;
`bbox_normalized` and `bbox_pixels` ([x_min, y_min, x_max, y_max]); `predicted_points_normalized` and
`predicted_points_pixels` (flat [x1, y1, x2, y2, ...]). "normalized" divides by the original width / height.
Saving merges into existing files: entries of other tasks and images are kept, an entry with the same
(task_id, image_path) is replaced; every file is written to a temporary name and renamed.

`score(data_root, OUT)` evaluates such a folder against `data_root/csv_files` as the official script does
(a missing prediction is skipped, not scored; masks of another size are resized to the ground truth by
nearest neighbour the way OpenCV's INTER_NEAREST samples), through this project's FMC_UIA reader and
`tasks.metrics.TaskEvaluator`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from m2dino_jax import fileio
from m2dino_jax.data.adapters import fmc_uia
from m2dino_jax.errors import DataError
from m2dino_jax.tasks import metrics, registry, types


def _cls_fields(pred, hw) -> dict:
  probs = np.asarray(pred, float)
  return {"predicted_class": int(np.argmax(probs)), "predicted_probs": probs.tolist()}


def _det_fields(pred, hw) -> dict:
  h, w = hw
  box = np.asarray(pred, float).reshape(4)
  return {"bbox_normalized": (box / np.array([w, h, w, h], float)).tolist(), "bbox_pixels": box.tolist()}


def _reg_fields(pred, hw) -> dict:
  h, w = hw
  pts = np.asarray(pred, float).reshape(-1, 2)
  return {"predicted_points_normalized": (pts / np.array([w, h], float)).reshape(-1).tolist(),
          "predicted_points_pixels": pts.reshape(-1).tolist()}


def mask_file(out_dir, mask_path: str | None, image_path: str) -> Path:
  """Where a predicted mask goes: the CSV's mask_path without '../' (the official default without one:
  the image path with img -> mask)."""
  rel = mask_path if mask_path else image_path.replace("img", "mask").replace("IMG", "MASK")
  rel = rel.replace("../", "")
  target = Path(out_dir) / rel
  if Path(rel).is_absolute() or ".." in Path(rel).parts:
    raise DataError(rel, "mask path leaves the output folder")
  return target


def write_mask(path: Path, mask) -> None:
  with fileio.atomic_path(path) as tmp:
    Image.fromarray(np.asarray(mask, np.uint8)).save(tmp, format="PNG")


class Submission:
  """Collects one run's predictions; `save()` merges them into OUT's files (masks are written at once)."""

  def __init__(self, out_dir):
    self.out = Path(out_dir)
    self.entries: dict[str, list[dict]] = {t: [] for t, f in FORMATS.items() if f.file}
    self.counts: dict[str, int] = {}

  def add(self, task: registry.Task, image_path: str, pred, hw, mask_path: str | None = None) -> Path | None:
    """One prediction in original pixels; returns the mask file for segmentation."""
    self.counts[task.name] = self.counts.get(task.name, 0) + 1
    return format_of(task.type).write(self, task, image_path, pred, hw, mask_path)

  def save(self) -> list[Path]:
    written = []
    for type_, new in self.entries.items():
      if not new:
        continue
      path = self.out / FORMATS[type_].file
      old = read_predictions(path) if path.is_file() else []
      keys = {(e["task_id"], e["image_path"]) for e in new}
      merged = [e for e in old if (e.get("task_id"), e.get("image_path")) not in keys] + new
      written.append(fileio.write_json(path, merged))
    return written


def _write_mask(sub: Submission, task, image_path, pred, hw, mask_path) -> Path:
  target = mask_file(sub.out, mask_path, image_path)
  write_mask(target, pred)
  return target


def _entry_writer(fields):
  """A writer adding one record {image_path, task_id, **fields(pred, hw)} to the type's JSON file."""
  def write(sub: Submission, task, image_path, pred, hw, mask_path) -> None:
    sub.entries[task.type].append({"image_path": image_path, "task_id": task.name, **fields(pred, hw)})
  return write


def read_predictions(path) -> list[dict]:
  obj = fileio.read_json(path, "prediction file")
  if not isinstance(obj, list) or not all(isinstance(e, dict) and "task_id" in e and "image_path" in e
                                          for e in obj):
    raise DataError(path, "expected a JSON list of records with task_id and image_path (the official format)")
  return obj


# ------------------------------------------------------------------------------------------------ scoring

def resize_nearest(mask: np.ndarray, hw) -> np.ndarray:
  """OpenCV's INTER_NEAREST: source index floor(i * src / dst)."""
  h, w = hw
  rows = np.minimum((np.arange(h) * (mask.shape[0] / h)).astype(np.int64), mask.shape[0] - 1)
  cols = np.minimum((np.arange(w) * (mask.shape[1] / w)).astype(np.int64), mask.shape[1] - 1)
  return mask[rows][:, cols]


def _seg_pred(pred_root, index, rec):
  path = mask_file(pred_root, rec.extra.get("csv_mask_path"), rec.extra["csv_image_path"])
  if not path.is_file():
    return None
  mask = np.asarray(Image.open(path).convert("L"))
  if mask.shape != rec.mask.shape[:2]:
    mask = resize_nearest(mask, rec.mask.shape[:2])
  return (mask,), {}


def _cls_pred(pred_root, index, rec):
  e = index.get((rec.task, rec.extra["csv_image_path"]))
  return None if e is None else ((e["predicted_probs"],), {"predicted_class": e["predicted_class"]})


def _det_pred(pred_root, index, rec):
  e = index.get((rec.task, rec.extra["csv_image_path"]))
  return None if e is None else ((e["bbox_pixels"],), {})


def _reg_pred(pred_root, index, rec):
  e = index.get((rec.task, rec.extra["csv_image_path"]))
  return None if e is None else ((np.reshape(e["predicted_points_pixels"], (-1, 2)),), {})


@dataclasses.dataclass(frozen=True)
class Format:
  """One task type's part of the challenge format. `file`: its JSON prediction file under OUT, or None when
  its predictions are PNG masks (at `mask_file`); `write(submission, task, image_path, pred, hw, mask_path)`
  adds one prediction in original pixels (returns the mask file, or None); `read(pred_root, index, rec)`:
  ((prediction,), TaskEvaluator.add keywords) of a Record's prediction, or None when it has none."""
  file: str | None
  write: Callable
  read: Callable


# task type -> its part of the format. Kept here, keyed by the names of tasks/types.py's table, because
# tasks sit below infer; tests/test_task_types.py asserts it covers exactly types.TYPES.
FORMATS: dict[str, Format] = {
    registry.SEGMENTATION: Format(None, _write_mask, _seg_pred),
    registry.CLASSIFICATION: Format("classification_predictions.json", _entry_writer(_cls_fields), _cls_pred),
    registry.DETECTION: Format("detection_predictions.json", _entry_writer(_det_fields), _det_pred),
    registry.REGRESSION: Format("regression_predictions.json", _entry_writer(_reg_fields), _reg_pred),
}


def format_of(task_type: str) -> Format:
  """The format of a task type; an unknown type is registry.unknown_type's ConfigError."""
  if task_type not in FORMATS:
    raise registry.unknown_type(task_type)
  return FORMATS[task_type]


def score(data_root, pred_root, convention: str = "official") -> dict[str, dict]:
  """{task: TaskEvaluator.result()} of a prediction folder against `data_root/csv_files` (images without
  a prediction are skipped and not counted in `n`, as the official script does)."""
  pred_root = Path(pred_root)
  index = {}
  for name in (f.file for f in FORMATS.values() if f.file):
    if (pred_root / name).is_file():
      index.update({(e["task_id"], e["image_path"]): e for e in read_predictions(pred_root / name)})
  evaluators: dict[str, metrics.TaskEvaluator] = {}
  for rec in fmc_uia.read_folder(fmc_uia.csv_folder(data_root)):
    ev = evaluators.setdefault(rec.task, metrics.TaskEvaluator(rec.task, convention=convention))
    got = format_of(rec.task_type).read(pred_root, index, rec)
    if got is not None:
      (pred,), kwargs = got
      ev.add(pred, types.of(rec.task_type).target_of(rec), **kwargs)
  return {name: ev.result() for name, ev in evaluators.items()}
