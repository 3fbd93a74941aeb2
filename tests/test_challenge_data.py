"""FMC_UIA in the exact official CSV form: all columns in every row (empty where pandas writes NaN),
capital-R `Regression`, JSON point strings, float-formatted labels, `num_classes` = 1 for detection."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2dino_jax.data import sonosynth
from m2dino_jax.data.adapters import fmc_uia
from m2dino_jax.errors import DataError
from m2dino_jax.tasks import registry

# the column order of the released CSVs
OFFICIAL_COLUMNS = ["image_path", "mask_path", "mask", "task_id", "num_classes", "task_name", "point_1_xy",
                    "point_2_xy", "point_3_xy", "x_min", "y_min", "x_max", "y_max"]
CSV_NAME = {"segmentation": "segmentation", "classification": "classification", "detection": "detection",
            "regression": "Regression"}
FOLDER = {"classification": "Classification", "detection": "Detection", "regression": "Regression"}
SEG_FOLDER = {2: "Two", 3: "Three", 4: "Four", 5: "Five"}
OFFICIAL_NUM_CLASSES = {"fetal_head": 2, "breast_2cls": 2, "thyroid_nodule_det": 1, "fetal_femur": 2,
                        "IUGC": 3, "cardiac_multi": 4, "lung_disease_3cls": 3}


def write_official(data_root: Path, tasks, n: int, size: int = 48, seed: int = 5) -> dict:
  """`data_root/csv_files/<task>.csv` plus images / masks, written by hand in the official form.

  Returns {task: [(image_path as in the CSV, sonosynth record)]}.
  """
  csv_dir = data_root / "csv_files"
  csv_dir.mkdir(parents=True)
  out = {}
  for name in tasks:
    task = registry.get(name)
    rows, out[name] = [], []
    for i, rec in enumerate(sonosynth.generate(name, n, seed=seed, size=size)):
      row = dict.fromkeys(OFFICIAL_COLUMNS, "")
      sub = (f"Segmentation/{SEG_FOLDER[task.num_classes]}/{name}" if task.type == "segmentation"
             else f"{FOLDER[task.type]}/{name}")
      img_rel = f"../{sub}/images/{name}.case.{i:03d}.png"  # dots in the name on purpose
      path = csv_dir / img_rel
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rec.image).convert("RGB").save(path)
      row.update(image_path=img_rel, task_id=name, task_name=CSV_NAME[task.type],
                 num_classes=OFFICIAL_NUM_CLASSES[name])
      if task.type == "segmentation":
        row["mask_path"] = f"../{sub}/MASKS/{name}.case.{i:03d}.png"
        (csv_dir / row["mask_path"]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rec.mask.astype(np.uint8)).save(csv_dir / row["mask_path"])
      elif task.type == "classification":
        row["mask"] = f"{float(rec.label):.1f}"
      elif task.type == "detection":
        row.update({k: f"{v:.1f}" for k, v in zip(("x_min", "y_min", "x_max", "y_max"), np.round(rec.box, 1))})
      else:
        for k, (x, y) in enumerate(np.round(rec.points, 2).tolist()):
          row[f"point_{k + 1}_xy"] = json.dumps([x, y])
      rows.append(row)
      out[name].append((img_rel, rec))
    with open(csv_dir / f"{name}.csv", "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=OFFICIAL_COLUMNS)
      w.writeheader()
      w.writerows(rows)
  return out


def test_detection_has_one_class_as_the_official_table():
  assert [t.num_classes for t in registry.by_type("detection")] == [1, 1, 1]
  for name, c in OFFICIAL_NUM_CLASSES.items():
    t = registry.get(name)
    assert (t.num_points if t.type == "regression" else t.num_classes) == c


@pytest.mark.parametrize("task", ["fetal_head", "breast_2cls", "thyroid_nodule_det", "IUGC"])
def test_official_csv_form_reads(tmp_path, task):
  written = write_official(tmp_path, [task], n=3)[task]
  recs = list(fmc_uia.read_folder(fmc_uia.csv_folder(tmp_path)))
  assert len(recs) == 3
  for rec, (rel, want) in zip(recs, written):
    assert rec.task == task and rec.extra["csv_image_path"] == rel
    assert rec.image.shape[:2] == want.image.shape[:2]
    if task == "fetal_head":
      np.testing.assert_array_equal(rec.mask, want.mask)
      assert rec.extra["csv_mask_path"] == rel.replace("images", "MASKS")
    elif task == "breast_2cls":
      assert rec.label == want.label
    elif task == "thyroid_nodule_det":
      np.testing.assert_allclose(rec.box, np.round(want.box, 1), atol=1e-5)
    else:
      np.testing.assert_allclose(rec.points, np.round(want.points, 2), atol=1e-4)
  # the inference listing gives the CSV's verbatim paths, without reading targets
  rows = fmc_uia.rows(fmc_uia.csv_folder(tmp_path))
  assert [r.image_path for r in rows] == [rel for rel, _ in written]
  assert all(r.image_file.is_file() and ".." not in r.image_file.parts for r in rows)


def test_detection_num_classes_zero_is_refused(tmp_path):
  write_official(tmp_path, ["thyroid_nodule_det"], n=1)
  f = tmp_path / "csv_files" / "thyroid_nodule_det.csv"
  f.write_text(f.read_text().replace(",1,detection,", ",0,detection,"))
  with pytest.raises(DataError, match=r"num_classes 0 does not match task 'thyroid_nodule_det' \(1\)"):
    list(fmc_uia.read_folder(f.parent))
