"""One record schema for the four task types, with validation that names the source file.

A `Record` is what every adapter yields. Pixel coordinates are (x, y) with x = column.
`validate` checks a record against its task (class range, mask size, box order and bounds,
point count) and raises `DataError` naming `record.source` (and row when known).

Model-ready examples (`to_example`, produced by the pipeline after transforms) always carry
every key, so batches of any task share one pytree structure:
  image    float32 [H, W, C]     task_id int32          label  int32 (-1 = none)
  mask     uint8   [H, W]        box     float32 [4]    (x_min, y_min, x_max, y_max) in [0, 1]
  points   float32 [MAX_POINTS, 2] (x, y) in [0, 1]     orig_size int32 [2] (H, W) of the source image
"""

from __future__ import annotations

import dataclasses

import numpy as np

from m2dino_jax.errors import DataError
from m2dino_jax.tasks import registry

MAX_POINTS = max(t.num_points for t in registry.TASKS)  # 3 (IUGC)
EXAMPLE_KEYS = ("image", "task_id", "label", "mask", "box", "points", "orig_size")


@dataclasses.dataclass
class Record:
  """One labelled (or unlabelled) image as read from disk."""
  image: np.ndarray  # uint8 [H, W] grey or [H, W, 3] RGB
  task: str  # challenge task id, e.g. 'fetal_head'; '' for unlabelled pretraining images
  task_type: str = ""  # one of registry.TASK_TYPES; '' for unlabelled
  label: int = -1  # classification
  mask: np.ndarray | None = None  # segmentation: integer class map [H, W]
  box: np.ndarray | None = None  # detection: float32 [4] pixels (x_min, y_min, x_max, y_max)
  points: np.ndarray | None = None  # regression: float32 [K, 2] pixels (x, y)
  spacing_mm: tuple[float, float] | None = None  # (x, y) pixel size in mm when known
  source: str = ""  # file the record came from (for error messages)
  row: int | None = None  # CSV row when the record came from a table
  extra: dict = dataclasses.field(default_factory=dict)  # dataset-specific fields (split, patient, ...)

  def fail(self, message: str):
    raise DataError(self.source or "<record>", message, row=self.row)


def validate(rec: Record) -> Record:
  """Checks `rec` against its task; returns it unchanged or raises DataError (a task of a type with no
  CHECKS row is registry.unknown_type's ConfigError)."""
  img = rec.image
  if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or img.size == 0:
    rec.fail(f"image must be a non-empty 2D/3D array, got {getattr(img, 'shape', type(img))}")
  if img.ndim == 3 and img.shape[2] not in (1, 3):
    rec.fail(f"image must have 1 or 3 channels, got shape {img.shape}")
  if not rec.task:
    return rec  # unlabelled
  task = registry.BY_NAME.get(rec.task)
  if task is None:
    rec.fail(f"unknown task id '{rec.task}'")
  if rec.task_type and rec.task_type != task.type:
    rec.fail(f"task '{rec.task}' is {task.type}, record says {rec.task_type}")
  rec.task_type = task.type
  check = CHECKS.get(task.type)
  if check is None:
    raise registry.unknown_type(task.type)
  check(rec, task)
  return rec


def _check_label(rec: Record, task: registry.Task) -> None:
  if not 0 <= int(rec.label) < task.num_classes:
    rec.fail(f"class label {rec.label} outside 0..{task.num_classes - 1} for task '{task.name}'")


def _check_mask(rec: Record, task: registry.Task) -> None:
  h, w = rec.image.shape[:2]
  m = rec.mask
  if m is None:
    rec.fail("segmentation record has no mask")
  if m.shape[:2] != (h, w):
    rec.fail(f"mask size {m.shape[:2]} differs from image size {(h, w)}")
  hi = int(m.max()) if m.size else 0
  if int(m.min()) < 0 or hi >= task.num_classes:
    rec.fail(f"mask value {hi if hi >= task.num_classes else int(m.min())} outside the "
             f"{task.num_classes} classes of task '{task.name}'")


def _check_box(rec: Record, task: registry.Task) -> None:
  h, w = rec.image.shape[:2]
  b = np.asarray(rec.box, np.float32) if rec.box is not None else None
  if b is None or b.shape != (4,) or not np.all(np.isfinite(b)):
    rec.fail("detection record needs a finite box (x_min, y_min, x_max, y_max)")
  if b[2] < b[0] or b[3] < b[1]:
    rec.fail(f"box {b.tolist()} has x_max < x_min or y_max < y_min")
  if b[0] < 0 or b[1] < 0 or b[2] > w or b[3] > h:
    rec.fail(f"box {b.tolist()} lies outside the {w}x{h} image")
  rec.box = b


def _check_points(rec: Record, task: registry.Task) -> None:
  p = np.asarray(rec.points, np.float32) if rec.points is not None else None
  if p is None or p.shape != (task.num_points, 2) or not np.all(np.isfinite(p)):
    rec.fail(f"task '{task.name}' needs {task.num_points} finite (x, y) points, got "
             f"{None if p is None else p.shape}")
  rec.points = p


# task type -> check of a Record's target against its task (DataError naming the source), normalising the
# box / points to float32. Kept here rather than in tasks/types.py, which sits above the data layer
# (types imports data.transforms, which imports this module); tests/test_task_types.py asserts it covers
# exactly types.TYPES.
CHECKS = {registry.CLASSIFICATION: _check_label, registry.SEGMENTATION: _check_mask,
          registry.DETECTION: _check_box, registry.REGRESSION: _check_points}
