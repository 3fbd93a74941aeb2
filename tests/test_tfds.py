"""TFDS/ArrayRecord builds from adapter output (no TensorFlow) read back to equal records."""

from __future__ import annotations

import json
import pickle
import sys

import grain
import numpy as np
import pytest

from m2dino_jax import cli
from m2dino_jax.data import adapters, records
from m2dino_jax.data import tfds as tfds_data
from m2dino_jax.data.tfds import builder
from m2dino_jax.errors import DataError
from tests.test_adapters import write_fmc


def assert_same_record(a: records.Record, b: records.Record):
  for field in ("task", "task_type", "label", "source", "row", "spacing_mm", "extra"):
    assert getattr(a, field) == getattr(b, field), field
  np.testing.assert_array_equal(a.image, b.image)
  assert a.image.dtype == b.image.dtype == np.uint8
  for field in ("mask", "box", "points"):
    x, y = getattr(a, field), getattr(b, field)
    assert (x is None) == (y is None), field
    if x is not None:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def fmc_build(tmp_path_factory):
  root = tmp_path_factory.mktemp("fmc")
  write_fmc(root / "manual")
  counts = tfds_data.build("fmc_uia", root / "manual", root / "out")
  return root, counts


def test_build_and_read_back_equal_records(fmc_build):
  root, counts = fmc_build
  assert counts == {"train": 10, "val": 10}
  for split in ("train", "val"):
    want = list(adapters.get("fmc_uia")(root / "manual", split))
    src = tfds_data.source("fmc_uia", split, root / "out")
    assert len(src) == len(want)
    for i, rec in enumerate(want):
      assert_same_record(src.record(i), rec)
      # what the pipeline gets: a dict of Record fields that validates as-is
      records.validate(records.Record(**src[i]))
    assert src.tasks == [r.task for r in want] == [src[i]["task"] for i in range(len(src))]
  assert "tensorflow" not in sys.modules


def test_tfds_data_source_and_grain(fmc_build):
  import tensorflow_datasets as tfds
  root, _ = fmc_build
  raw = tfds.data_source("m2dino_ultrasound/fmc_uia", split="val", data_dir=str(root / "out"))
  src = tfds_data.source("fmc_uia", "val", root / "out")
  assert len(raw) == len(src) == 10
  assert raw[3]["task"].decode() == src[3]["task"]
  clone = pickle.loads(pickle.dumps(src))  # Grain workers receive the source pickled
  ds = grain.MapDataset.source(clone).map(lambda ex: (ex["task"], ex["image"].shape))
  assert [ds[i] for i in range(len(ds))] == [(src[i]["task"], src[i]["image"].shape) for i in range(10)]
  assert [ex["task"] for ex in src.__getitems__([4, 0])] == [src[4]["task"], src[0]["task"]]


def test_encode_decode_roundtrip():
  """Fields the FMC fixture does not exercise: RGB image, spacing, float box, no row."""
  rng = np.random.default_rng(0)
  recs = [
      records.Record(image=rng.integers(0, 255, (5, 7, 3), dtype=np.uint8), task="", spacing_mm=(0.38265, 0.4),
                     source="a.dcm", extra={"frame": 3, "crop": [1, 2, 3, 4]}),
      records.Record(image=rng.integers(0, 255, (6, 4), dtype=np.uint8), task="fetal_femur",
                     task_type="regression", points=np.array([[1.25, 2.5], [3, 4]], np.float32), row=7),
      records.Record(image=np.zeros((4, 4), np.uint8), task="uterine_fibroid_det", task_type="detection",
                     box=np.array([0.5, 1, 3.75, 4], np.float32)),
  ]
  for rec in recs:
    assert_same_record(records.Record(**builder.decode(builder.encode(rec))), rec)


def test_skip_bad_build_lists_skipped(tmp_path):
  write_fmc(tmp_path / "manual")
  bad = tmp_path / "manual" / "data" / "val" / "Detection" / "thyroid_val_1.png"
  bad.write_bytes(b"\x89PNG broken")
  with pytest.raises(DataError, match=r"thyroid_nodule_det.csv row 3: image .*thyroid_val_1.png: corrupt"):
    tfds_data.build("fmc_uia", tmp_path / "manual", tmp_path / "out")
  counts = tfds_data.build("fmc_uia", tmp_path / "manual", tmp_path / "out", skip_bad=True, overwrite=True)
  assert counts == {"train": 10, "val": 9}
  skipped = json.loads((tfds_data.dataset_dir("fmc_uia", tmp_path / "out") / "skipped.json").read_text())
  assert len(skipped) == 1 and skipped[0]["split"] == "val" and skipped[0]["row"] == 3
  assert "corrupt or truncated image" in skipped[0]["reason"]
  src = tfds_data.source("fmc_uia", "val", tmp_path / "out")
  assert src.tasks == [src[i]["task"] for i in range(9)]  # the task index skips what was skipped


def test_source_errors(fmc_build, tmp_path):
  root, _ = fmc_build
  with pytest.raises(DataError, match="no built dataset 'busi'"):
    tfds_data.source("busi", "train", root / "out")
  with pytest.raises(DataError, match="split 'test' not built; available: train, val"):
    tfds_data.source("fmc_uia", "test", root / "out")
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="manual directory is missing or empty"):
    tfds_data.build("busi", tmp_path / "empty", tmp_path / "out")
  (tmp_path / "empty" / "readme.txt").write_text("wrong folder")
  with pytest.raises(DataError, match="FMC_UIA csv_files folder not found"):
    tfds_data.build("fmc_uia", tmp_path / "empty", tmp_path / "out")


def test_build_with_a_missing_split(tmp_path):
  """A release with only train/ builds only the train split."""
  import shutil
  write_fmc(tmp_path / "manual")
  shutil.rmtree(tmp_path / "manual" / "data" / "val")
  assert tfds_data.build("fmc_uia", tmp_path / "manual", tmp_path / "out") == {"train": 10}


def test_cli_build(tmp_path, capsys):
  write_fmc(tmp_path / "manual")
  rc = cli.main(["data", "build", "--dataset", "fmc_uia", "--manual-dir", str(tmp_path / "manual"),
                 "--data-dir", str(tmp_path / "out")])
  assert rc == 0 and "built fmc_uia: train 10, val 10 examples" in capsys.readouterr().out
  src = tfds_data.source("fmc_uia", "train", tmp_path / "out")
  for i, rec in enumerate(adapters.get("fmc_uia")(tmp_path / "manual", "train")):
    assert_same_record(src.record(i), rec)
  (tmp_path / "manual" / "data" / "train" / "csv_files" / "IUGC.csv").write_text("")
  rc = cli.main(["data", "build", "--dataset", "fmc_uia", "--manual-dir", str(tmp_path / "manual"),
                 "--data-dir", str(tmp_path / "out2")])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("m2dino data: error: ") and "IUGC.csv: empty CSV" in err
  assert not list((tmp_path / "out2").rglob("*.array_record*"))  # nothing half-written


def test_build_unlabelled_dicom_keeps_spacing(tmp_path):
  import shutil

  from pydicom.data import get_testdata_file
  (tmp_path / "manual").mkdir()
  shutil.copy(get_testdata_file("gdcm-US-ALOKA-16.dcm"), tmp_path / "manual" / "aloka.dcm")
  want = list(adapters.get("unlabelled")(tmp_path / "manual", "all"))
  counts = tfds_data.build("unlabelled", tmp_path / "manual", tmp_path / "out")
  split = next(iter(counts))
  assert counts == {split: 1} and want[0].extra["split"] == split
  got = tfds_data.source("unlabelled", split, tmp_path / "out").record(0)
  assert_same_record(got, want[0])
  assert got.spacing_mm == pytest.approx((0.38265306, 0.38265306)) and got.image.shape == (392, 608, 3)


def test_build_from_sonosynth(tmp_path):
  """The simulator's FMC_UIA layout goes through the same adapter and builder as the real bundle."""
  import csv as csv_lib
  from collections import Counter

  from m2dino_jax.data.sonosynth import writer
  tasks = ["fetal_head", "IUGC", "thyroid_nodule_det"]
  manifest = writer.write_dataset(tmp_path / "syn", seed=0, scale=0.02, size=48, tasks=tasks)
  counts = tfds_data.build("fmc_uia", tmp_path / "syn", tmp_path / "out")
  for split in ("train", "val"):
    src = tfds_data.source("fmc_uia", split, tmp_path / "out")
    assert counts[split] == len(src) == sum(manifest["tasks"][t][split] for t in tasks)
    assert Counter(src.tasks) == {t: manifest["tasks"][t][split] for t in tasks}
  # the first IUGC row's points, read straight from the CSV, equal the stored record's
  with open(tmp_path / "syn" / "data" / "train" / "csv_files" / "IUGC.csv", newline="") as f:
    row = next(csv_lib.DictReader(f))
  want = np.array([json.loads(row[f"point_{k}_xy"]) for k in (1, 2, 3)], np.float32)
  src = tfds_data.source("fmc_uia", "train", tmp_path / "out")
  got = src.record(src.tasks.index("IUGC"))
  np.testing.assert_array_equal(got.points, want)
  assert got.image.shape == (48, 48)
