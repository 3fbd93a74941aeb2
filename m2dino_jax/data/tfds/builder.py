"""TFDS builder that turns any adapter's records into ArrayRecord files, without TensorFlow.

One builder, `m2dino_ultrasound`, with one config per adapter (`m2dino_ultrasound/fmc_uia`, ...).
It reads the dataset as released from the manual directory (nothing is downloaded) and writes one
ArrayRecord split per adapter split. Every feature is a plain tensor, scalar or text, so neither
writing nor reading needs TensorFlow:

  image  uint8 [H, W, C] (C = 1 grey or 3 RGB), zlib      task, task_type, source  text
  label  int64 (-1 = none)     mask uint8 [H, W] ([0, 0] = none), zlib      row  int64 (-1 = none)
  box    float32 [4] (NaN = none)     points float32 [K, 2] (K = 0: none)
  spacing_mm text (JSON [x, y]; '' = unknown: exact, where a float tensor would round to float32)
  extra  text (JSON of Record.extra)

Examples keep the adapter's order (shuffling is the pipeline's job), so a build is reproducible.
"""

from __future__ import annotations

import json

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import features as tfds_features

from m2dino_jax.data import adapters, records
from m2dino_jax.data.adapters import base

VERSION = "1.0.0"
NO_BOX = np.full(4, np.nan, np.float32)


def features() -> tfds_features.FeaturesDict:
  zlib = tfds_features.Encoding.ZLIB
  return tfds_features.FeaturesDict({
      "image": tfds_features.Tensor(shape=(None, None, None), dtype=np.uint8, encoding=zlib),
      "task": tfds_features.Text(),
      "task_type": tfds_features.Text(),
      "label": tfds_features.Scalar(dtype=np.int64),
      "mask": tfds_features.Tensor(shape=(None, None), dtype=np.uint8, encoding=zlib),
      "box": tfds_features.Tensor(shape=(4,), dtype=np.float32),
      "points": tfds_features.Tensor(shape=(None, 2), dtype=np.float32),
      "spacing_mm": tfds_features.Text(),
      "source": tfds_features.Text(),
      "row": tfds_features.Scalar(dtype=np.int64),
      "extra": tfds_features.Text(),
  })


def encode(rec: records.Record) -> dict:
  """A validated Record to the builder's feature dict."""
  image = rec.image if rec.image.ndim == 3 else rec.image[..., None]
  return {
      "image": np.ascontiguousarray(image, np.uint8),
      "task": rec.task,
      "task_type": rec.task_type,
      "label": int(rec.label),
      "mask": np.zeros((0, 0), np.uint8) if rec.mask is None else np.asarray(rec.mask, np.uint8),
      "box": NO_BOX if rec.box is None else np.asarray(rec.box, np.float32),
      "points": np.zeros((0, 2), np.float32) if rec.points is None else np.asarray(rec.points, np.float32),
      "spacing_mm": "" if rec.spacing_mm is None else json.dumps([float(v) for v in rec.spacing_mm]),
      "source": rec.source,
      "row": -1 if rec.row is None else int(rec.row),
      "extra": json.dumps(rec.extra, sort_keys=True, default=str),
  }


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


def decode(example: dict) -> dict:
  """A stored example back to the Record's fields (a dict `records.Record(**d)` accepts)."""
  image = np.asarray(example["image"])
  mask = np.asarray(example["mask"])
  box = np.asarray(example["box"], np.float32)
  points = np.asarray(example["points"], np.float32).reshape(-1, 2)
  spacing = _text(example["spacing_mm"])
  row = int(example["row"])
  return {
      "image": image[..., 0] if image.shape[-1] == 1 else image,
      "task": _text(example["task"]),
      "task_type": _text(example["task_type"]),
      "label": int(example["label"]),
      "mask": mask if mask.size else None,
      "box": None if np.isnan(box).any() else box,
      "points": points if points.size else None,
      "spacing_mm": tuple(json.loads(spacing)) if spacing else None,
      "source": _text(example["source"]),
      "row": None if row < 0 else row,
      "extra": json.loads(_text(example["extra"]) or "{}"),
  }


class M2dinoUltrasound(tfds.core.GeneratorBasedBuilder):
  """Ultrasound datasets as released, converted by the project's adapters (one config per adapter)."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=f"m2dino_jax adapter '{name}'")
                     for name in adapters.NAMES]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Download the dataset yourself and pass the folder in its released "
                                  "layout as --manual-dir (see m2dino_jax/data/adapters/<name>.py).")
  # Set by `build` before download_and_prepare (builders take no free-form arguments).
  skip_bad: bool = False
  skipped: list | None = None
  nonempty_splits: tuple[str, ...] | None = None
  task_index: dict[str, list[str]] | None = None  # filled while generating: split -> task per example

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=features(), disable_shuffling=True,
                                 description="Ultrasound records read by m2dino_jax adapters.")

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    splits = self.nonempty_splits or adapters.splits(self.builder_config.name)
    return {split: self._generate_examples(root, split) for split in splits}

  def _generate_examples(self, root, split):
    mod = adapters.module(self.builder_config.name)
    skipped = self.skipped if self.skipped is not None else []
    recs = base.read_items(mod.items(root, split), skip_bad=self.skip_bad, skipped=skipped)
    before = len(skipped)
    tasks = self.task_index.setdefault(split, []) if self.task_index is not None else []
    for i, rec in enumerate(recs):
      tasks.append(rec.task)
      yield i, encode(rec)  # disable_shuffling: stored in this order, so tasks[i] is example i's
    for entry in skipped[before:]:
      entry.setdefault("split", split)
