"""The evaluation datasets and the paper's suite on one frozen encoder.

Datasets (a registry: name -> task and splits). The simulator's tasks stand in by default; the real layouts
are read by the existing adapters:
  synthetic     any simulator task (default fetal_plane_cls / head_symphysis_multi), splits train / val / test
  fetal_planes  FETAL_PLANES_DB, fetal_plane_cls (6 planes), official train / test (validation: 20 % of train)
  jnu_ifm       JNU-IFM, head_symphysis_multi (bg / SP / Head), train / val (the adapter's hashed split)
  fass          FASS, fetal_abdomen_multi, train / val
`classification` runs k-NN and the linear probe, `segmentation` the few-shot protocol, `ssl` both (the
paper's Table: k-NN / linear macro F1 on Fetal Planes, few-shot mDice on JNU-IFM / FASS), optionally next to
the same evaluation of a randomly initialised encoder of the same architecture.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from m2dino_jax.data import pipeline
from m2dino_jax.errors import ConfigError
from m2dino_jax.evals import fewshot, frozen, probe
from m2dino_jax.tasks import registry


@dataclasses.dataclass(frozen=True)
class Dataset:
  kind: str  # pipeline source kind: 'synthetic' | 'folder'
  adapter: str  # folder adapter name
  cls_task: str  # default classification task ('' = none)
  seg_task: str  # default segmentation task ('' = none)
  train: str
  val: str | None  # None: hold out 20 % of train for the probe's C
  test: str


DATASETS = {
    "synthetic": Dataset("synthetic", "", "fetal_plane_cls", "head_symphysis_multi", "train", "val", "test"),
    "fetal_planes": Dataset("folder", "fetal_planes", "fetal_plane_cls", "", "train", None, "test"),
    "jnu_ifm": Dataset("folder", "jnu_ifm", "", "head_symphysis_multi", "train", None, "val"),
    "fass": Dataset("folder", "fass", "", "fetal_abdomen_multi", "train", None, "val"),
}


def dataset(name: str) -> Dataset:
  if name not in DATASETS:
    raise ConfigError("dataset", f"unknown evaluation dataset '{name}'; known: {', '.join(DATASETS)}")
  return DATASETS[name]


def data_config(name: str, *, root: str = "", image_size: int = 224, channels: int = 1, batch_size: int = 32,
                synthetic_count: int = 96, synthetic_size: int = 256):
  """The pipeline's data section for an evaluation dataset (eval transforms: letterbox + normalise)."""
  ds = dataset(name)
  if ds.kind == "folder" and not root:
    raise ConfigError("root", f"dataset '{name}' needs --root (the dataset folder as released)")
  c = pipeline.default_data_config()
  c.source.kind, c.source.adapter, c.source.root = ds.kind, ds.adapter or c.source.adapter, root
  c.source.synthetic_count, c.source.synthetic_size = int(synthetic_count), int(synthetic_size)
  c.image_size, c.channels, c.eval_batch_size = int(image_size), int(channels), int(batch_size)
  return c


def task_of(ds: Dataset, task: str, kind: str) -> registry.Task:
  name = task or (ds.cls_task if kind == registry.CLASSIFICATION else ds.seg_task)
  if not name:
    raise ConfigError("task", f"this dataset has no {kind} task")
  t = registry.get(name)
  if t.type != kind:
    raise ConfigError("task", f"'{name}' is a {t.type} task, {kind} needed")
  return t


def classification(encoder, name: str, data_cfg, *, task: str = "", ks=(10, 20), cs=probe.DEFAULT_CS,
                   seed: int = 0) -> dict:
  """k-NN and linear probe macro F1 (and the other classification scores) of a frozen encoder."""
  ds = dataset(name)
  t = task_of(ds, task, registry.CLASSIFICATION)
  train = frozen.extract(encoder, data_cfg, t, ds.train)
  test = frozen.extract(encoder, data_cfg, t, ds.test)
  val = frozen.extract(encoder, data_cfg, t, ds.val) if ds.val else None
  knn_x = train.pooled if val is None else np.concatenate([train.pooled, val.pooled])
  knn_y = train.labels if val is None else np.concatenate([train.labels, val.labels])
  out = {"task": t.name, "train": len(train.labels), "val": 0 if val is None else len(val.labels),
         "test": len(test.labels), "features": "cls+avgpool"}
  out["knn"] = probe.knn_eval(knn_x, knn_y, test.pooled, test.labels, t.num_classes, ks)
  out["linear"] = probe.linear_eval(train.pooled, train.labels, test.pooled, test.labels, t.num_classes, cs=cs,
                                    val_x=None if val is None else val.pooled,
                                    val_y=None if val is None else val.labels, seed=seed)
  return out


def segmentation(encoder, name: str, data_cfg, *, task: str = "", **kwargs) -> dict:
  """Few-shot segmentation (fewshot.evaluate) on the dataset's train / test splits."""
  ds = dataset(name)
  t = task_of(ds, task, registry.SEGMENTATION)
  return fewshot.evaluate(encoder, data_cfg, t, train_split=ds.train, test_split=ds.test, **kwargs)


def headline(result: dict) -> dict:
  """The paper's numbers of a suite result: k-NN / linear macro F1, few-shot mDice / mfDice (mean, std)."""
  out = {}
  c = result.get("classification", {})
  if "knn" in c:
    best_k = max(c["knn"], key=lambda k: c["knn"][k]["f1_macro"])
    out.update(knn_f1_macro=c["knn"][best_k]["f1_macro"], knn_k=best_k)
  if "linear" in c:
    out.update(linear_f1_macro=c["linear"]["f1_macro"], linear_accuracy=c["linear"]["accuracy"])
  if "segmentation" in result:
    s = result["segmentation"]
    out.update(mDice=s["mDice"], mDice_std=s["mDice_std"], mfDice=s["mfDice"], mfDice_std=s["mfDice_std"],
               dice=s["dice"])
  return out
