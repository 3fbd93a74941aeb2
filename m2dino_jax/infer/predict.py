"""Inference with a trained multi-task run, writing the challenge's official prediction formats
(infer/challenge.py).

Two modes:
  predict_submission(run, data_root, out)  the official `Model.predict(data_root, out)` contract: every row of
      `data_root/csv_files/*.csv`, each model of the run loaded once, batched per task, with a progress bar;
      JSON records keyed by the CSV's verbatim `image_path`, masks at the CSV's `mask_path`.
  predict(run, task, inputs, out)          one task on image files / folders (quick use); the same JSON
      formats keyed by the path as given; masks at OUT/masks/<task>/<path under the input folder>.png.
Both merge into existing prediction files (other tasks' entries are kept). The model comes from
RUN/<model>/best/params (the best eval) or, failing that, the latest checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np

from m2dino_jax import fileio
from m2dino_jax import mesh as mesh_lib
from m2dino_jax.data import imageio, records, transforms
from m2dino_jax.data.adapters import fmc_uia
from m2dino_jax.errors import DataError, M2DinoError
from m2dino_jax.infer import challenge
from m2dino_jax.tasks import registry, types
from m2dino_jax.train import checkpointing
from m2dino_jax.train.multitask import steps as multitask_steps
from m2dino_jax.train.multitask import trainer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".dcm", ".mha", ".nii", ".gz")


def run_models(run_dir) -> list[tuple[Path, list[str], bool]]:
  """(model folder, its tasks, moe on) of every model of a run."""
  out = []
  for m in sorted(Path(run_dir).glob("*/tasks.json")):
    info = fileio.read_json(m, "model file")
    if not (isinstance(info, dict) and isinstance(info.get("tasks"), list) and "moe" in info):
      raise DataError(m, "not a model file: expected {\"model\", \"tasks\": [...], \"moe\"}")
    out.append((m.parent, info["tasks"], bool(info["moe"])))
  return out


def load_config(run_dir) -> ml_collections.ConfigDict:
  cfg_file = Path(run_dir) / "config.json"
  if not cfg_file.is_file():
    raise M2DinoError(f"{run_dir}: not a training run (no config.json)")
  obj = fileio.read_json(cfg_file, "run config")
  if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("data"), dict)):
    raise DataError(cfg_file, "not a training run's config (a JSON object with 'model' and 'data' expected)")
  return ml_collections.ConfigDict(obj)


class Model:
  """One trained model of a run, with one compiled eval program per task type."""

  def __init__(self, config, model_dir: Path, task_names: list[str], moe_on: bool):
    self.config, self.tasks = config, registry.resolve(task_names)
    encoder, heads = trainer.build_modules(config, self.tasks, moe_on=moe_on, seed=config.seed)
    self.enc_gdef, enc_params, self.enc_rest, self.head_gdefs, head_params = trainer.split_model(encoder, heads)
    like = {"encoder": enc_params, "heads": head_params}
    best = model_dir / "best" / "params"
    if best.is_dir():
      self.params = checkpointing.restore_params(best, like)
    else:
      ckpt = checkpointing.Checkpointer(model_dir / "ckpt", async_save=False)
      if ckpt.latest_step() is None:
        raise M2DinoError(f"{model_dir}: no checkpoint to predict with")
      state = ckpt.manager.restore(ckpt.latest_step())["state"]  # raw restore of the saved TrainState
      self.params = {k: state["params"][k] for k in ("encoder", "heads")}
    data = config.data
    self.pipe = transforms.Pipeline(data.transforms.eval, data.image_size, data.channels)
    self.mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    self._programs: dict[str, tuple] = {}

  def _program(self, task_type: str):
    if task_type not in self._programs:
      of_type = [t for t in self.tasks if t.type == task_type]
      fn = multitask_steps.eval_program(self.enc_gdef, self.head_gdefs, of_type)
      self._programs[task_type] = jax.jit(fn), multitask_steps.bound_inputs(of_type, {}, self.enc_rest)
    return self._programs[task_type]

  def predict(self, task: registry.Task, images: list[np.ndarray], batch_size: int) -> list:
    """Predictions in each image's original pixels (batches padded to `batch_size`: one compile per type)."""
    program, bound = self._program(task.type)
    kind, size = types.of(task), int(self.config.data.image_size)
    out = []
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      examples = [self.pipe(records.Record(image=img, task=task.name)) for img in chunk]
      examples += [examples[-1]] * (batch_size - len(examples))
      batch = {"image": np.stack([e["image"] for e in examples]),
               "task_id": np.full(batch_size, task.task_id, np.int32)}
      with jax.set_mesh(self.mesh):
        pred, _ = program(self.params, batch, bound)
      pred = np.asarray(pred)
      for img, p in zip(chunk, pred):
        out.append(kind.to_original(task, kind.crop(task, p), img.shape[:2], size, self.pipe.canvas_mode))
    return out


def _progress(total: int, enabled: bool):
  try:
    from tqdm import tqdm
  except ImportError:  # optional
    return None
  return tqdm(total=total, unit="img", desc="predict", file=sys.stderr, disable=not enabled)


def predict_submission(run_dir, data_root, out_dir, batch_size: int = 8, progress: bool = True) -> dict[str, int]:
  """Predicts every row of `data_root/csv_files` with the run's models; writes the official layout in
  `out_dir`. Returns {task: images predicted}."""
  config = load_config(run_dir)
  rows = fmc_uia.rows(fmc_uia.csv_folder(data_root))
  by_task: dict[str, list[fmc_uia.Row]] = {}
  for r in rows:
    by_task.setdefault(r.task.name, []).append(r)
  models = run_models(run_dir)
  owner = {t: m for m in models for t in m[1]}
  missing = sorted(set(by_task) - set(owner))
  if missing:
    raise M2DinoError(f"{run_dir}: no model of this run was trained on task(s) {', '.join(missing)}")
  sub = challenge.Submission(out_dir)
  bar = _progress(len(rows), progress)
  for model_dir, task_names, moe_on in models:
    wanted = [t for t in task_names if t in by_task]
    if not wanted:
      continue
    model = Model(config, model_dir, task_names, moe_on)  # one load per model
    for name in wanted:
      task = registry.get(name)
      task_rows = by_task[name]
      for start in range(0, len(task_rows), 64):  # bounded memory: 64 images read at a time
        part = task_rows[start:start + 64]
        images = [_read(r.image_file, r.csv, r.line) for r in part]
        for r, img, pred in zip(part, images, model.predict(task, images, batch_size)):
          sub.add(task, r.image_path, pred, img.shape[:2], r.mask_path)
        if bar is not None:
          bar.update(len(part))
  if bar is not None:
    bar.close()
  sub.save()
  return sub.counts


def _read(path: Path, csv: Path, line: int) -> np.ndarray:
  try:
    return imageio.read_image(path)
  except DataError as e:
    raise DataError(csv, f"image {e}", row=line) from None


def list_inputs(inputs) -> list[tuple[Path, Path]]:
  """(image file, its path under the input folder, or its name for a file given directly)."""
  paths: list[tuple[Path, Path]] = []
  for item in inputs:
    p = Path(item)
    if p.is_dir():
      paths += [(q, q.relative_to(p)) for q in sorted(p.rglob("*"))
                if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES]
    elif p.is_file():
      paths.append((p, Path(p.name)))
    else:
      raise DataError(p, "no such file or folder")
  if not paths:
    raise DataError(", ".join(map(str, inputs)), "no input images found")
  return paths


def predict(run_dir, task_name: str, inputs, out_dir, batch_size: int = 8) -> dict:
  """One task on image files / folders; returns {image path as given: mask file or JSON record fields}."""
  task = registry.get(task_name)
  config = load_config(run_dir)
  found = [m for m in run_models(run_dir) if task.name in m[1]]
  if not found:
    raise M2DinoError(f"{run_dir}: no model of this run was trained on task '{task.name}'")
  model = Model(config, *found[0])
  paths = list_inputs(inputs)
  images = [imageio.read_image(p) for p, _ in paths]
  sub = challenge.Submission(out_dir)
  results = {}
  for (p, rel), img, pred in zip(paths, images, model.predict(task, images, batch_size)):
    mask_rel = (Path("masks") / task.name / rel).with_suffix(".png").as_posix()
    mask = sub.add(task, str(p), pred, img.shape[:2], mask_rel)
    results[str(p)] = str(mask) if mask is not None else sub.entries[task.type][-1]
  sub.save()
  return results
