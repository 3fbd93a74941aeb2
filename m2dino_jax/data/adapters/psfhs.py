"""PSFHS, pubic symphysis and fetal head (Chen et al. 2024, Zenodo 7851339), as released.

Layout: `image_mha/NNNNN.mha` (grey or 3-channel: a vector image, or three slices) with
`label_mha/NNNNN.mha` (0 background, 1 pubic symphysis, 2 fetal head) -> head_symphysis_multi.
Images whose three channels are equal become grey. The MHA spacing gives spacing_mm.
A stable hash of the file name puts 20% in 'val' [D].
"""

from __future__ import annotations

from pathlib import Path

from m2dino_jax.data import imageio, records
from m2dino_jax.data.adapters import base
from m2dino_jax.errors import DataError

SPLITS = ("train", "val")
TASK = "head_symphysis_multi"
LABELS = {0: 0, 1: 1, 2: 2}


def _load(img_path: Path, label_path: Path, split: str):
  image, spacing = imageio.read_mha(img_path)
  if image.ndim == 3 and image.shape[2] not in (1, 3):
    raise DataError(img_path, f"expected 1 or 3 channels, got image of shape {image.shape}")
  label, _ = imageio.read_mha(label_path)
  if label.ndim != 2:
    raise DataError(label_path, f"label must be a 2D class map, got shape {label.shape}")
  return records.Record(image=imageio.grey_or_rgb(imageio.to_uint8(image)), task=TASK,
                        mask=base.remap_mask(label.astype(int), LABELS, label_path), spacing_mm=spacing,
                        source=str(label_path), extra={"split": split, "image_path": str(img_path)})


def items(root, split: str):
  root = Path(root)
  img_dir = base.require_dir(root / "image_mha", "PSFHS image_mha")
  label_dir = base.require_dir(root / "label_mha", "PSFHS label_mha")
  for img_path in sorted(img_dir.glob("*.mha")):
    actual = base.hashed_split(img_path.stem)
    if not base.in_split(split, actual):
      continue
    label_path = label_dir / img_path.name
    if not label_path.is_file():
      yield base.failing(label_path, f"label for {img_path.name} not found")
      continue
    yield base.Item(str(label_path), None, lambda i=img_path, lp=label_path, a=actual: _load(i, lp, a))


def read(root, split: str = "train", *, skip_bad: bool = False, skipped_log=None):
  """Yields PSFHS head_symphysis_multi records."""
  base.check_split(split, SPLITS, "psfhs")
  return base.read_items(items(root, split), skip_bad=skip_bad, skipped_log=skipped_log)
