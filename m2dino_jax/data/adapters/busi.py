"""BUSI, Breast Ultrasound Images (Al-Dhabyani et al. 2020), as released on Kaggle.

Layout: `Dataset_BUSI_with_GT/{benign,malignant,normal}/benign (1).png` with `benign (1)_mask.png`
and, for images with several lesions, extra `benign (1)_mask_1.png`, ... which are ORed together.
Masks are 0/255 and become 0/1.

Each image gives up to three records:
  breast_lesion (segmentation, 2 classes): every image, normal ones with an empty mask;
  breast_3cls: benign 0, malignant 1, normal 2 (the folders in alphabetical order);
  breast_2cls: benign 0, malignant 1 (normal images have no label here and are left out).
BUSI has no official split: a stable hash of the file name puts 20% in 'val' [D].
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from m2dino_jax.data import imageio, records
from m2dino_jax.data.adapters import base
from m2dino_jax.errors import DataError

SPLITS = ("train", "val")
CLASSES = ("benign", "malignant", "normal")  # breast_3cls labels 0, 1, 2
TASKS = ("breast_lesion", "breast_3cls", "breast_2cls")


def _load(img_path: Path, cls: str, mask_paths: list[Path], split: str, tasks) -> list[records.Record]:
  image = imageio.read_image(img_path)
  if not mask_paths:
    raise DataError(img_path, f"no mask file '{img_path.stem}_mask.png' next to the image")
  mask = np.zeros(image.shape[:2], np.uint8)
  for mp in mask_paths:
    m = imageio.read_mask(mp)
    if m.shape != mask.shape:
      raise DataError(mp, f"mask size {m.shape} differs from image size {mask.shape}")
    mask |= base.remap_mask(m, {0: 0, 255: 1, 1: 1}, mp)
  extra = {"split": split, "class": cls, "mask_paths": [str(p) for p in mask_paths]}
  out = []
  for task in tasks:
    rec = records.Record(image=image, task=task, source=str(img_path), extra=dict(extra))
    if task == "breast_lesion":
      rec.mask = mask
    elif task == "breast_3cls":
      rec.label = CLASSES.index(cls)
    elif task == "breast_2cls":
      if cls == "normal":
        continue
      rec.label = CLASSES.index(cls)
    out.append(rec)
  return out


def items(root, split: str, tasks=TASKS):
  root = base.find_root(root, "Dataset_BUSI_with_GT")
  found = False
  for cls in CLASSES:
    folder = root / cls
    if not folder.is_dir():
      continue
    found = True
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    for name in names:
      path = folder / name
      if "_mask" in path.stem or path.suffix.lower() not in imageio.IMAGE_SUFFIXES:
        continue
      if not base.in_split(split, base.hashed_split(f"{cls}/{path.stem}")):
        continue
      pattern = re.compile(rf"^{re.escape(path.stem)}_mask(_\d+)?\.png$")
      masks = [folder / n for n in names if pattern.match(n)]
      yield base.Item(str(path), None, lambda p=path, c=cls, m=masks: _load(p, c, m, split, tasks))
  if not found:
    raise DataError(root, f"no class folders ({', '.join(CLASSES)}) found")


def read(root, split: str = "train", *, skip_bad: bool = False, skipped_log=None, tasks=TASKS):
  """Yields BUSI records for `tasks` (default: segmentation, 3-class and 2-class)."""
  base.check_split(split, SPLITS, "busi")
  return base.read_items(items(root, split, tasks), skip_bad=skip_bad, skipped_log=skipped_log)
