"""Inference with a trained multi-task run, writing the challenge's prediction formats.

  segmentation   OUT/masks/<image stem>.png (class ids, original size)
  classification OUT/classification_predictions.json {image: {predicted_class, predicted_probs}}
  detection      OUT/detection_predictions.json {image: {bbox_pixels, bbox_normalized}}
  regression     OUT/regression_predictions.json {image: {predicted_points_pixels, predicted_points_normalized}}

Boxes are (x_min, y_min, x_max, y_max); points (x, y); "normalized" divides by the original width / height.
The model comes from RUN/<model>/best/params (the best eval) or, failing that, the latest checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image

from m2dino_jax import fileio
from m2dino_jax.data import imageio, records, transforms
from m2dino_jax.errors import DataError, M2DinoError
from m2dino_jax.tasks import registry, types
from m2dino_jax.train import checkpointing, multitask

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".dcm", ".mha", ".nii", ".gz")


def find_model(run_dir: Path, task: str) -> tuple[Path, list[str], bool]:
  """(model folder, its tasks, moe on) of the model in `run_dir` that was trained on `task`."""
  for meta in sorted(run_dir.glob("*/tasks.json")):
    info = json.loads(meta.read_text())
    if task in info["tasks"]:
      return meta.parent, info["tasks"], bool(info["moe"])
  raise M2DinoError(f"{run_dir}: no model of this run was trained on task '{task}'")


def load_run_model(run_dir, task: str):
  """(config, the model's multi-task run on one device, params) of the run's model trained on `task`."""
  run_dir = Path(run_dir)
  cfg_file = run_dir / "config.json"
  if not cfg_file.is_file():
    raise M2DinoError(f"{run_dir}: not a training run (no config.json)")
  config = ml_collections.ConfigDict(fileio.read_json(cfg_file, "run config"))
  config.mesh_devices, config.sharding = 1, "dp"
  config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1})
  config.moe.backend = "dense" if config.moe.backend == "expert_parallel" else config.moe.backend
  model_dir, task_names, moe_on = find_model(run_dir, task)
  config.moe.enabled = moe_on
  model = multitask._Run(config, None, model_dir.name, registry.resolve(task_names))
  best = model_dir / "best" / "params"
  if best.is_dir():
    params = checkpointing.restore_params(best, model.state.params)
  else:
    ckpt = checkpointing.Checkpointer(model_dir / "ckpt", async_save=False)
    if ckpt.latest_step() is None:
      raise M2DinoError(f"{model_dir}: no checkpoint to predict with")
    params = ckpt.restore(model.state).params
  return config, model, params


def list_inputs(inputs) -> list[Path]:
  paths: list[Path] = []
  for item in inputs:
    p = Path(item)
    if p.is_dir():
      paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
    elif p.is_file():
      paths.append(p)
    else:
      raise DataError(p, "no such file or folder")
  if not paths:
    raise DataError(", ".join(map(str, inputs)), "no input images found")
  return paths


def predict(run_dir, task_name: str, inputs, out_dir, batch_size: int = 8) -> dict:
  task = registry.get(task_name)
  config, model, params = load_run_model(run_dir, task.name)
  data = config.data
  pipe = transforms.Pipeline(data.transforms.eval, data.image_size, data.channels)
  kind = types.of(task)
  paths = list_inputs(inputs)
  out = Path(out_dir)
  results = {}
  for start in range(0, len(paths), batch_size):
    chunk = paths[start:start + batch_size]
    images = [imageio.read_image(p) for p in chunk]
    examples = [pipe(records.Record(image=img, task="", source=str(p))) for img, p in zip(images, chunk)]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch["task_id"] = np.full(len(chunk), task.task_id, np.int32)
    pred = model.predict(params, batch, task)
    for p, img, pr in zip(chunk, images, pred):
      h, w = img.shape[:2]
      orig = kind.to_original(task, pr, (h, w), data.image_size, pipe.canvas_mode)
      results[p.name] = _format(task, orig, (h, w), p, out)
  if task.type != registry.SEGMENTATION:
    name = {registry.CLASSIFICATION: "classification", registry.DETECTION: "detection",
            registry.REGRESSION: "regression"}[task.type]
    fileio.write_json(out / f"{name}_predictions.json", results)
  return results


def _format(task: registry.Task, pred, hw, path: Path, out: Path) -> dict:
  h, w = hw
  if task.type == registry.SEGMENTATION:
    target = out / "masks" / f"{path.name.split('.')[0]}.png"
    with fileio.atomic_path(target) as tmp:
      Image.fromarray(np.asarray(pred, np.uint8)).save(tmp, format="PNG")
    return {"mask_path": str(target.relative_to(out))}
  if task.type == registry.CLASSIFICATION:
    probs = np.asarray(pred, float)
    return {"predicted_class": int(np.argmax(probs)), "predicted_probs": probs.tolist()}
  norm = np.array([w, h], float)
  if task.type == registry.DETECTION:
    box = np.asarray(pred, float)
    return {"bbox_pixels": box.tolist(), "bbox_normalized": (box / np.tile(norm, 2)).tolist()}
  pts = np.asarray(pred, float)
  return {"predicted_points_pixels": pts.tolist(), "predicted_points_normalized": (pts / norm).tolist()}
