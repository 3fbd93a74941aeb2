"""One table keyed by task type: everything that differs between segmentation, classification,
detection and regression, so that trainers, evaluation and inference never branch on `task.type`.

  head         builds the task's head module (models/heads.py) from the encoder width and config
  loss         (task, raw prediction, batch, loss config) -> (loss, metrics) (tasks/losses.py)
  postprocess  in-program map of the raw head output to the evaluated prediction: class map (argmax),
               probabilities (softmax) or [0, 1] coordinates (unchanged)
  target       the batch / Record field holding the target (mask, label, box, points)
  to_original  one canvas prediction -> original pixel space (inverse of the letterbox / resize canvas)
  metrics      metric names of the type, headline first (tasks/metrics.py)
  accumulator  how metrics.TaskEvaluator collects the type's examples and turns them into its metrics
  crop         one example's prediction padded to the type's largest head (shared programs) -> this task's

A new task type is one new row here, plus a row in the two per-type tables that cannot live here without
running against the data flow (tests/test_task_types.py asserts every table covers exactly these types):
data/records.py's CHECKS (validation of a Record's target; data sits below this module) and
infer/challenge.py's FORMATS (the challenge's prediction files: writer and reader; infer sits above tasks).
An unknown type is a ConfigError naming it (registry.unknown_type, the one helper every lookup raises).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from m2dino_jax.data import transforms
from m2dino_jax.models import heads
from m2dino_jax.tasks import losses, metrics, registry


@dataclasses.dataclass(frozen=True)
class TaskType:
  name: str
  target: str
  head: Callable
  loss: Callable
  postprocess: Callable
  to_original: Callable
  metrics: tuple[str, ...]
  crop: Callable
  accumulator: metrics.Accumulator

  def target_of(self, record):
    """The target of a data/records.Record for this type."""
    return getattr(record, self.target)


def _seg_head(task, dim, patch, num_features, cfg, rngs):
  return heads.SegHead(dim, task.num_classes, num_features, cfg.seg_channels, patch, rngs=rngs)


def _cls_head(task, dim, patch, num_features, cfg, rngs):
  return heads.ClsHead(dim, task.num_classes, cfg.cls_kind, cfg.mlp_hidden, rngs=rngs)


def _box_head(task, dim, patch, num_features, cfg, rngs):
  return heads.BoxHead(dim, cfg.mlp_hidden, rngs=rngs)


def _point_head(task, dim, patch, num_features, cfg, rngs):
  return heads.PointHead(dim, task.num_points, cfg.reg_kind, cfg.mlp_hidden, rngs=rngs)


def _get(cfg, key, default):
  return cfg.get(key, default) if cfg is not None else default


def _seg_loss(task, pred, batch, cfg=None):
  return losses.segmentation_loss(pred, batch["mask"], batch["valid"], task.num_classes,
                                  _get(cfg, "dice_weight", 1.0))


def _cls_loss(task, pred, batch, cfg=None):
  return losses.classification_loss(pred, batch["label"], batch["valid"], task.num_classes,
                                    _get(cfg, "label_smoothing", 0.0))


def _box_loss(task, pred, batch, cfg=None):
  return losses.detection_loss(pred, batch["box"], batch["valid"], _get(cfg, "box_l1_weight", 1.0),
                               _get(cfg, "giou_weight", 1.0))


def _point_loss(task, pred, batch, cfg=None):
  return losses.regression_loss(pred, batch["points"], batch["valid"], task.num_points)


def _class_map(pred):
  return jnp.argmax(pred, axis=-1).astype(jnp.uint8)


def _probabilities(pred):
  return jax.nn.softmax(pred.astype(jnp.float32), axis=-1)


def _mask_to_original(task, pred, orig_size, image_size, mode):
  return transforms.mask_to_original(pred, orig_size, mode)


def _box_to_original(task, pred, orig_size, image_size, mode):
  return transforms.points_to_original(np.reshape(pred, (2, 2)), orig_size, image_size, mode).reshape(4)


def _points_to_original(task, pred, orig_size, image_size, mode):
  return transforms.points_to_original(pred, orig_size, image_size, mode)


def _unchanged(task, pred, *args):
  return pred


def _first_classes(task, pred):
  return pred[:task.num_classes]


def _first_points(task, pred):
  return pred[:task.num_points]


TYPES: dict[str, TaskType] = {t.name: t for t in (
    TaskType(registry.SEGMENTATION, "mask", _seg_head, _seg_loss, _class_map, _mask_to_original,
             metrics.METRICS_BY_TYPE[registry.SEGMENTATION], _unchanged, metrics.SEGMENTATION_ACCUMULATOR),
    TaskType(registry.CLASSIFICATION, "label", _cls_head, _cls_loss, _probabilities, _unchanged,
             metrics.METRICS_BY_TYPE[registry.CLASSIFICATION], _first_classes, metrics.CLASSIFICATION_ACCUMULATOR),
    TaskType(registry.DETECTION, "box", _box_head, _box_loss, lambda p: p, _box_to_original,
             metrics.METRICS_BY_TYPE[registry.DETECTION], _unchanged, metrics.DETECTION_ACCUMULATOR),
    TaskType(registry.REGRESSION, "points", _point_head, _point_loss, lambda p: p, _points_to_original,
             metrics.METRICS_BY_TYPE[registry.REGRESSION], _first_points, metrics.REGRESSION_ACCUMULATOR),
)}


def of(task: registry.Task | str) -> TaskType:
  """The row of a task (or of a type name); an unknown type is a ConfigError."""
  name = task if isinstance(task, str) else task.type
  if name not in TYPES:
    raise registry.unknown_type(name)
  return TYPES[name]


def build_head(task: registry.Task, dim: int, patch: int, num_features: int, cfg, *, rngs):
  """The head module of one task."""
  return of(task).head(task, dim, patch, num_features, cfg, rngs)


def task_loss(task: registry.Task, pred, batch, cfg=None):
  """The task's loss and logging metrics; `cfg` is the config's `loss` section (optional)."""
  return of(task).loss(task, pred, batch, cfg)
