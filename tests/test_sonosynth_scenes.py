"""sonosynth scenes, records and the FMC_UIA writer / CLI."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2dino_jax import cli
from m2dino_jax.data import records, sonosynth
from m2dino_jax.data.sonosynth import generator, scenes, writer
from m2dino_jax.errors import DataError
from m2dino_jax.tasks import registry

SIZE = 96


@pytest.mark.parametrize("task", [t.name for t in registry.TASKS])
def test_every_task_yields_valid_records(task):
  t = registry.get(task)
  recs = sonosynth.generate(task, 3, seed=11, size=SIZE)
  for rec in recs:
    assert rec.image.dtype == np.uint8 and rec.image.shape == (SIZE, SIZE)
    assert rec.task == task and rec.task_type == t.type
    records.validate(rec)  # class range, mask size, box order and bounds, point count
    assert rec.image.std() > 5  # speckle, not a blank frame
    if t.type == registry.SEGMENTATION:
      assert rec.mask.shape == (SIZE, SIZE) and (rec.mask > 0).sum() >= 4
    if t.type == registry.DETECTION:
      x0, y0, x1, y1 = rec.box
      assert x1 - x0 >= 2 and y1 - y0 >= 2
    if t.type == registry.REGRESSION:
      assert np.all((rec.points >= 0) & (rec.points < SIZE))
  if t.type == registry.CLASSIFICATION:
    labels = [r.label for r in sonosynth.generate(task, t.num_classes, seed=11, size=32)]
    assert sorted(labels) == list(range(t.num_classes))  # each block of C samples holds every class


def test_scene_targets_match_the_drawn_anatomy():
  """Labels are where the image says they are: the fetal-head mask's edge is the bright skull ring, brighter
  than the hypoechoic brain inside it and than the fluid / tissue just outside it; femur end points lie on
  the brightest structure."""
  from scipy import ndimage
  for rec in sonosynth.generate("fetal_head", 4, seed=2, size=128):
    img = rec.image.astype(np.float32)
    head = rec.mask == 1
    ring = head & ~ndimage.binary_erosion(head, iterations=2)
    brain = ndimage.binary_erosion(head, iterations=6)
    beside = ndimage.binary_dilation(head, iterations=3) & ~head & (img > 0)
    assert img[ring].mean() > img[brain].mean() + 20 and img[ring].mean() > img[beside].mean() + 20
  for rec in sonosynth.generate("fetal_femur", 4, seed=2, size=128):
    mid = rec.points.mean(axis=0).round().astype(int)
    patch = rec.image[mid[1] - 3:mid[1] + 4, mid[0] - 3:mid[0] + 4]
    assert patch.max() > np.percentile(rec.image[rec.image > 0], 98)


@pytest.mark.parametrize("size", [224, 320])
def test_other_image_sizes(size):
  for task in ("cardiac_multi", "IUGC", "thyroid_nodule_det"):
    rec = sonosynth.sample(task, 0, seed=0, size=size)
    assert rec.image.shape == (size, size)
    records.validate(rec)


def test_samples_are_deterministic_and_independent_of_n():
  a = sonosynth.generate("cervix_multi", 3, seed=5, size=64)
  b = sonosynth.generate("cervix_multi", 1, seed=5, size=64, start=2)[0]
  c = sonosynth.sample("cervix_multi", 2, seed=6, size=64)
  np.testing.assert_array_equal(a[2].image, b.image)
  np.testing.assert_array_equal(a[2].mask, b.mask)
  assert not np.array_equal(a[2].image, c.image)


def test_orientation_classes_are_not_flip_invariant():
  """fetal_head_pos_cls: the face direction k*45 deg mirrors to (8 - k) % 8 under a horizontal flip,
  so a flip changes the class; the registry must forbid flips for it."""
  assert not registry.get("fetal_head_pos_cls").flip_ok
  assert not registry.get("fetal_sacral_pos_cls").flip_ok
  # the mean image of class 2 (3 o'clock) mirrored looks like class 6 (9 o'clock), not like class 2. Compared on
  # the left-right antisymmetric parts (mean - mirrored mean), which the symmetric obstetric context drops.
  recs = sonosynth.generate("fetal_head_pos_cls", 96, seed=3, size=64)
  mean = {k: np.mean([r.image for r in recs if r.label == k], axis=0) for k in (2, 6)}
  anti = {k: m - m[:, ::-1] for k, m in mean.items()}
  flipped = -anti[2]  # the antisymmetric part of the mirrored class-2 mean
  assert np.abs(flipped - anti[6]).mean() < 0.7 * np.abs(flipped - anti[2]).mean()


def test_simple_classifier_beats_chance_but_task_is_not_trivial():
  """Logistic regression on 24x24 thumbnails: the classes are in the image, yet not perfectly separable."""
  from sklearn.linear_model import LogisticRegression
  recs = sonosynth.generate("breast_2cls", 160, seed=1, size=96)
  x = np.stack([np.asarray(Image.fromarray(r.image).resize((24, 24), Image.BILINEAR), np.float32).ravel()
                for r in recs]) / 255
  y = np.array([r.label for r in recs])
  acc = LogisticRegression(max_iter=2000, C=0.1).fit(x[:110], y[:110]).score(x[110:], y[110:])
  assert 0.6 < acc < 0.99


def test_dataset_sizes_span_rich_and_scarce_tasks():
  sizes = {t.name: generator.task_size(t.name) for t in registry.TASKS}
  assert max(sizes.values()) > 10 * min(sizes.values())
  demo = [generator.task_size(t.name, 0.1) for t in registry.TASKS]
  assert min(demo) >= 8 and max(demo) <= 120
  assert set(scenes.SPECS) == set(registry.BY_NAME)


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


TASKS4 = ["fetal_femur", "liver_lesion_2cls", "spinal_cord_injury_loc", "lung"]  # one per type


def test_writer_produces_fmc_uia_layout(tmp_path):
  out = tmp_path / "synth"
  manifest = sonosynth.write_dataset(out, seed=4, scale=0.1, size=48, tasks=TASKS4)
  assert manifest["simulated"] is True and "SIMULATED" in (out / "README.md").read_text()
  assert json.loads((out / "manifest.json").read_text())["tasks"] == manifest["tasks"]
  n_total = 0
  for split in ("train", "val"):
    csv_dir = out / "data" / split / "csv_files"
    assert sorted(p.name for p in csv_dir.iterdir()) == sorted(f"{t}.csv" for t in TASKS4)
    for task in TASKS4:
      t = registry.get(task)
      rows = _read_csv(csv_dir / f"{task}.csv")
      assert len(rows) == manifest["tasks"][task][split] > 0
      n_total += len(rows)
      for row in rows:
        assert list(row) == writer.csv_columns(t)
        assert row["task_id"] == task
        assert registry.CSV_TYPE_NAMES[row["task_name"]] == t.type
        image_path = os.path.normpath(csv_dir / row["image_path"])
        image = np.asarray(Image.open(image_path))
        index = int(Path(image_path).stem.rsplit("_", 1)[1])
        ref = sonosynth.sample(task, index, seed=4, size=48)  # the record the row must reproduce
        np.testing.assert_array_equal(image, ref.image)
        if t.type == registry.SEGMENTATION:
          assert "/Segmentation/Two/lung/images/" in row["image_path"]
          mask = np.asarray(Image.open(os.path.normpath(csv_dir / row["mask_path"])))
          assert "/MASKS/" in row["mask_path"]
          np.testing.assert_array_equal(mask, ref.mask)
          assert int(row["num_classes"]) == 2
        elif t.type == registry.CLASSIFICATION:
          assert row["image_path"].startswith("../Classification/")
          assert int(row["mask"]) == ref.label
        elif t.type == registry.DETECTION:
          assert row["image_path"].startswith("../Detection/")
          box = [float(row[k]) for k in ("x_min", "y_min", "x_max", "y_max")]
          np.testing.assert_allclose(box, ref.box)
        else:
          assert row["task_name"] == "Regression" and int(row["num_classes"]) == 2
          pts = [json.loads(row[f"point_{i}_xy"]) for i in (1, 2)]
          np.testing.assert_allclose(pts, ref.points, atol=0.01)
  assert n_total == manifest["total_images"] == sum(generator.task_size(t, 0.1) for t in TASKS4)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]  # no temporary folder left
  again = sonosynth.write_dataset(out, seed=5, scale=0.1, size=32, tasks=["lung"], overwrite=True)
  assert again["seed"] == 5 and sorted(again["tasks"]) == ["lung"]
  assert sorted(p.name for p in (out / "data" / "val" / "csv_files").iterdir()) == ["lung.csv"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]  # the old folder is gone too


def test_writer_refuses_existing_output_and_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
  out = tmp_path / "synth"
  out.mkdir()
  with pytest.raises(DataError, match="already exists"):
    sonosynth.write_dataset(out, seed=0, scale=0.1, size=32, tasks=["lung"])
  out.rmdir()
  calls = []
  real = generator.sample

  def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(generator, "sample", failing)
  with pytest.raises(KeyboardInterrupt):
    sonosynth.write_dataset(out, seed=0, scale=0.1, size=32, tasks=["lung"])
  assert list(tmp_path.iterdir()) == []


def test_worker_count_does_not_change_output(tmp_path):
  one = writer.write_dataset(tmp_path / "a", seed=9, scale=0.1, size=32, tasks=["fetal_femur"])
  two = writer.write_dataset(tmp_path / "b", seed=9, scale=0.1, size=32, tasks=["fetal_femur"], workers=2)
  assert one["tasks"] == two["tasks"]
  files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / "data").rglob("*") if p.is_file())
  files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b" / "data").rglob("*") if p.is_file())
  assert files_a == files_b
  for rel in files_a:
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_cli_synth(tmp_path, capsys):
  out = tmp_path / "demo"
  assert cli.main(["data", "synth", "--out", str(out), "--seed", "1", "--scale", "0.1", "--size", "32",
                   "--tasks", "lung,cervix"]) == 0
  assert "simulated images" in capsys.readouterr().out
  written = sorted(p.name for p in (out / "data" / "train" / "csv_files").iterdir())
  assert written == ["cervix.csv", "lung.csv"]
  assert cli.main(["data", "synth", "--out", str(tmp_path / "x"), "--tasks", "no_such_task"]) == 2
  assert "unknown task 'no_such_task'" in capsys.readouterr().err
  assert cli.main(["data", "synth", "--out", str(out), "--scale", "0.1", "--tasks", "lung"]) == 2
  assert cli.main(["data", "synth", "--out", str(tmp_path / "x"), "--scale", "-1"]) == 2
  assert "config key 'scale'" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()


def test_throughput_reports_images_per_second():
  speed = sonosynth.throughput(4, 64, clock="cpu")
  assert np.isfinite(speed) and speed > 0


def test_fmc_uia_adapter_reads_simulated_bundle_back(tmp_path):
  """The same reader loads real and simulated data: every record read back equals the simulated one."""
  from m2dino_jax.data.adapters import fmc_uia
  out = tmp_path / "synth"
  manifest = sonosynth.write_dataset(out, seed=2, scale=0.1, size=40, tasks=["IUGC", "cardiac_multi"])
  back = list(fmc_uia.read(out, "all"))
  assert len(back) == manifest["total_images"]
  for rec in back:
    index = int(Path(rec.extra["image_path"]).stem.rsplit("_", 1)[1])
    ref = sonosynth.sample(rec.task, index, seed=2, size=40)
    image = rec.image if rec.image.ndim == 2 else rec.image[..., 0]
    np.testing.assert_array_equal(image, ref.image)
    if rec.task == "cardiac_multi":
      np.testing.assert_array_equal(rec.mask, ref.mask)
    else:
      np.testing.assert_allclose(rec.points, ref.points, atol=0.01)
