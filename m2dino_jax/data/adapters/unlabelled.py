"""Unlabelled ultrasound for self-supervised pretraining: folders of PNG/JPG and DICOM files.

Every image file, and every frame of a DICOM file (multi-frame cine loops included), becomes a
Record with task ''. DICOM frames are cropped to the scanned area given by
SequenceOfUltrasoundRegions: the union of the 2D tissue regions (RegionSpatialFormat 1; the
region corners are inclusive pixel indices), which drops the scanner's text and graphics around
it. Their PhysicalDeltaX/Y (in cm when PhysicalUnits is 3) give spacing_mm. When the region tags
do not fit the stored frame (some files were resampled after the tags were written) the frame is
kept whole and without spacing, and extra['region'] says so.
A stable hash of the relative file path puts 5% in 'val' [D]; frames of one cine stay together.
"""

from __future__ import annotations

import logging
from pathlib import Path

from m2dino_jax.data import imageio, records
from m2dino_jax.data.adapters import base

SPLITS = ("train", "val")
VAL_PERCENT = 5
TISSUE_2D = 1  # RegionSpatialFormat: 2D (tissue or flow)
UNITS_CM = 3  # PhysicalUnitsX/YDirection
log = logging.getLogger(__name__)


def ultrasound_region(ds, height: int, width: int):
  """(crop box (x0, y0, x1, y1) exclusive, (x, y) spacing in mm or None, status) from the region tags."""
  regions = [r for r in ds.get("SequenceOfUltrasoundRegions", [])
             if int(r.get("RegionSpatialFormat", 0)) == TISSUE_2D]
  if not regions:
    return None, None, "none"
  x0 = min(int(r.RegionLocationMinX0) for r in regions)
  y0 = min(int(r.RegionLocationMinY0) for r in regions)
  x1 = max(int(r.RegionLocationMaxX1) for r in regions) + 1
  y1 = max(int(r.RegionLocationMaxY1) for r in regions) + 1
  if x0 < 0 or y0 < 0 or x1 > width or y1 > height or x1 <= x0 or y1 <= y0:
    return None, None, "outside_frame"
  first = regions[0]
  spacing = None
  if int(first.get("PhysicalUnitsXDirection", 0)) == UNITS_CM and \
      int(first.get("PhysicalUnitsYDirection", 0)) == UNITS_CM:
    dx, dy = float(first.PhysicalDeltaX) * 10.0, float(first.PhysicalDeltaY) * 10.0
    spacing = (dx, dy) if dx > 0 and dy > 0 else None
  return (x0, y0, x1, y1), spacing, "cropped"


def _dicom_records(path: Path, split: str):
  ds = imageio.read_dicom_header(path)
  rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
  box, spacing, status = ultrasound_region(ds, rows, cols)
  if status == "outside_frame":
    log.warning("%s: ultrasound region tags lie outside the %dx%d frame; frames kept whole", path, cols, rows)
  for i, frame in enumerate(imageio.iter_dicom_frames(path, ds)):
    if box is not None:
      frame = frame[box[1]:box[3], box[0]:box[2]]
    yield records.Record(image=frame, task="", spacing_mm=spacing, source=str(path),
                         extra={"split": split, "frame": i, "region": status,
                                "crop": list(box) if box else None})


def _image_record(path: Path, split: str):
  return records.Record(image=imageio.read_image(path), task="", source=str(path),
                        extra={"split": split, "frame": 0})


def items(root, split: str):
  root = base.require_dir(root, "unlabelled images")
  for path in sorted(p for p in root.rglob("*") if p.is_file()):
    suffix = path.suffix.lower()
    if suffix in imageio.IMAGE_SUFFIXES:
      load = _image_record
    elif imageio.is_dicom(path):
      load = _dicom_records
    else:
      continue
    actual = base.hashed_split(str(path.relative_to(root)), VAL_PERCENT)
    if base.in_split(split, actual):
      yield base.Item(str(path), None, lambda p=path, a=actual, f=load: f(p, a))


def read(root, split: str = "train", *, skip_bad: bool = False, skipped_log=None):
  """Yields unlabelled frames (task '') from every image and DICOM file under `root`."""
  base.check_split(split, SPLITS, "unlabelled")
  return base.read_items(items(root, split), skip_bad=skip_bad, skipped_log=skipped_log)
