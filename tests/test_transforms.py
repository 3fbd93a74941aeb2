"""Transforms keep targets on the image: boxes, masks and points are checked against what the image shows."""

import numpy as np
import pytest
from scipy import ndimage

from m2dino_jax.data import records, transforms
from m2dino_jax.errors import ConfigError

S = 64
GEOMETRY = ["letterbox", "affine(scale=(0.8, 1.2), rotate=30, shear=10, translate=0.1, p=1)", "flip(p=0.5)"]


def _bright_rect_record():
  img = np.zeros((90, 140), np.uint8)
  img[20:50, 40:100] = 255
  box = np.array([40, 20, 100, 50], np.float32)
  return records.validate(records.Record(img, "thyroid_nodule_det", box=box))


@pytest.mark.parametrize("seed", range(6))
def test_box_is_bounds_of_the_transformed_bright_rectangle(seed):
  pipe = transforms.Pipeline(GEOMETRY, S, channels=1)
  ex = pipe(_bright_rect_record(), np.random.default_rng(seed))
  ys, xs = np.nonzero(ex["image"][..., 0] > 0.5)
  shown = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / S  # pixel edges, clipped by the canvas
  np.testing.assert_allclose(ex["box"], shown, atol=1.6 / S)
  assert ex["box"].min() >= 0 and ex["box"].max() <= 1


@pytest.mark.parametrize("seed", range(4))
def test_mask_follows_image(seed):
  img = np.zeros((100, 80), np.uint8)
  img[30:70, 20:50] = 255
  mask = (img > 0).astype(np.uint8)
  rec = records.validate(records.Record(img, "fetal_head", mask=mask))
  ex = transforms.Pipeline(GEOMETRY, S, channels=3)(rec, np.random.default_rng(seed))
  shown = ex["image"][..., 0] > 0.5
  inter = np.logical_and(shown, ex["mask"] == 1).sum()
  union = np.logical_or(shown, ex["mask"] == 1).sum()
  assert ex["mask"].dtype == np.uint8 and ex["mask"].shape == (S, S)
  assert set(np.unique(ex["mask"])) <= {0, 1}
  assert inter / union > 0.9


@pytest.mark.parametrize("seed", range(4))
def test_points_sit_on_the_drawn_dots(seed):
  img = np.zeros((120, 160), np.uint8)
  centres = np.array([[30, 40], [110, 60], [70, 95]])  # (col, row) of 5x5 dots
  for c, r in centres:
    img[r - 2:r + 3, c - 2:c + 3] = 255
  pts = centres + 0.5  # continuous coordinates of the dot centres
  rec = records.validate(records.Record(img, "IUGC", points=pts.astype(np.float32)))
  ex = transforms.Pipeline(["resize", "affine(scale=(0.9, 1.1), rotate=25, translate=0.05, p=1)"], 96,
                           channels=1)(rec, np.random.default_rng(seed))
  labels, n = ndimage.label(ex["image"][..., 0] > 0.2)
  assert n == 3
  blobs = np.array(ndimage.center_of_mass(ex["image"][..., 0], labels, range(1, n + 1)))[:, ::-1] + 0.5
  for p in ex["points"][:3] * 96:
    assert np.min(np.linalg.norm(blobs - p, axis=1)) < 0.75


def test_flip_respects_task_flip_ok():
  img = np.zeros((S, S), np.uint8)
  img[10:20, 5:15] = 200
  flip, plain = transforms.Pipeline(["resize", "flip(p=1)"], S, 1), transforms.Pipeline(["resize"], S, 1)
  for task, label, allowed in [("fetal_head_pos_cls", 3, False), ("fetal_sacral_pos_cls", 1, False),
                               ("fetal_plane_cls", 2, True)]:
    rec = records.validate(records.Record(img, task, label=label))
    flipped, base = flip(rec, np.random.default_rng(0)), plain(rec)
    expected = base["image"][:, ::-1] if allowed else base["image"]
    np.testing.assert_array_equal(flipped["image"], expected)
    assert flipped["label"] == label
  np.testing.assert_array_equal(base["image"][..., 0], img / np.float32(255))


def test_letterbox_round_trip_to_original_pixels():
  img = np.zeros((60, 150), np.uint8)
  img[10:40, 30:90] = 255
  mask = (img > 0).astype(np.uint8)
  pts = np.array([[30.0, 10.0], [90.0, 40.0]], np.float32)
  rec = records.validate(records.Record(img, "fetal_head", mask=mask, points=None))
  ex = transforms.Pipeline(["letterbox"], 100, 1)(rec)
  # Letterbox by hand: scale 100/150, vertical padding (100 - 60 * 2/3) / 2 = 30.
  ys, xs = np.nonzero(ex["mask"])
  assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (30 + 7, 30 + 27, 20, 60)
  back = transforms.mask_to_original(ex["mask"], ex["orig_size"])
  assert back.shape == (60, 150)
  # Down 2/3 then up 3/2 with nearest neighbours: right up to within 1 source pixel of the outline.
  inner, outer = ndimage.binary_erosion(mask), ndimage.binary_dilation(mask)
  assert np.all(back[inner] == 1) and np.all(back[~outer] == 0)
  canvas01 = transforms.apply_matrix(transforms.canvas_matrix((60, 150), 100), pts) / 100
  np.testing.assert_allclose(transforms.points_to_original(canvas01, (60, 150), 100), pts, atol=1e-9)
  np.testing.assert_array_equal(ex["orig_size"], [60, 150])


def test_intensity_transforms_match_hand_computation():
  img = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (S, 1))
  rec = records.Record(img, "")
  x = img.astype(np.float32) / 255
  rng = np.random.default_rng(5)
  g = rng.uniform(0.5, 2.0)
  out = transforms.Pipeline(["resize", "gamma(range=(0.5, 2.0), p=1)"], S, 1)(rec, np.random.default_rng(5))
  np.testing.assert_allclose(out["image"][..., 0], x ** g, rtol=1e-5, atol=1e-6)
  out = transforms.Pipeline(["resize", "gain(range=(1.5, 1.5), p=1)", "normalize"], S, 3)(rec)
  ref = (np.clip(x * 1.5, 0, 1) - 0.1842924807) / 0.2187705424
  np.testing.assert_allclose(out["image"], np.repeat(ref[..., None], 3, -1), rtol=1e-5, atol=1e-5)


def test_speckle_is_multiplicative_with_the_requested_sigma():
  rec = records.Record(np.full((128, 128), 128, np.uint8), "")
  pipe = transforms.Pipeline(["resize", "speckle(sigma=(0.1, 0.1), p=1)"], 128, 1)
  out = pipe(rec, np.random.default_rng(1))
  v = out["image"][..., 0]
  base = 128 / 255
  assert abs(v.mean() / base - 1) < 0.01 and abs(v.std() / base - 0.1) < 0.005


def test_same_seed_same_example_and_full_layout():
  specs = ["letterbox"] + GEOMETRY[1:] + ["intensity(p=1)", "speckle(p=1)", "normalize"]
  pipe = transforms.Pipeline(specs, S, 3)
  a = pipe(_bright_rect_record(), np.random.default_rng(9))
  b = pipe(_bright_rect_record(), np.random.default_rng(9))
  c = pipe(_bright_rect_record(), np.random.default_rng(10))
  assert set(a) == set(records.EXAMPLE_KEYS) | {"valid"}
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["image"], c["image"])
  assert a["image"].shape == (S, S, 3) and a["image"].dtype == np.float32
  assert a["points"].shape == (records.MAX_POINTS, 2) and a["label"] == -1 and a["task_id"] == 13


def test_bad_specs_raise_config_errors():
  with pytest.raises(ConfigError, match="unknown transform 'blur'"):
    transforms.Pipeline(["letterbox", "blur"], S)
  with pytest.raises(ConfigError, match="follows a pixel transform"):
    transforms.Pipeline(["letterbox", "gamma", "flip"], S)
  with pytest.raises(ConfigError, match="first transform"):
    transforms.Pipeline(["flip", "letterbox"], S)
  with pytest.raises(ConfigError, match="bad arguments"):
    transforms.Pipeline(["letterbox", "flip(prob=1)"], S)
