"""Trivial baselines per task type: fitted on the training split only, scored like the model.

A baseline predicts the same thing for every image (up to the image's size), learned from the training
records alone; its predictions go through `metrics.TaskEvaluator` exactly as the model's do (same
official metric code, same convention, original pixels), so a model row and a baseline row compare
like for like:

  segmentation:   the most frequent label per pixel over the training masks (each training mask
                  nearest-resampled to the most common training mask shape; ties go to the lower class id, so
                  background wins a tie), resampled (nearest) to each evaluated image's size. Where no class
                  covers most training images at a pixel this is the empty mask; for large central structures
                  it is a fair "average anatomy" guess.
  classification: the majority training class: constant probabilities = the training class frequencies, so
                  the predicted class is the majority one (ties: the lower class id) and the AUC of the constant
                  score is 0.5 where AUC is defined (n/a where the labels miss a class; the official script
                  scores 0.0 there).
  detection:      the mean training box, in coordinates relative to the image size (x / W, y / H), mapped to
                  each evaluated image's size (= the mean pixel box when all images share one size).
  regression:     the mean training points, the same way.

`fit(task, train_records)` -> a baseline; `score(task, baseline, eval_records)` -> TaskEvaluator.result();
`for_config(data_config, tasks)` -> {task: result} for a training config's data section (the train rows
after the data-scale knobs, as the model sees them; the eval split).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from m2dino_jax.tasks import metrics, registry, types

WHAT = {
    registry.SEGMENTATION: "most frequent label per pixel",
    registry.CLASSIFICATION: "majority class",
    registry.DETECTION: "mean training box",
    registry.REGRESSION: "mean training points",
}


def _hw(rec) -> tuple[int, int]:
  return int(rec.image.shape[0]), int(rec.image.shape[1])


def nearest_resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resampling of a 2D array to `shape` (pixel centres: row i samples floor((i+.5) h / H))."""
  a = np.asarray(a)
  h, w = a.shape[:2]
  rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
  cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
  return a[rows[:, None], cols[None, :]]


# ------------------------------------------------------------------------------------------------ fit

def _fit_seg(task: registry.Task, train: Sequence) -> np.ndarray:
  shape = Counter(np.asarray(r.mask).shape for r in train).most_common(1)[0][0]
  counts = np.zeros((task.num_classes, *shape), np.int64)
  for r in train:
    m = nearest_resize(np.asarray(r.mask), shape)
    for c in range(task.num_classes):
      counts[c] += m == c
  return counts.argmax(axis=0).astype(np.uint8)  # argmax takes the first maximum: ties go to the lower id


def _fit_cls(task: registry.Task, train: Sequence) -> np.ndarray:
  freq = np.bincount([int(r.label) for r in train], minlength=task.num_classes).astype(float)
  return freq / freq.sum()


def _relative(rec, coords: np.ndarray) -> np.ndarray:
  h, w = _hw(rec)
  return np.asarray(coords, float).reshape(-1, 2) / np.array([w, h], float)


def _fit_box(task: registry.Task, train: Sequence) -> np.ndarray:
  return np.mean([_relative(r, r.box) for r in train], axis=0)  # [2, 2] (x, y) relative


def _fit_points(task: registry.Task, train: Sequence) -> np.ndarray:
  return np.mean([_relative(r, np.asarray(r.points)[:task.num_points]) for r in train], axis=0)  # [K, 2]


# ------------------------------------------------------------------------------------------- predict

def _absolute(rec, relative: np.ndarray) -> np.ndarray:
  h, w = _hw(rec)
  return relative * np.array([w, h], float)


# task type -> (fit(task, train records) -> baseline, predict(task, baseline, eval record) -> prediction)
_BY_TYPE: dict[str, tuple[Callable, Callable]] = {
    registry.SEGMENTATION: (_fit_seg, lambda task, b, rec: nearest_resize(b, _hw(rec))),
    registry.CLASSIFICATION: (_fit_cls, lambda task, b, rec: b),
    registry.DETECTION: (_fit_box, lambda task, b, rec: _absolute(rec, b).reshape(4)),
    registry.REGRESSION: (_fit_points, lambda task, b, rec: _absolute(rec, b)),
}


def fit(task: registry.Task | str, train_records: Iterable):
  """The task's trivial baseline from its training records (see the module docstring); ValueError if none."""
  task = registry.get(task) if isinstance(task, str) else task
  train = list(train_records)
  if not train:
    raise ValueError(f"task {task.name}: no training records to fit a baseline on")
  return _BY_TYPE[task.type][0](task, train)


def predict(task: registry.Task | str, baseline, record):
  """The baseline's prediction for one record, in the record's original pixels (TaskEvaluator.add's form)."""
  task = registry.get(task) if isinstance(task, str) else task
  return _BY_TYPE[task.type][1](task, baseline, record)


def score(task: registry.Task | str, baseline, eval_records: Iterable, convention: str = "default") -> dict:
  """TaskEvaluator.result() of the baseline on `eval_records` (the official metrics, `n` = images)."""
  task = registry.get(task) if isinstance(task, str) else task
  evaluator = metrics.TaskEvaluator(task, convention=convention)
  kind = types.of(task)
  for rec in eval_records:
    evaluator.add(predict(task, baseline, rec), kind.target_of(rec))
  return evaluator.result()


def evaluate(task: registry.Task | str, train_records: Iterable, eval_records: Iterable,
             convention: str = "default") -> dict:
  """fit on `train_records`, score on `eval_records`."""
  return score(task, fit(task, train_records), eval_records, convention)


def for_config(data_config, tasks, convention: str = "default") -> dict[str, dict]:
  """{task: baseline metrics} for a training config's `data` section: fitted on the train split after the
  data-scale knobs (the rows the model trains on), scored on `eval_split`. Tasks without train rows are
  left out."""
  from m2dino_jax.data import pipeline  # data imports tasks; import lazily to keep tasks importable alone

  chosen = registry.resolve(tasks) if isinstance(tasks, str) else [
      registry.get(t) if isinstance(t, str) else t for t in tasks]
  train = pipeline.train_subset(data_config, chosen,
                                pipeline.load_sources(data_config, chosen, data_config.train_split))
  val = pipeline.load_sources(data_config, chosen, data_config.eval_split)
  out = {}
  for task in chosen:
    rows = train[task.name]
    if len(rows):
      out[task.name] = evaluate(task, (pipeline.as_record(rows[i]) for i in range(len(rows))),
                                (pipeline.as_record(r) for r in val[task.name]), convention)
  return out


def beats(task_type: str, model: dict, baseline: dict) -> bool | None:
  """Whether the model's primary metric is strictly better than the baseline's (None when either is undefined)."""
  name, higher = metrics.primary_metric(task_type)
  m, b = model.get(name), baseline.get(name)
  if not all(isinstance(v, int | float) and math.isfinite(v) for v in (m, b)):
    return None
  return m > b if higher else m < b
