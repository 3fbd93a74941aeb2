"""CAMUS echocardiography (Leclerc et al. 2019), NIfTI release.

Layout: `database_nifti/patientXXXX/patientXXXX_{2CH,4CH}_{ED,ES}.nii.gz` with `..._gt.nii.gz`
masks (0 background, 1 LV endocardium, 2 myocardium, 3 left atrium) -> cardiac_multi. The
`_half_sequence` cine files are not labelled and are not read. NIfTI's first axis is x (the
image column), so arrays are transposed to [row, column]; the voxel size gives spacing_mm.
Split: the official `database_split/subgroup_{training,validation,testing}.txt` lists when present,
otherwise a stable hash of the patient id (10% test, 10% val) [D].
"""

from __future__ import annotations

import re
from pathlib import Path

from m2dino_jax.data import imageio, records
from m2dino_jax.data.adapters import base
from m2dino_jax.errors import DataError

SPLITS = ("train", "val", "test")
TASK = "cardiac_multi"
LIST_FILES = {"train": "subgroup_training.txt", "val": "subgroup_validation.txt",
              "test": "subgroup_testing.txt"}
_IMAGE = re.compile(r"^(patient\d+)_(2CH|4CH)_(ED|ES)\.nii(\.gz)?$")


def _official_split(root: Path) -> dict[str, str] | None:
  """patient -> split from the official lists, or None when the release has none."""
  folder = next((d for d in (root / "database_split", root.parent / "database_split") if d.is_dir()), None)
  if folder is None:
    return None
  out = {}
  for split, name in LIST_FILES.items():
    path = folder / name
    if path.is_file():
      for patient in path.read_text().split():
        out[patient.strip()] = split
  return out or None


def _load(img_path: Path, gt_path: Path, split: str, patient: str, view: str, phase: str):
  image, spacing = imageio.nifti_2d(img_path)
  mask, _ = imageio.nifti_2d(gt_path)
  return records.Record(image=imageio.to_uint8(image), task=TASK, mask=mask.astype(int),
                        spacing_mm=spacing, source=str(gt_path),
                        extra={"split": split, "image_path": str(img_path), "patient": patient,
                               "view": view, "phase": phase})


def items(root, split: str):
  root = base.find_root(root, "database_nifti")
  official = _official_split(root)
  patients = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("patient"))
  if not patients:
    raise DataError(root, "no patientXXXX folders found")
  for pdir in patients:
    actual = official.get(pdir.name) if official else base.hashed_split(pdir.name, 10, 10)
    if actual is None or not base.in_split(split, actual):
      continue
    for path in sorted(pdir.iterdir()):
      m = _IMAGE.match(path.name)
      if not m:
        continue
      gt = path.with_name(f"{m.group(1)}_{m.group(2)}_{m.group(3)}_gt.nii{m.group(4) or ''}")
      if not gt.is_file():
        yield base.failing(gt, "ground-truth mask file not found")
        continue
      yield base.Item(str(gt), None, lambda p=path, g=gt, a=actual, m=m: _load(p, g, a, *m.groups()[:3]))


def read(root, split: str = "train", *, skip_bad: bool = False, skipped_log=None):
  """Yields CAMUS cardiac_multi records (ED and ES frames of both views)."""
  base.check_split(split, SPLITS, "camus")
  return base.read_items(items(root, split), skip_bad=skip_bad, skipped_log=skipped_log)
