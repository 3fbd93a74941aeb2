"""Bad input: each case raises a DataError naming the file (and CSV row), and skip_bad lists what it
skipped and why instead of failing or dropping records silently."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

from m2dino_jax.data import adapters, imageio
from m2dino_jax.errors import DataError
from tests.test_adapters import FMC_COLUMNS, save_png, write_fmc


def _csv(tmp_path, task):
  return tmp_path / "data" / "train" / "csv_files" / f"{task}.csv"


def _rewrite(path, edit):
  """Applies `edit(rows)` to a CSV's rows (list of dicts) and writes it back."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  edit(rows)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=FMC_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)


def _image_of(tmp_path, task, row=0, key="image_path"):
  with open(_csv(tmp_path, task), newline="") as f:
    rel = list(csv.DictReader(f))[row][key]
  return Path(os.path.normpath(_csv(tmp_path, task).parent / rel))


def _fails(root, pattern, csv_task=None, line=2):
  """Reading the train split raises a DataError matching `pattern` that names the CSV and line."""
  with pytest.raises(DataError) as info:
    list(adapters.get("fmc_uia")(root, "train"))
  msg = str(info.value)
  assert re.search(pattern, msg), msg
  if csv_task is not None:
    assert msg.startswith(f"{_csv(root, csv_task)} row {line}:"), msg
  return msg


@pytest.fixture
def fmc(tmp_path):
  write_fmc(tmp_path)
  return tmp_path


def test_truncated_image(fmc):
  img = _image_of(fmc, "fetal_head", row=1)
  img.write_bytes(img.read_bytes()[:60])
  msg = _fails(fmc, "corrupt or truncated image", "fetal_head", line=3)
  assert str(img) in msg


def test_garbage_image(fmc):
  img = _image_of(fmc, "breast_3cls")
  img.write_bytes(b"this is not a png")
  assert str(img) in _fails(fmc, "corrupt or truncated image", "breast_3cls")


def test_mask_size_differs(fmc):
  save_png(_image_of(fmc, "cardiac_multi", key="mask_path"), np.zeros((30, 32)))
  _fails(fmc, r"mask size \(30, 32\) differs from image size \(32, 32\)", "cardiac_multi")


def test_mask_value_outside_classes(fmc):
  mask = np.zeros((32, 32))
  mask[3, 4] = 2  # fetal_head has classes 0 and 1
  save_png(_image_of(fmc, "fetal_head", key="mask_path"), mask)
  _fails(fmc, "mask value 2 outside the 2 classes of task 'fetal_head'", "fetal_head")


def test_binary_mask_0_255_read_as_0_1(fmc):
  mask = np.zeros((32, 32), np.uint8)
  mask[4:9, 2:30] = 255
  save_png(_image_of(fmc, "fetal_head", key="mask_path"), mask)
  rec = next(r for r in adapters.get("fmc_uia")(fmc, "train") if r.task == "fetal_head")
  np.testing.assert_array_equal(rec.mask, mask // 255)
  mask[0, 0] = 128  # anything else stays an error
  save_png(_image_of(fmc, "fetal_head", key="mask_path"), mask)
  _fails(fmc, "mask value 255 outside the 2 classes", "fetal_head")


@pytest.mark.parametrize("box,pattern", [((1, 2, 40, 20), "outside the 32x32 image"),
                                         ((-1, 2, 10, 20), "outside the 32x32 image"),
                                         ((20, 2, 10, 20), "x_max < x_min")])
def test_bad_box(fmc, box, pattern):
  def edit(rows):
    rows[0].update(zip(("x_min", "y_min", "x_max", "y_max"), map(str, box)))
  _rewrite(_csv(fmc, "thyroid_nodule_det"), edit)
  _fails(fmc, pattern, "thyroid_nodule_det")


def test_missing_file_named_in_csv(fmc):
  _rewrite(_csv(fmc, "IUGC"), lambda rows: rows[1].update(image_path="../Regression/IUGC/gone.png"))
  msg = _fails(fmc, "file not found", "IUGC", line=3)
  assert "gone.png" in msg


@pytest.mark.parametrize("content", ["", ",".join(FMC_COLUMNS) + "\n"])
def test_empty_csv(fmc, content):
  _csv(fmc, "breast_3cls").write_text(content)
  msg = _fails(fmc, "empty CSV")
  assert msg.startswith(str(_csv(fmc, "breast_3cls")))


def test_unknown_task_id(fmc):
  _rewrite(_csv(fmc, "fetal_head"), lambda rows: rows[1].update(task_id="fetal_tail"))
  _fails(fmc, "unknown task id 'fetal_tail'", "fetal_head", line=3)


@pytest.mark.parametrize("task,column,value", [("fetal_head", "num_classes", "1e309"), ("breast_3cls", "mask", "inf"),
                                               ("breast_3cls", "mask", "1.5")])
def test_integer_columns_refuse_inf_and_fractions(fmc, task, column, value):
  """Found by the CSV fuzz test: an overflowing integer column raised OverflowError, not a DataError."""
  _rewrite(_csv(fmc, task), lambda rows: rows[0].update({column: value}))
  _fails(fmc, f"column '{column}' is not a whole number: '{value}'", task)


def test_task_type_mismatch_and_bad_points(fmc):
  _rewrite(_csv(fmc, "IUGC"), lambda rows: rows[0].update(point_2_xy="[3.0]"))
  _fails(fmc, r"'point_2_xy' is not a JSON \[x, y\] pair", "IUGC")
  _rewrite(_csv(fmc, "IUGC"), lambda rows: rows[0].update(point_2_xy="", task_name="detection"))
  _fails(fmc, "task_name 'detection' but task 'IUGC' is regression", "IUGC")


def _us_dicom(path, with_pixels: bool):
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = UltrasoundImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = pydicom.Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundImageStorage, meta.MediaStorageSOPInstanceUID
  ds.Modality = "US"
  ds.Rows, ds.Columns, ds.SamplesPerPixel = 8, 10, 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
  if with_pixels:
    ds.PixelData = np.arange(80, dtype=np.uint8).tobytes()
  ds.save_as(path, enforce_file_format=True)


def test_dicom_without_pixel_data(tmp_path):
  _us_dicom(tmp_path / "ok.dcm", True)
  _us_dicom(tmp_path / "empty.dcm", False)
  read = adapters.get("unlabelled")
  with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'empty.dcm'))}: DICOM file has no pixel"):
    list(read(tmp_path, "all"))
  log = tmp_path / "skipped.json"
  recs = list(read(tmp_path, "all", skip_bad=True, skipped_log=log))
  assert len(recs) == 1
  np.testing.assert_array_equal(recs[0].image, np.arange(80, dtype=np.uint8).reshape(8, 10))
  assert [s["source"] for s in json.loads(log.read_text())] == [str(tmp_path / "empty.dcm")]


def test_corrupt_files_per_reader(tmp_path):
  """NIfTI, MHA and DICOM readers turn a broken file into a DataError naming it."""
  nii = tmp_path / "v.nii.gz"
  nib.save(nib.Nifti1Image(np.arange(4000, dtype=np.int16).reshape(20, 20, 10), np.eye(4)), nii)
  nii.write_bytes(nii.read_bytes()[:200])
  mha = tmp_path / "x.mha"
  mha.write_text("ObjectType = Image\nNDims = 2\nDimSize = 40 40\nElementType = MET_UCHAR\n"
                 "ElementDataFile = LOCAL\n" + "x" * 10)
  dcm = tmp_path / "x.dcm"
  dcm.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
  for fn, path, pattern in ((imageio.read_nifti, nii, "corrupt or truncated NIfTI"),
                            (imageio.read_mha, mha, "corrupt or truncated MetaImage"),
                            (lambda p: list(imageio.iter_dicom_frames(p)), dcm, "DICOM"),
                            (imageio.read_image, tmp_path / "none.png", "file not found")):
    with pytest.raises(DataError, match=pattern) as info:
      fn(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize("log_name", ["skipped.json", "skipped.csv"])
def test_skip_bad_writes_skipped_list(fmc, log_name):
  good = list(adapters.get("fmc_uia")(fmc, "train"))
  img = _image_of(fmc, "fetal_head", row=1)
  img.write_bytes(b"broken")
  _rewrite(_csv(fmc, "thyroid_nodule_det"), lambda rows: rows[0].update(x_max="0.5"))
  _csv(fmc, "breast_3cls").write_text("")
  log = fmc / "out" / log_name
  with pytest.raises(DataError):
    list(adapters.get("fmc_uia")(fmc, "train"))
  recs = list(adapters.get("fmc_uia")(fmc, "train", skip_bad=True, skipped_log=log))
  assert len(recs) == len(good) - 4  # 2 rows of the empty CSV, 1 broken image, 1 bad box
  kept = {(r.source, r.row) for r in recs}
  assert kept < {(r.source, r.row) for r in good}
  if log_name.endswith(".json"):
    skipped = json.loads(log.read_text())
  else:
    with open(log, newline="") as f:
      skipped = list(csv.DictReader(f))
  assert [(s["source"], str(s["row"] or "")) for s in skipped] == [
      (str(_csv(fmc, "breast_3cls")), ""), (str(_csv(fmc, "fetal_head")), "3"),
      (str(_csv(fmc, "thyroid_nodule_det")), "2")]
  assert "empty CSV" in skipped[0]["reason"] and "corrupt or truncated" in skipped[1]["reason"]
  assert "x_max < x_min" in skipped[2]["reason"]
  assert not list(log.parent.glob(".*.tmp"))  # nothing half-written
