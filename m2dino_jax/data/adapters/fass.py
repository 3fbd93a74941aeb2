"""FASS, fetal abdominal structures segmentation (Mendeley Data), images with class-id annotations.

The original layout is not documented where we could read it, so the adapter reads the plain
form [L]: `images/<name>.png` with `annotations/<name>.png` (folder names matched case-insensitively;
`masks/` also accepted), annotation value = class id: 0 background, 1 aorta, 2 liver, 3 stomach,
4 umbilical vein -> fetal_abdomen_multi. A stable hash of the file name puts 20% in 'val' [D].
"""

from __future__ import annotations

from pathlib import Path

from m2dino_jax.data import imageio, records
from m2dino_jax.data.adapters import base
from m2dino_jax.errors import DataError

SPLITS = ("train", "val")
TASK = "fetal_abdomen_multi"
CLASSES = ("background", "aorta", "liver", "stomach", "umbilical_vein")
IMAGE_DIRS = ("images",)
ANNOTATION_DIRS = ("annotations", "masks")


def _subdir(root: Path, names) -> Path:
  for d in sorted(root.iterdir()):
    if d.is_dir() and d.name.lower() in names:
      return d
  raise DataError(root, f"no {' or '.join(names)} folder found")


def _load(img_path: Path, ann_path: Path, split: str):
  image = imageio.read_image(img_path)
  mask = base.remap_mask(imageio.read_mask(ann_path), {i: i for i in range(len(CLASSES))}, ann_path,
                         "annotation")
  return records.Record(image=image, task=TASK, mask=mask, source=str(ann_path),
                        extra={"split": split, "image_path": str(img_path)})


def items(root, split: str):
  root = base.require_dir(root, "FASS")
  img_dir, ann_dir = _subdir(root, IMAGE_DIRS), _subdir(root, ANNOTATION_DIRS)
  for img_path in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in imageio.IMAGE_SUFFIXES):
    actual = base.hashed_split(img_path.stem)
    if not base.in_split(split, actual):
      continue
    ann_path = ann_dir / f"{img_path.stem}.png"
    if not ann_path.is_file():
      yield base.failing(ann_path, f"annotation for {img_path.name} not found")
      continue
    yield base.Item(str(ann_path), None, lambda i=img_path, a=ann_path, s=actual: _load(i, a, s))


def read(root, split: str = "train", *, skip_bad: bool = False, skipped_log=None):
  """Yields FASS fetal_abdomen_multi records."""
  base.check_split(split, SPLITS, "fass")
  return base.read_items(items(root, split), skip_bad=skip_bad, skipped_log=skipped_log)
