"""HC18, fetal head circumference (van den Heuvel et al. 2018, Zenodo 1327317), as released.

Layout: `training_set/NNN_HC.png` with `NNN_HC_Annotation.png` (the head's ellipse drawn as a
one-pixel contour) and `training_set_pixel_size_and_HC.csv` (filename, pixel size(mm),
head circumference (mm)). The contour is filled (scipy.ndimage.binary_fill_holes) into a
fetal_head mask; the pixel size becomes spacing_mm and the circumference extra['hc_mm'].
Only the training set has annotations; a stable hash of the file name puts 20% in 'val' [D].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from m2dino_jax.data import imageio, records
from m2dino_jax.data.adapters import base
from m2dino_jax.errors import DataError

SPLITS = ("train", "val")
CSV_NAME = "training_set_pixel_size_and_HC.csv"
TASK = "fetal_head"


def filled_ellipse(annotation: np.ndarray, source) -> np.ndarray:
  """The region inside a drawn contour, contour included; an open contour raises."""
  outline = annotation > 0
  if not outline.any():
    raise DataError(source, "annotation is empty (no contour drawn)")
  filled = ndimage.binary_fill_holes(outline)
  if filled.sum() == outline.sum():
    raise DataError(source, "annotation contour is not closed (nothing to fill)")
  return filled.astype(np.uint8)


def _column(header, *keys) -> str:
  for h in header:
    norm = h.lower().replace(" ", "")
    if all(k in norm for k in keys):
      return h
  return ""


def _load(root: Path, csv_path: Path, line: int, name: str, pixel_mm: str, hc_mm: str, split: str):
  img_path = root / "training_set" / name
  ann_path = img_path.with_name(img_path.stem + "_Annotation.png")
  try:
    image = imageio.read_image(img_path, mode="L")
    mask = filled_ellipse(imageio.read_mask(ann_path), ann_path)
    px = float(pixel_mm)
    hc = float(hc_mm) if hc_mm else float("nan")
  except DataError as e:
    raise DataError(csv_path, str(e), row=line) from None
  except ValueError:
    raise DataError(csv_path, f"pixel size '{pixel_mm}' or circumference '{hc_mm}' is not a number",
                    row=line) from None
  if not px > 0:
    raise DataError(csv_path, f"pixel size must be positive, got {px}", row=line)
  return records.Record(image=image, task=TASK, mask=mask, spacing_mm=(px, px), source=str(csv_path),
                        row=line, extra={"split": split, "image_path": str(img_path), "hc_mm": hc})


def items(root, split: str):
  root = Path(root)
  csv_path = root / CSV_NAME
  header, rows = base.read_csv_rows(csv_path)
  name_col, px_col, hc_col = _column(header, "filename"), _column(header, "pixel"), _column(header, "circum")
  if not rows:
    yield base.failing(csv_path, "empty CSV (no rows)")
    return
  if not name_col or not px_col:
    yield base.failing(csv_path, "needs columns 'filename' and 'pixel size(mm)'")
    return
  for line, row in rows:
    name = row.get(name_col) or ""
    if not base.in_split(split, base.hashed_split(name)):
      continue
    yield base.Item(str(csv_path), line, lambda line=line, name=name, row=row: _load(
        root, csv_path, line, name, row.get(px_col) or "", (row.get(hc_col) or "") if hc_col else "", split))


def read(root, split: str = "train", *, skip_bad: bool = False, skipped_log=None):
  """Yields HC18 fetal_head records with filled masks and pixel spacing."""
  base.check_split(split, SPLITS, "hc18")
  return base.read_items(items(root, split), skip_bad=skip_bad, skipped_log=skipped_log)
