"""Adapters read each dataset in its released layout: tiny fixtures are written here in that layout
and the records are checked against what was written (labels, masks, boxes, points, spacing, split)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image, ImageDraw

from m2dino_jax.data import adapters
from m2dino_jax.data.adapters import base
from m2dino_jax.errors import ConfigError

FMC_COLUMNS = ["task_id", "task_name", "image_path", "mask_path", "mask", "num_classes",
               "point_1_xy", "point_2_xy", "point_3_xy", "x_min", "y_min", "x_max", "y_max"]


def save_png(path: Path, arr) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(arr, np.uint8)).save(path)
  return path


def rand_image(rng, h=32, w=32, rgb=False):
  return rng.integers(0, 256, (h, w, 3) if rgb else (h, w), dtype=np.uint8)


def write_fmc(root: Path, seed: int = 0) -> dict:
  """A tiny FMC_UIA bundle: train/val CSVs for one task of each type (+ a 4-class segmentation).

  Returns {split: [expected dict per row, in the order the adapter yields them]}.
  """
  rng = np.random.default_rng(seed)
  expected = {}
  for split in ("train", "val"):
    csv_dir = root / "data" / split / "csv_files"
    rows_by_csv: dict[str, list[dict]] = {}
    exp = []
    for i in range(2):
      # segmentation: fetal_head (2 classes) and cardiac_multi (4 classes)
      for task, ncls, sub in (("cardiac_multi", 4, "Four/CAMUS"), ("fetal_head", 2, "Two/HC18")):
        img, mask = rand_image(rng), rng.integers(0, ncls, (32, 32))
        rel = f"../Segmentation/{sub}/{split}_{i}.png"
        mrel = f"../Segmentation/{sub}/MASKS/{split}_{i}.png"
        save_png(csv_dir / rel, img)
        save_png(csv_dir / mrel, mask)
        rows_by_csv.setdefault(task, []).append(dict(task_id=task, task_name="segmentation", image_path=rel,
                                                     mask_path=mrel, mask="", num_classes=ncls))
        exp.append(dict(task=task, image=img, mask=mask))
      # classification (RGB image that is truly colour stays RGB)
      img, label = rand_image(rng, rgb=True), int(rng.integers(0, 3))
      rel = f"../Classification/breast_{split}_{i}.png"
      save_png(csv_dir / rel, img)
      rows_by_csv.setdefault("breast_3cls", []).append(dict(task_id="breast_3cls", task_name="classification",
                                                            image_path=rel, mask=f"{label}.0", num_classes=3,
                                                            mask_path="nan"))
      exp.append(dict(task="breast_3cls", image=img, label=label))
      # detection
      img = rand_image(rng)
      box = [1.5 + i, 2.0, 20.25, 31.0]
      rel = f"../Detection/thyroid_{split}_{i}.png"
      save_png(csv_dir / rel, img)
      rows_by_csv.setdefault("thyroid_nodule_det", []).append(dict(
          task_id="thyroid_nodule_det", task_name="detection", image_path=rel,
          **dict(zip(("x_min", "y_min", "x_max", "y_max"), box))))
      exp.append(dict(task="thyroid_nodule_det", image=img, box=box))
      # regression with three points (capital R as in the challenge CSVs); grey saved as RGB
      img = rand_image(rng)
      pts = rng.uniform(0, 31, (3, 2)).round(2)
      rel = f"../Regression/IUGC/{split}_{i}.png"
      save_png(csv_dir / rel, np.repeat(img[..., None], 3, axis=2))
      rows_by_csv.setdefault("IUGC", []).append(dict(
          task_id="IUGC", task_name="Regression", image_path=rel, num_classes=3,
          **{f"point_{k + 1}_xy": json.dumps(p.tolist()) for k, p in enumerate(pts)}))
      exp.append(dict(task="IUGC", image=img, points=pts))
    ordered = []
    for task in sorted(rows_by_csv):  # the adapter reads CSVs sorted by name
      path = csv_dir / f"{task}.csv"
      with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FMC_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows_by_csv[task])
      ordered += [dict(e, csv=path, line=k + 2) for k, e in enumerate(x for x in exp if x["task"] == task)]
    expected[split] = ordered
  return expected


def check_fmc(recs, expected):
  assert len(recs) == len(expected)
  for rec, exp in zip(recs, expected):
    assert rec.task == exp["task"] and rec.source == str(exp["csv"]) and rec.row == exp["line"]
    np.testing.assert_array_equal(rec.image, exp["image"])
    if "mask" in exp:
      np.testing.assert_array_equal(rec.mask, exp["mask"])
    if "label" in exp:
      assert rec.label == exp["label"]
    if "box" in exp:
      np.testing.assert_allclose(rec.box, exp["box"])
    if "points" in exp:
      np.testing.assert_allclose(rec.points, exp["points"], atol=1e-5)


def test_fmc_uia(tmp_path):
  expected = write_fmc(tmp_path)
  read = adapters.get("fmc_uia")
  for split in ("train", "val"):
    recs = list(read(tmp_path, split))
    check_fmc(recs, expected[split])
    assert {r.extra["split"] for r in recs} == {split}
    assert {r.task_type for r in recs} == {"segmentation", "classification", "detection", "regression"}
  assert len(list(read(tmp_path / "data", "all"))) == len(expected["train"]) + len(expected["val"])
  with pytest.raises(ConfigError, match="splits train, val"):
    read(tmp_path, "test")


def test_registry_names():
  assert set(adapters.NAMES) == {"fmc_uia", "busi", "hc18", "camus", "fetal_planes", "jnu_ifm", "psfhs",
                                 "fass", "unlabelled"}
  for name in adapters.NAMES:
    assert callable(adapters.get(name)) and adapters.splits(name)
  with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
    adapters.get("nope")


def test_busi(tmp_path):
  rng = np.random.default_rng(1)
  root = tmp_path / "Dataset_BUSI_with_GT"
  truth = {}
  for cls in ("benign", "malignant", "normal"):
    for n in (1, 2, 10):
      name = f"{cls} ({n})"
      img = rand_image(rng, 24, 28)
      save_png(root / cls / f"{name}.png", img)
      m0 = np.zeros((24, 28), np.uint8)
      m1 = np.zeros((24, 28), np.uint8)
      if cls != "normal":
        m0[2:8, 3:9] = 255
        if n == 1:  # a second lesion in its own file
          m1[15:20, 10:25] = 255
          save_png(root / cls / f"{name}_mask_1.png", m1)
      save_png(root / cls / f"{name}_mask.png", m0)
      truth[str(root / cls / f"{name}.png")] = (cls, img, ((m0 > 0) | (m1 > 0)).astype(np.uint8))
  recs = list(adapters.get("busi")(tmp_path, "all"))
  assert len(recs) == 9 * 2 + 6  # seg + 3cls for every image, 2cls for non-normal
  labels3 = {"benign": 0, "malignant": 1, "normal": 2}
  for rec in recs:
    cls, img, mask = truth[rec.source]
    np.testing.assert_array_equal(rec.image, img)
    if rec.task == "breast_lesion":
      np.testing.assert_array_equal(rec.mask, mask)
    elif rec.task == "breast_3cls":
      assert rec.label == labels3[cls]
    else:
      assert rec.task == "breast_2cls" and cls != "normal" and rec.label == labels3[cls]
  benign1 = next(r for r in recs if r.task == "breast_lesion" and r.source.endswith("benign (1).png"))
  assert benign1.mask.sum() == 36 + 75  # both lesion files ORed
  train = {(r.source, r.task) for r in adapters.get("busi")(tmp_path, "train")}
  val = {(r.source, r.task) for r in adapters.get("busi")(root, "val")}
  assert train | val == {(r.source, r.task) for r in recs} and not train & val


def test_hc18(tmp_path):
  rng = np.random.default_rng(2)
  (tmp_path / "training_set").mkdir()
  rows, truth = [], {}
  for i, name in enumerate(["000_HC.png", "001_HC.png", "010_2HC.png"]):
    img = rand_image(rng, 40, 48)
    save_png(tmp_path / "training_set" / name, img)
    ann = Image.new("L", (48, 40), 0)
    ImageDraw.Draw(ann).ellipse((5 + i, 4, 40, 33 - i), outline=255, width=1)
    ann.save(tmp_path / "training_set" / name.replace(".png", "_Annotation.png"))
    # independent reference: flood the outside from a corner; the head is everything not reached
    ref = ann.copy()
    ImageDraw.floodfill(ref, (0, 0), 128)
    truth[name] = (img, (np.asarray(ref) != 128).astype(np.uint8))
    rows.append(f"{name},{0.07 + 0.01 * i:.4f},{150.5 + i}")
  (tmp_path / "training_set_pixel_size_and_HC.csv").write_text(
      "filename,pixel size(mm),head circumference (mm)\n" + "\n".join(rows) + "\n")
  recs = list(adapters.get("hc18")(tmp_path, "all"))
  assert len(recs) == 3
  for i, rec in enumerate(recs):
    name = Path(rec.extra["image_path"]).name
    img, mask = truth[name]
    assert rec.task == "fetal_head" and rec.row == i + 2
    np.testing.assert_array_equal(rec.image, img)
    np.testing.assert_array_equal(rec.mask, mask)
    assert mask.sum() > 300
    assert rec.spacing_mm == pytest.approx((0.07 + 0.01 * i,) * 2)
    assert rec.extra["hc_mm"] == pytest.approx(150.5 + i)


def test_camus(tmp_path):
  rng = np.random.default_rng(3)
  truth = {}
  for p in (1, 2, 3):
    pdir = tmp_path / "database_nifti" / f"patient{p:04d}"
    pdir.mkdir(parents=True)
    for view, phase in (("2CH", "ED"), ("4CH", "ES")):
      img = rand_image(rng, 30, 20)  # [row, col]
      mask = rng.integers(0, 4, (30, 20)).astype(np.uint8)
      affine = np.diag([0.31, 0.154, 1.0, 1.0])
      stem = f"patient{p:04d}_{view}_{phase}"
      nib.save(nib.Nifti1Image(img.T.copy(), affine), pdir / f"{stem}.nii.gz")  # NIfTI axis 0 = x
      nib.save(nib.Nifti1Image(mask.T.copy(), affine), pdir / f"{stem}_gt.nii.gz")
      truth[stem] = (img, mask)
    nib.save(nib.Nifti1Image(np.zeros((20, 30, 5), np.uint8), np.eye(4)),
             pdir / f"patient{p:04d}_2CH_half_sequence.nii.gz")  # unlabelled cine: ignored
  split_dir = tmp_path / "database_split"
  split_dir.mkdir()
  (split_dir / "subgroup_training.txt").write_text("patient0001\npatient0003\n")
  (split_dir / "subgroup_validation.txt").write_text("patient0002\n")
  read = adapters.get("camus")
  recs = list(read(tmp_path, "all"))
  assert len(recs) == 6
  for rec in recs:
    img, mask = truth[Path(rec.extra["image_path"]).name.replace(".nii.gz", "")]
    np.testing.assert_array_equal(rec.image, img)
    np.testing.assert_array_equal(rec.mask, mask)
    assert rec.task == "cardiac_multi"
    assert rec.spacing_mm == pytest.approx((0.31, 0.154))
  assert {r.extra["patient"] for r in read(tmp_path, "train")} == {"patient0001", "patient0003"}
  assert {r.extra["patient"] for r in read(tmp_path / "database_nifti", "val")} == {"patient0002"}


def test_fetal_planes(tmp_path):
  rng = np.random.default_rng(4)
  planes = ["Fetal brain", "Other", "Maternal cervix", "Fetal abdomen", "Fetal thorax", "Fetal femur"]
  lines = ["Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train "]
  imgs = {}
  for i, plane in enumerate(planes):
    name = f"Patient{i:05d}_Plane{i}_1_of_1"
    imgs[name] = rand_image(rng)
    save_png(tmp_path / "Images" / f"{name}.png", imgs[name])
    lines.append(f"{name};{i};{plane};Not A Brain;Op. 1;Voluson E6;{i % 2}")
  (tmp_path / "FETAL_PLANES_DB_data.csv").write_text("\n".join(lines) + "\n")
  order = ["Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax", "Maternal cervix", "Other"]
  train = list(adapters.get("fetal_planes")(tmp_path, "train"))
  test = list(adapters.get("fetal_planes")(tmp_path, "test"))
  assert [r.row for r in train] == [3, 5, 7] and [r.row for r in test] == [2, 4, 6]
  for rec in train + test:
    i = rec.row - 2
    assert rec.label == order.index(planes[i]) and rec.task == "fetal_plane_cls"
    assert rec.extra["split"] == ("train" if i % 2 else "test")
    np.testing.assert_array_equal(rec.image, imgs[Path(rec.extra["image_path"]).stem])


def test_jnu_ifm(tmp_path):
  rng = np.random.default_rng(5)
  truth = {}
  for v in ("video01", "video02"):
    vdir = tmp_path / v
    labels = []
    for f in range(3):
      img = rand_image(rng, 26, 33)
      raw = rng.choice(np.array([0, 7, 8], np.uint8), (26, 33))
      save_png(vdir / "image" / f"{f:04d}.png", img)
      save_png(vdir / "mask" / f"{f:04d}_mask.png", raw)
      labels.append(f"{f:04d}.png,{3 + f}")
      truth[f"{v}/{f:04d}"] = (img, np.select([raw == 7, raw == 8], [1, 2], 0), 3 + f)
    (vdir / "framelabel.csv").write_text("frame,label\n" + "\n".join(labels) + "\n")
  recs = list(adapters.get("jnu_ifm")(tmp_path, "all"))
  assert len(recs) == 6
  for rec in recs:
    img, mask, label = truth[f"{rec.extra['video']}/{Path(rec.extra['image_path']).stem}"]
    np.testing.assert_array_equal(rec.image, img)
    np.testing.assert_array_equal(rec.mask, mask)
    assert rec.extra["frame_label"] == label and rec.task == "head_symphysis_multi"
  splits = {r.extra["video"]: r.extra["split"] for r in recs}
  assert splits == {v: base.hashed_split(v) for v in ("video01", "video02")}


def test_psfhs(tmp_path):
  rng = np.random.default_rng(6)
  (tmp_path / "image_mha").mkdir()
  (tmp_path / "label_mha").mkdir()
  truth = {}
  for i, kind in enumerate(("vector", "slices", "grey")):
    rgb = rand_image(rng, 20, 24, rgb=True)
    if kind == "vector":
      img = sitk.GetImageFromArray(rgb, isVector=True)
    elif kind == "slices":  # three channels stored as a 3-slice volume
      img = sitk.GetImageFromArray(np.moveaxis(rgb, -1, 0).copy())
    else:
      rgb = np.repeat(rgb[..., :1], 3, axis=2)
      img = sitk.GetImageFromArray(rgb[..., 0].copy())
    img.SetSpacing((0.2, 0.25) if kind != "slices" else (0.2, 0.25, 1.0))
    sitk.WriteImage(img, str(tmp_path / "image_mha" / f"{i:05d}.mha"))
    label = rng.integers(0, 3, (20, 24)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(label), str(tmp_path / "label_mha" / f"{i:05d}.mha"))
    truth[f"{i:05d}"] = (rgb[..., 0] if kind == "grey" else rgb, label)
  recs = list(adapters.get("psfhs")(tmp_path, "all"))
  assert len(recs) == 3
  for rec in recs:
    img, label = truth[Path(rec.source).stem]
    np.testing.assert_array_equal(rec.image, img)
    np.testing.assert_array_equal(rec.mask, label)
    assert rec.spacing_mm == pytest.approx((0.2, 0.25)) and rec.task == "head_symphysis_multi"


def test_fass(tmp_path):
  rng = np.random.default_rng(7)
  truth = {}
  for i in range(3):
    img, ann = rand_image(rng), rng.integers(0, 5, (32, 32))
    save_png(tmp_path / "IMAGES" / f"P{i}.png", img)
    save_png(tmp_path / "annotations" / f"P{i}.png", ann)
    truth[f"P{i}"] = (img, ann)
  recs = list(adapters.get("fass")(tmp_path, "all"))
  assert len(recs) == 3
  for rec in recs:
    img, ann = truth[Path(rec.source).stem]
    np.testing.assert_array_equal(rec.image, img)
    np.testing.assert_array_equal(rec.mask, ann)
    assert rec.task == "fetal_abdomen_multi" and rec.task_type == "segmentation"


def test_unlabelled_images(tmp_path):
  rng = np.random.default_rng(8)
  grey, rgb = rand_image(rng), rand_image(rng, rgb=True)
  save_png(tmp_path / "a" / "x.png", grey)
  Image.fromarray(rgb).save(tmp_path / "b.jpg", quality=95)
  (tmp_path / "notes.txt").write_text("not an image")
  recs = list(adapters.get("unlabelled")(tmp_path, "all"))
  assert [Path(r.source).name for r in recs] == ["x.png", "b.jpg"]
  np.testing.assert_array_equal(recs[0].image, grey)
  jpeg = np.asarray(Image.open(tmp_path / "b.jpg").convert("RGB"))
  np.testing.assert_array_equal(recs[1].image, jpeg)
  assert all(r.task == "" and r.spacing_mm is None for r in recs)
