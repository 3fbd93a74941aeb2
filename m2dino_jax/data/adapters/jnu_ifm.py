"""JNU-IFM intrapartum ultrasound (Lu et al. 2022, figshare 14371652), as released.

Layout: one folder per video with `image/*.png`, `mask/<frame>_mask.png` and `framelabel.csv`
(frame, label: 3 none, 4 symphysis only, 5 head only, 6 both). Mask values 7 (pubic symphysis) and
8 (fetal head) become classes 1 and 2 of head_symphysis_multi, matching PSFHS; 0 stays background.
The frame label is kept in extra['frame_label']. A stable hash of the video name puts 20% of the
videos in 'val' [D], so frames of one video never straddle splits.
"""

from __future__ import annotations

import csv
from pathlib import Path

from m2dino_jax.data import imageio, records
from m2dino_jax.data.adapters import base
from m2dino_jax.errors import DataError

SPLITS = ("train", "val")
TASK = "head_symphysis_multi"
MASK_VALUES = {0: 0, 7: 1, 8: 2}


def frame_labels(path: Path) -> dict[str, int]:
  """framelabel.csv -> {frame stem: label}; a header row, if any, is skipped."""
  if not path.is_file():
    return {}
  out = {}
  with open(path, newline="", encoding="utf-8-sig") as f:
    for line, row in enumerate(csv.reader(f), start=1):
      cells = [c.strip() for c in row if c.strip()]
      if len(cells) < 2:
        continue
      try:
        out[Path(cells[0]).stem] = int(float(cells[-1]))
      except ValueError:
        if line > 1:
          raise DataError(path, f"frame label '{cells[-1]}' is not a number", row=line) from None
  return out


def video_dirs(root: Path) -> list[Path]:
  """Every folder under root holding image/ and mask/ (the video folders), sorted."""
  root = base.require_dir(root, "JNU-IFM")
  return sorted(p.parent for p in root.rglob("image") if p.is_dir() and (p.parent / "mask").is_dir())


def _load(img_path: Path, mask_path: Path, split: str, video: str, frame_label: int):
  image = imageio.read_image(img_path)
  mask = base.remap_mask(imageio.read_mask(mask_path), MASK_VALUES, mask_path)
  return records.Record(image=image, task=TASK, mask=mask, source=str(mask_path),
                        extra={"split": split, "image_path": str(img_path), "video": video,
                               "frame_label": frame_label})


def items(root, split: str):
  videos = video_dirs(Path(root))
  if not videos:
    raise DataError(root, "no video folders with image/ and mask/ found")
  for vdir in videos:
    video = str(vdir.relative_to(root)) if vdir != Path(root) else vdir.name
    actual = base.hashed_split(video)
    if not base.in_split(split, actual):
      continue
    labels = frame_labels(vdir / "framelabel.csv")
    for img_path in sorted((vdir / "image").glob("*.png")):
      mask_path = vdir / "mask" / f"{img_path.stem}_mask.png"
      if not mask_path.is_file():
        yield base.failing(mask_path, f"mask for frame {img_path.name} not found")
        continue
      label = labels.get(img_path.stem, -1)
      yield base.Item(str(mask_path), None, lambda i=img_path, m=mask_path, a=actual, v=video, f=label: _load(
          i, m, a, v, f))


def read(root, split: str = "train", *, skip_bad: bool = False, skipped_log=None):
  """Yields JNU-IFM head_symphysis_multi records."""
  base.check_split(split, SPLITS, "jnu_ifm")
  return base.read_items(items(root, split), skip_bad=skip_bad, skipped_log=skipped_log)
