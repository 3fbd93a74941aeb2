"""Evaluation of a multi-task model with the challenge's official metrics, in original pixels.

Eval batches come from the data pipeline in source order (each process a contiguous block, the tail
padded with valid=False). Predictions are made on the model canvas, gathered to every host, mapped
back through the inverse of the canvas transform (letterbox / resize) and scored by
`tasks.metrics.TaskEvaluator` against the untouched source records: masks, boxes and points at their
original size. MoE usage (tasks x experts routed-token counts) is summed over the pass; it counts the
padded images of a task's last batch too (the router sees them as that task's images).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils

from m2dino_jax import mesh as mesh_lib
from m2dino_jax.data import pipeline
from m2dino_jax.tasks import metrics, registry, types


def canvas_mode(data_config) -> str:
  first = str(data_config.transforms.eval[0]).strip()
  return "resize" if first.startswith("resize") else "letterbox"


def evaluate_task(predict, task: registry.Task, data_config, mesh, rules, usage_acc=None) -> dict:
  """Runs one task's eval split; returns TaskEvaluator.result() (plus per-class seg scores).

  `predict(global_batch) -> (prediction, usage)` is the task type's eval program with the state bound.
  """
  pc, pi = jax.process_count(), jax.process_index()
  source = pipeline.load_sources(data_config, [task], data_config.eval_split)[task.name]
  n = len(source)
  local = int(data_config.eval_batch_size) // pc
  block = math.ceil(n / pc)
  mode, size = canvas_mode(data_config), int(data_config.image_size)
  kind = types.of(task)
  evaluator = metrics.TaskEvaluator(task)
  batches = pipeline.make_eval_batches(data_config, task, process_index=pi, process_count=pc)
  for b, batch in enumerate(batches):
    batch = dict(batch)
    batch["task_id"] = np.full_like(batch["task_id"], task.task_id)
    gb = mesh_lib.shard_batch(batch, mesh, rules)
    with jax.set_mesh(mesh):
      pred, usage = predict(gb)
    pred = np.asarray(multihost_utils.process_allgather(pred, tiled=True))
    valid = np.asarray(multihost_utils.process_allgather(gb["valid"], tiled=True))
    if usage is not None and usage_acc is not None:
      usage_acc += np.asarray(usage)
    for g in range(pred.shape[0]):
      if not valid[g]:
        continue
      p, j = divmod(g, local)
      index = p * block + b * local + j
      rec = pipeline.as_record(source[index])
      orig = rec.image.shape[:2]
      evaluator.add(kind.to_original(task, kind.crop(task, pred[g]), orig, size, mode), kind.target_of(rec))
  result = evaluator.result()
  per_class = evaluator.per_class()
  if per_class:
    result["per_class"] = per_class
  return result


def score(task: registry.Task, result: dict, image_diag: float) -> float:
  """A higher-is-better number per task for picking the best checkpoint (MRE as 1 - mre / diagonal)."""
  name, higher = metrics.primary_metric(task.type)
  v = result.get(name)
  if v is None or not math.isfinite(v):
    return 0.0
  return float(v) if higher else max(0.0, 1.0 - float(v) / image_diag)
