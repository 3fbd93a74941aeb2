"""FETAL_PLANES_DB (Burgos-Artizzu et al. 2020, Zenodo 3904280), as released.

Layout: `FETAL_PLANES_DB_data.csv` (semicolon separated: Image_name; Patient_num; Plane; Brain_plane;
Operator; US_Machine; Train) and `Images/<Image_name>.png`. Plane -> fetal_plane_cls (6 classes, in
this order): Fetal abdomen, Fetal brain, Fetal femur, Fetal thorax, Maternal cervix, Other.
Train = 1 / 0 is the official train / test split.
"""

from __future__ import annotations

from pathlib import Path

from m2dino_jax.data import imageio, records
from m2dino_jax.data.adapters import base
from m2dino_jax.errors import DataError

SPLITS = ("train", "test")
TASK = "fetal_plane_cls"
PLANES = ("Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax", "Maternal cervix", "Other")
CSV_NAME = "FETAL_PLANES_DB_data.csv"
COLUMNS = ("Image_name", "Plane", "Train")
_PLANE_INDEX = {p.lower(): i for i, p in enumerate(PLANES)}


def _load(root: Path, csv_path: Path, line: int, row: dict, split: str):
  name = row["Image_name"]
  img_path = root / "Images" / (name if name.lower().endswith(".png") else f"{name}.png")
  label = _PLANE_INDEX.get((row.get("Plane") or "").strip().lower())
  if label is None:
    raise DataError(csv_path, f"unknown plane '{row.get('Plane')}'; expected one of {', '.join(PLANES)}",
                    row=line)
  try:
    image = imageio.read_image(img_path)
  except DataError as e:
    raise DataError(csv_path, f"image {e}", row=line) from None
  return records.Record(image=image, task=TASK, label=label, source=str(csv_path), row=line,
                        extra={"split": split, "image_path": str(img_path),
                               "patient": row.get("Patient_num") or "",
                               "brain_plane": row.get("Brain_plane") or ""})


def items(root, split: str):
  root = Path(root)
  csv_path = root / CSV_NAME
  header, rows = base.read_csv_rows(csv_path, delimiter=";")
  missing = [c for c in COLUMNS if c not in header]
  if not rows:
    yield base.failing(csv_path, "empty CSV (no rows)")
    return
  if missing:
    yield base.failing(csv_path, f"missing column(s) {', '.join(missing)} (is it ';' separated?)")
    return
  for line, row in rows:
    flag = row.get("Train")
    if flag not in ("0", "1"):
      yield base.failing(csv_path, f"Train must be 0 or 1, got '{flag}'", row=line)
      continue
    actual = "train" if flag == "1" else "test"
    if base.in_split(split, actual):
      yield base.Item(str(csv_path), line, lambda line=line, row=row, a=actual: _load(root, csv_path, line,
                                                                                      row, a))


def read(root, split: str = "train", *, skip_bad: bool = False, skipped_log=None):
  """Yields fetal_plane_cls records of the official 'train' or 'test' split."""
  base.check_split(split, SPLITS, "fetal_planes")
  return base.read_items(items(root, split), skip_bad=skip_bad, skipped_log=skipped_log)
