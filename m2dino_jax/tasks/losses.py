"""Per-task losses on model-ready batches (targets as in data/records.py), masked by `valid`.

  segmentation   pixel cross-entropy + soft Dice over the foreground classes (1 : 1)
  classification cross-entropy with optional label smoothing
  detection      L1 + generalised IoU on normalised (x_min, y_min, x_max, y_max)
  regression     L1 on normalised (x, y) landmark coordinates

Each function returns (loss scalar, dict of scalar metrics for logging); `tasks/types.py` picks the loss
of a task type.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _masked_mean(x, valid):
  w = valid.astype(jnp.float32)
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def segmentation_loss(logits, mask, valid, num_classes: int, dice_weight: float = 1.0):
  """logits [B, H, W, C], mask int [B, H, W]."""
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.int32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, mask).mean(axis=(1, 2))
  probs = jax.nn.softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(mask, num_classes)
  inter = jnp.sum(probs * onehot, axis=(1, 2))
  denom = jnp.sum(probs, axis=(1, 2)) + jnp.sum(onehot, axis=(1, 2))
  dice = (2 * inter + 1.0) / (denom + 1.0)  # [B, C], smoothed
  dice_loss = 1.0 - dice[:, 1:].mean(axis=-1)
  ce, dice_loss = _masked_mean(ce, valid), _masked_mean(dice_loss, valid)
  return ce + dice_weight * dice_loss, {"ce": ce, "dice_loss": dice_loss}


def classification_loss(logits, label, valid, num_classes: int, label_smoothing: float = 0.0):
  logits = logits.astype(jnp.float32)
  target = optax.smooth_labels(jax.nn.one_hot(label, num_classes), label_smoothing)
  ce = _masked_mean(optax.softmax_cross_entropy(logits, target), valid)
  acc = _masked_mean((jnp.argmax(logits, -1) == label).astype(jnp.float32), valid)
  return ce, {"ce": ce, "accuracy": acc}


def box_iou_terms(pred, target):
  """IoU and generalised IoU of [..., 4] xyxy boxes."""
  area = lambda b: jnp.clip(b[..., 2] - b[..., 0], 0) * jnp.clip(b[..., 3] - b[..., 1], 0)
  lt = jnp.maximum(pred[..., :2], target[..., :2])
  rb = jnp.minimum(pred[..., 2:], target[..., 2:])
  inter = jnp.prod(jnp.clip(rb - lt, 0), axis=-1)
  union = area(pred) + area(target) - inter
  iou = inter / jnp.maximum(union, 1e-9)
  hull = jnp.prod(jnp.maximum(pred[..., 2:], target[..., 2:]) - jnp.minimum(pred[..., :2], target[..., :2]), -1)
  giou = iou - (hull - union) / jnp.maximum(hull, 1e-9)
  return iou, giou


def detection_loss(pred, box, valid, l1_weight: float = 1.0, giou_weight: float = 1.0):
  pred, box = pred.astype(jnp.float32), box.astype(jnp.float32)
  l1 = _masked_mean(jnp.abs(pred - box).mean(-1), valid)
  iou, giou = box_iou_terms(pred, box)
  giou_loss = _masked_mean(1.0 - giou, valid)
  return l1_weight * l1 + giou_weight * giou_loss, {"l1": l1, "iou": _masked_mean(iou, valid)}


def regression_loss(pred, points, valid, num_points: int):
  """pred [B, K, 2], points [B, MAX_POINTS, 2] (first K used), normalised coordinates."""
  err = jnp.abs(pred.astype(jnp.float32) - points[:, :num_points].astype(jnp.float32)).mean(axis=(1, 2))
  l1 = _masked_mean(err, valid)
  dist = jnp.linalg.norm(pred - points[:, :num_points], axis=-1).mean(-1)
  return l1, {"l1": l1, "mre_norm": _masked_mean(dist, valid)}
