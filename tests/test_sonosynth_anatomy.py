"""sonosynth anatomy (issue 18): every labelled border visible (border CNR per class on generated images),
landmarks on the visible structure ends, B-lines from ring-down physics, the point convention, nuisances."""

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from m2dino_jax import cli
from m2dino_jax.data import records, sonosynth, transforms
from m2dino_jax.data.sonosynth import anatomy, generator, measure, nuisance, physics, scenes, views
from m2dino_jax.data.sonosynth.shapes import Canvas
from m2dino_jax.errors import ConfigError
from m2dino_jax.tasks import registry

SEG_TASKS = [t.name for t in registry.TASKS if t.type == registry.SEGMENTATION]
CNR_TARGET = 0.8


def _loop_local_cnr(img, inner, outer, tile, min_pixels):
  """The local border CNR written as a plain loop over tiles (independent of measure._local)."""
  diffs, weights, var_a, n_a, var_b, n_b = [], [], [], [], [], []
  for y0 in range(0, img.shape[0], tile):
    for x0 in range(0, img.shape[1], tile):
      sl = (slice(y0, y0 + tile), slice(x0, x0 + tile))
      a, b = img[sl][inner[sl]], img[sl][outer[sl]]
      if a.size >= min_pixels and b.size >= min_pixels:
        diffs.append(abs(a.mean() - b.mean()))
        weights.append(a.size + b.size)
        var_a.append(a.var() * a.size)
        n_a.append(a.size)
        var_b.append(b.var() * b.size)
        n_b.append(b.size)
  noise = math.sqrt(sum(var_a) / sum(n_a) + sum(var_b) / sum(n_b))
  return float(np.average(diffs, weights=weights) / noise)


def test_border_cnr_matches_a_loop_and_reads_speckle_contrast():
  """measure.border_cnr equals a plain-loop implementation; on simulated speckle it reads ~0.1 with no contrast,
  and the same for the local and whole-border forms when the contrast is the same all round."""
  size = 128
  yy, xx = np.mgrid[:size, :size]
  mask = (np.hypot(yy - 64, xx - 60) < 30).astype(np.uint8)
  rng = np.random.default_rng(0)
  img = rng.normal(100, 20, (size, size)) + 25 * mask - 10 * (xx > 64) * mask  # contrast varies round the border
  band = measure.default_band(size)
  inner, outer = measure.pair_bands(mask, 1, 0, None, band)
  ours = measure.border_cnr(img, mask)[1]
  assert ours == pytest.approx(_loop_local_cnr(img, inner, outer, 8 * band, band * band), rel=1e-9)
  probe = scenes.CONVEX
  fov = physics.geometry(probe, size, size).fov
  for db, lo, hi in ((0.0, 0.0, 0.3), (8.0, 0.9, 1.6)):
    echo = np.where(mask > 0, db, 0.0).astype(np.float32)
    image = physics.simulate(echo, probe, np.random.default_rng(1))
    local, whole = measure.border_cnr(image, mask, fov)[1], measure.border_cnr_global(image, mask, fov)[1]
    assert lo <= local <= hi, (db, local)
    if db:
      assert local == pytest.approx(whole, rel=0.1)


@pytest.mark.parametrize("task", SEG_TASKS)
def test_every_labelled_border_is_visible(task):
  """Border CNR (local, smallest over a class's neighbours) averaged over 20 samples at 256 px >= 0.8 for every
  class. Before this work cardiac_multi read 0.51 / 0.32 / 0.46 (LV, myocardium, LA), fetal_heart 0.64,
  fetal_abdomen liver 0.75; the whole-border form of the myocardium's was 0.26 (now ~1.2 local)."""
  size = 256
  fov = physics.geometry(scenes.SPECS[task].probe, size, size).fov
  per_class: dict[int, list[float]] = {}
  for rec in sonosynth.generate(task, 20, seed=0, size=size):
    for c, v in measure.border_cnr(rec.image, rec.mask, fov).items():
      per_class.setdefault(c, []).append(v)
  assert sorted(per_class) == list(range(1, registry.get(task).num_classes))  # every class measured
  means = {c: float(np.nanmean(v)) for c, v in per_class.items()}
  assert min(means.values()) >= CNR_TARGET, means


def _end_errors(scene, probe, cv, realisations=8):
  """Signed distance (px, + = beyond) from each landmark to the half-maximum of the speckle-averaged brightness
  profile along the bone's bright upper surface, for ends at least 8 px inside the field."""
  env = np.mean([physics.display_envelope(scene.echo, probe, np.random.default_rng(s), scene.atten,
                                          density=cv.density) ** 2 for s in range(realisations)], axis=0)
  img = 10 * np.log10(np.maximum(env, 1e-6))
  p0, p1 = np.asarray(scene.points, np.float64)
  length = float(np.hypot(*(p1 - p0)))
  u = (p1 - p0) / length
  n = np.array([-u[1], u[0]])
  t = np.arange(-0.3 * length, 1.3 * length, 0.25)
  rows = np.array([ndimage.map_coordinates(img, [p0[1] + t * u[1] + k * n[1], p0[0] + t * u[0] + k * n[0]], order=1)
                   for k in np.arange(-6, 6.5, 0.5)])
  mid = (t > 0.2 * length) & (t < 0.8 * length)
  prof = rows[int(np.argmax(rows[:, mid].mean(axis=1)))]
  shaft = np.median(prof[mid])
  inner = ndimage.binary_erosion(cv.fov, iterations=8)
  out = []
  for end, sign, p in ((0.0, -1, p0), (length, 1, p1)):
    if not inner[int(round(p[1])), int(round(p[0]))]:
      continue
    beyond = np.median(prof[(sign * (t - end) > 0.03 * length) & (sign * (t - end) < 0.08 * length)])
    half = (shaft + beyond) / 2
    j = int(np.argmin(np.abs(t - (end - sign * 0.15 * length))))
    while 0 < j < len(t) - 1 and prof[j] > half:
      j += sign
    out.append(sign * (t[j] - end))
  return out


def test_femur_landmarks_sit_on_the_visible_bone_ends():
  """The femur-length landmarks are where the bright shaft ends in the image (speckle-averaged half-maximum):
  within 1 px (measured |error| <= 0.6 px); the round-capped shaft before put them 2-4 px inside the ends."""
  errors = []
  for i in range(6):
    rng = np.random.default_rng([2, 3, i])
    probe = generator._jitter_probe(scenes.CONVEX, rng)
    cv = Canvas(256, probe)
    errors += _end_errors(scenes.fetal_femur(cv, rng, -1), probe, cv)
  assert len(errors) >= 8
  assert np.max(np.abs(errors)) <= 1.0, np.round(errors, 2)


def test_os_and_symphysis_landmarks_are_on_the_structure_ends():
  """FUGC: the internal and external os are the ends of the cervical canal, on the cervix's ends (inside it, and
  2 px further along the axis is outside). IUGC: the symphysis end points are the ends of its long axis."""
  for i in range(6):
    rng = np.random.default_rng([4, i])
    cv = Canvas(256, scenes.ENDOCAVITY)
    _, _, tissue, _, _, internal, external = views.cervix(cv, rng)
    u = (internal - external) / np.linalg.norm(internal - external)
    for p, out in ((internal, internal + 2.0 * u), (external, external - 2.0 * u)):
      assert tissue[int(round(p[1])), int(round(p[0]))]
      assert not tissue[int(round(out[1])), int(round(out[0]))]
    cv = Canvas(256, scenes.CONVEX)
    _, _, ps, _, points = views.symphysis_and_head(cv, rng)
    ys, xs = np.nonzero(ps)
    axis = (points[1] - points[0]) / np.linalg.norm(points[1] - points[0])
    proj = (np.stack([xs, ys], 1) - points[0]) @ axis
    assert abs(proj.min()) <= 1.0 and abs(proj.max() - np.linalg.norm(points[1] - points[0])) <= 1.0


def test_b_lines_come_from_ring_down_and_do_not_fade():
  """A ring-down resonator at the pleura (nothing drawn below it) gives a vertical line to the bottom: > 10 dB
  above the lung beside it, its deep third within 4 dB of its shallow third, nothing above the resonator."""
  probe = physics.dataclasses.replace(scenes.LINEAR, noise_db=None, clutter_db=None)
  cv = Canvas(256, probe)
  rng = np.random.default_rng(5)
  echo = np.full((256, 256), -18.0, np.float32)
  pleura, ribs = 70.0, (40.0, 216.0)
  echo[69:72, 40:216] = 16.0
  ring = anatomy.b_lines(cv, rng, pleura, ribs, 1, fade_db_per_cm=(0.0, 0.0))
  cols = np.flatnonzero(ring.any(axis=0))
  env = np.mean([physics.envelope(echo, probe, np.random.default_rng(s), ringdown=ring) ** 2 for s in range(4)], 0)
  db = 10 * np.log10(env)
  line = db[:, cols.min():cols.max() + 1].mean(axis=1)
  away = cols.max() + 20 if cols.max() + 30 < 256 else cols.min() - 30
  beside = db[:, away:away + 10].mean(axis=1)
  assert np.all(line[100:240] - beside[100:240] > 10)
  assert abs(line[100:140].mean() - line[200:240].mean()) < 4
  assert abs(line[20:60].mean() - beside[20:60].mean()) < 1.5
  for i in range(6):  # the lung scenes draw no B-line in the echo map: only the ring-down map carries them
    rng = np.random.default_rng([6, i])
    scene = scenes.lung_2cls(Canvas(128, scenes.LINEAR), rng, 1)
    assert scene.ringdown is not None and scene.ringdown.max() > 0.8
    lung = scene.echo[int(np.argmax(scene.ringdown.any(axis=1))) + 4:]
    assert np.all(np.abs(lung - np.median(lung)) < 8)  # texture only, no bright stripes


def test_points_are_continuous_pixel_centre_coordinates():
  """Points follow the FMC_UIA / transforms convention (pixel (i, j) covers [j, j+1) x [i, i+1)): a landmark
  drawn on pixel (i, j) is (j + 0.5, i + 0.5), so a horizontal flip through the pipeline lands it on the
  mirrored pixel exactly."""
  for index in range(6):
    rec = sonosynth.sample("FUGC", index, seed=1, size=64)
    rng = np.random.default_rng([1, registry.get("FUGC").index, index])
    probe = generator._jitter_probe(scenes.SPECS["FUGC"].probe, rng)
    drawn = scenes.fugc(Canvas(64, probe), rng, -1).points
    np.testing.assert_allclose(rec.points, drawn + 0.5, atol=1e-5)
    pixel = np.round(drawn).astype(int)  # the pixel each landmark was drawn on
    rec.task = ""  # FUGC forbids flips (ordered landmarks); the geometry is what is tested here
    flipped = transforms.Pipeline(["resize", "flip(p=1.0)"], 64, channels=1)(rec)
    got = np.floor(flipped["points"][:2] * 64).astype(int)
    np.testing.assert_array_equal(got[:, 0], 63 - pixel[:, 0])
    np.testing.assert_array_equal(got[:, 1], pixel[:, 1])


def test_nuisances_are_opt_in_and_keep_labels_consistent():
  plain = sonosynth.sample("fetal_femur", 3, seed=0, size=128)
  assert "nuisance" not in plain.extra
  np.testing.assert_array_equal(sonosynth.sample("fetal_femur", 3, seed=0, size=128, nuisance=None).image, plain.image)
  text = sonosynth.sample("fetal_femur", 3, seed=0, size=128, nuisance="text")
  changed = text.image != plain.image
  assert 0 < changed.mean() < 0.1  # burnt-in text and ticks only
  np.testing.assert_allclose(text.points, plain.points)
  gain = sonosynth.sample("fetal_femur", 3, seed=0, size=128, nuisance="gain")
  fov = plain.image > 0
  shift = gain.image[fov].astype(float).mean() - plain.image[fov].astype(float).mean()
  assert abs(shift) > 2  # a gain change moves the whole image
  jpeg = sonosynth.sample("fetal_femur", 3, seed=0, size=128, nuisance="jpeg")
  err = np.abs(jpeg.image.astype(float) - plain.image)
  assert 1 < err.mean() < 25
  for task in ("fetal_femur", "thyroid_nodule_det", "cardiac_multi"):  # crops move the labels with the image
    for i in range(3):
      a = sonosynth.sample(task, i, seed=0, size=128)
      b = records.validate(sonosynth.sample(task, i, seed=0, size=128, nuisance="crop"))
      x0, y0, x1, y1 = b.extra["crop_box"]
      scale = 128 / (x1 - x0)
      assert 1.0 <= scale <= 1.26 and x1 - x0 == pytest.approx(y1 - y0)
      if a.points is not None:
        np.testing.assert_allclose(b.points, (a.points - [x0, y0]) * scale, atol=1e-4)
      if a.box is not None:
        np.testing.assert_allclose(b.box, np.clip((a.box - [x0, y0, x0, y0]) * scale, 0, 128), atol=1e-4)
      if a.mask is not None:  # the cropped mask still outlines what the cropped image shows
        before, after = measure.border_cnr(a.image, a.mask), measure.border_cnr(b.image, b.mask)
        assert min(after.values()) > 0.7 * min(before.values()), (before, after)
  cal = sonosynth.sample("fetal_femur", 3, seed=0, size=128, nuisance="calipers")
  for x, y in cal.points:  # a caliper mark sits on each landmark
    assert cal.image[int(y), int(x)] >= 200
  with pytest.raises(ConfigError, match="nuisance"):
    nuisance.parse("calipers,blur")
  assert nuisance.parse("all") == nuisance.NUISANCES


def test_bench_sonosynth_writes_rates_cnr_and_a_contact_sheet(tmp_path, capsys):
  out, sheet = tmp_path / "bench.json", tmp_path / "sheet.png"
  assert cli.main(["bench", "sonosynth", "--tasks", "lung,fetal_femur", "--sizes", "48", "--images", "2",
                   "--cnr-images", "2", "--cnr-size", "64", "--contact-sheet", str(sheet), "--sheet-size", "48",
                   "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["benchmark"] == "sonosynth"
  assert [(r["task"], r["size"]) for r in result["rows"]] == [("fetal_femur", 48), ("lung", 48)]
  assert all(r["images_per_s"] > 0 for r in result["rows"])
  assert [(r["task"], r["class"], r["samples"]) for r in result["cnr"]] == [("lung", 1, 2)]
  from PIL import Image
  assert Image.open(sheet).size == (6 * 48, 48)  # 2 tasks x 2 samples on one row of 6
  assert "images/s" in capsys.readouterr().out
