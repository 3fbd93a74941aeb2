"""sonosynth realism (issue 18): sampling without moire, resolution-independent grain, tissue-dependent
speckle statistics, specular angle dependence, clutter and reverberation, each measured against its target."""

import math
import time

import numpy as np
import pytest
from scipy import ndimage

from m2dino_jax.data.sonosynth import generator, physics, realism, scenes
from m2dino_jax.data.sonosynth.shapes import Canvas


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["convex", "phased"])
def test_sector_speckle_has_no_fixed_pattern(probe):
  """Issue 18 AC1: the per-pixel std of the display log-envelope over 2000 realisations of a homogeneous sector
  scene (128 px, the demo's size) is flat: 5th-95th percentile within +-0.3 dB of the median, and its lateral
  and axial spectra have no peak (no bin 3x the median of its 8 neighbours).

  Realisations are split in two halves: the covariance of the two halves' std maps is the fixed pattern (what
  a network could learn), the rest is the estimate's own noise (it shrinks as 1 / sqrt(n): at 400 realisations
  about +-0.15 dB of the spread is noise, at 2000 +-0.08). Measured: convex -0.21 / +0.21 dB, phased
  -0.27 / +0.22 dB, fixed-pattern std 0.12 / 0.14 dB, almost all of it a smooth depth trend (the grain is
  finer than a pixel near a phased array's apex, so the display averages more of it). Before the display's
  anti-alias filter was set in mm on both axes (laterally it was one depth sample wide, far under a pixel
  where the lines converge): convex -0.29 / +0.31 at 400, phased -0.37 / +0.25 at 1000; with the old
  display-resolution beam grid -0.63 / +1.07 dB."""
  f = realism.flatness(realism.quiet(probe), 128, 2000)
  assert -0.3 <= f["lo_db"] and f["hi_db"] <= 0.3, f
  assert f["fixed_db"] < 0.18, f  # the learnable part: a smooth depth trend of ~0.1 dB
  # A beam-sampling pattern (lines or samples every 0.3-0.5 px, aliased) would be a peak anywhere above the
  # smooth depth trend: each bin against the median of its 8 neighbours.
  assert f["peak_lateral"] < 3.0 and f["peak_axial"] < 3.0, f


@pytest.mark.parametrize("probe", ["convex", "phased"])
def test_grain_in_mm_does_not_depend_on_output_size(probe):
  """Issue 18 AC2: deep in the sector (75-92% of the depth) the lateral grain in mm at 256 px is that at 512 px
  within 10% (30 realisations; measured +8.4% convex, +5.1% phased).

  128 px is held to 30% only (measured +23% convex, +16% phased): there the grain (1.5 mm convex, 2.8 mm
  phased at 512 px) is 1.4-2.1 pixels of 1.12 / 1.33 mm. The ideal display of the same field at 128 px, the
  512 px envelope area-averaged 4 x 4, already reads +9% for both (a pixel's own area widens a grain that
  size); simulating at 256 px and averaging 2 x 2 gives +13% / +16%, a 4x beam grid with a 0.15 px filter
  +13% / +16%. The rest of the direct 128 px excess is the beam grid (2 samples per pixel) and the display
  filter. Only simulating at 512 px (16x the cost of a 128 px image) would reach the ideal, itself only just
  inside +-10%; so +-10% at 128 px is not asserted, 256 vs 512 is."""
  lateral = [realism.grain_mm(realism.quiet(probe), size, (0.75, 0.92), seeds=30)[0] for size in (128, 256, 512)]
  assert lateral[1] / lateral[2] == pytest.approx(1.0, abs=0.1), lateral
  assert 1.0 <= lateral[0] / lateral[2] <= 1.3, lateral


@pytest.mark.parametrize("probe", ["convex", "phased"])
def test_grain_is_elongated_laterally_and_grows_with_depth(probe):
  """Issue 18 AC2: at 128 px lateral / axial grain > 1.5 in the far field (85-98% of the depth; measured 1.64
  convex, 2.5 phased); at 256 px the deep lateral grain is > 1.3x the shallow one (measured 1.40 / 1.83).
  In the convex probe's focal zone (60-80% of the depth) the ratio is 1.3: the beam is narrowest there, and the
  axial grain at 128 px is pixel-limited (1.3 mm for a 0.43 mm pulse grain), as on any display that coarse."""
  p = realism.quiet(probe)
  lat, ax = realism.grain_mm(p, 128, (0.85, 0.98), seeds=8)
  assert lat / ax > 1.5, (lat, ax)
  shallow, _ = realism.grain_mm(p, 256, (0.3, 0.45), seeds=4)
  deep, _ = realism.grain_mm(p, 256, (0.75, 0.9), seeds=4)
  assert deep > 1.3 * shallow, (shallow, deep)  # the aperture stops growing, so the beam widens with depth


@pytest.mark.parametrize("density", [1.0, 0.25, 0.08])
def test_scatterer_density_sets_nakagami_m(density):
  """Sparse scatterers (fat) give K-distributed, pre-Rayleigh speckle: the Nakagami m = E[I]^2 / var(I)
  measured in a homogeneous region matches 1 / (1 + (k / p - 2) / C) within 10%."""
  probe = physics.dataclasses.replace(scenes.LINEAR, noise_db=None, clutter_db=None)
  size = 256
  dens = np.full((size, size), density, np.float32)
  m = []
  for seed in range(3):
    env = physics.envelope(np.zeros((size, size), np.float32), probe, np.random.default_rng(seed), density=dens)
    i = env[16:-16, 16:-16].astype(np.float64) ** 2
    m.append(i.mean() ** 2 / i.var())
  sigma_z, sigma_x = physics.psf_sigmas_px(probe, size, size)
  expected = physics.nakagami_m(density, sigma_z, float(sigma_x[16:-16].mean()))
  assert np.mean(m) == pytest.approx(expected, rel=0.1)
  if density == 1.0:
    assert np.mean(m) == pytest.approx(1.0, abs=0.05)  # dense: Rayleigh


def test_fat_layer_is_pre_rayleigh_in_a_scene():
  """In a breast scene the subcutaneous fat's envelope has Nakagami m < 0.8, the gland below m > 0.85."""
  rng = np.random.default_rng(0)
  probe = physics.dataclasses.replace(scenes.LINEAR, noise_db=None, clutter_db=None)
  cv = Canvas(256, probe)
  scenes.breast_3cls(cv, rng, 0)
  assert cv.density is not None
  fat = ndimage.binary_erosion(cv.density < 1, iterations=3)
  gland = np.zeros_like(fat)
  gland[140:200, 20:-20] = True
  flat = np.zeros((256, 256), np.float32)  # same mean level: only the statistics differ
  env = physics.envelope(flat, probe, rng, density=cv.density)
  m = {k: (env[r].astype(np.float64) ** 2).mean() ** 2 / (env[r].astype(np.float64) ** 2).var()
       for k, r in (("fat", fat), ("gland", gland))}
  assert m["fat"] < 0.8 < 0.85 < m["gland"], m


def test_tissues_differ_in_speckle_statistics_matching_their_settings():
  """Issue 18 AC3: fat, muscle, parenchyma and fluid give different envelope statistics: the Nakagami m measured in
  each region of one scene matches the theory for its scatterer density within 8% (measured fat 0.62, muscle
  0.79, parenchyma 1.02, fluid 0.99 at 256 px: theory 0.63 / 0.78 / 1.00 / 1.00), and fat < muscle < parenchyma
  by clear margins. Fluid has no scatterers of its own: what it shows is the clutter (sidelobes and multipath
  of the tissue around it), dense, so Rayleigh (m = 1) at -20..-25 dB (see the cyst test), not black."""
  m, theory = realism.tissue_m()
  for n in m:
    assert m[n] == pytest.approx(theory[n], rel=0.08), (n, m, theory)
  assert m["fat"] + 0.1 < m["muscle"] and m["muscle"] + 0.1 < m["parenchyma"], m


def test_skull_side_walls_are_darker_than_near_and_far_walls():
  """Specular bone: the ring is bright where the beam meets it square on, >= 10 dB darker edge-on."""
  ratios = [realism.skull_wall_ratio_db(index) for index in range(3)]
  assert min(ratios) >= 10.0, ratios



def test_organ_capsules_are_specular_too():
  """Issue 18 item 3 at soft-tissue interfaces: a kidney capsule (and the diaphragm, drawn the same way) is
  brightest where the beam meets it square on: >= 6 dB over where it runs along the beam (measured 7.8-8.9 dB
  over 3 scenes; the same scenes with an isotropic capsule read -1.2..0 dB)."""
  ratios = [realism.capsule_ratio_db(index) for index in range(3)]
  assert min(ratios) >= 6.0, ratios


def test_cyst_reads_clutter_level_not_black():
  """Anechoic fluid with the scanners' clutter floor reads -20..-25 dB re tissue, not -45 dB."""
  assert -25.0 <= realism.cyst_db() <= -20.0



def test_a_lines_come_from_reverberation_at_multiples_of_the_pleural_depth():
  """A mirror at depth d (no A-lines drawn) gives echoes at 2d and 3d, fading by the per-bounce ratio."""
  a = realism.a_lines(256, depth=60, ratio_db=-8.0)
  for k in (2, 3):
    assert abs(a[f"echo{k}_offset_px"]) <= 2, a
    assert a[f"echo{k}_above_db"] > 10, a  # the line is there only because of the mirror
  assert a["fade_db"] == pytest.approx(8.0, abs=2.0), a



@pytest.mark.slow
def test_every_task_makes_60_images_per_cpu_second_at_256px():
  """Issue 18 AC6: every task >= 60 images per CPU second at 256 px, cardiac included (measured 77-240).

  CPU seconds of this process (`time.process_time`), so other jobs on the machine do not count; BLAS pools
  held to one thread (scipy.fft and the sparse scan conversion are single-threaded already). Steady state:
  the geometry and all PSF filters of the task are built first, as a data loader has them after a few
  dozen images. 6 images per task, taken in rounds so that load changes hit every task alike."""
  from threadpoolctl import threadpool_limits

  from m2dino_jax.tasks import registry
  names = [t.name for t in registry.TASKS]
  cpu = dict.fromkeys(names, 0.0)
  n = 6
  with threadpool_limits(1):
    for t in names:
      generator.warm_caches(t, 256)
      generator.sample(t, 0, seed=0, size=256)
    for i in range(1, n + 1):
      for t in names:
        t0 = time.process_time()
        generator.sample(t, i, seed=0, size=256)
        cpu[t] += time.process_time() - t0
  rates = {t: n / cpu[t] for t in names}
  slow = {t: round(r, 1) for t, r in rates.items() if r < 60.0}
  assert not slow, (slow, min(rates.values()))


def test_cardiac_is_no_longer_the_slow_task():
  """The phased array's apex blur is capped: cardiac_multi within 1.5x the time of another sector task."""
  def per_image(task):
    generator.sample(task, 0, seed=0, size=256)
    t0 = time.process_time()
    for i in range(1, 5):
      generator.sample(task, i, seed=0, size=256)
    return (time.process_time() - t0) / 4
  assert per_image("cardiac_multi") < 1.5 * per_image("fetal_head")
  assert math.isfinite(per_image("cardiac_multi"))


@pytest.mark.slow
def test_bench_stats_prints_every_realism_check(tmp_path, capsys):
  """`m2dino bench sonosynth --stats` prints the realism table (the numbers of issue 18's note) and writes it."""
  from m2dino_jax import cli, fileio
  out = tmp_path / "stats.json"
  assert cli.main(["bench", "sonosynth", "--images", "0", "--cnr-images", "0", "--stats",
                   "--stats-realisations", "40", "--out", str(out)]) in (0, None)
  text = capsys.readouterr().out
  for check in ("log-envelope std convex 256px", "per-pixel log-std p5/p95", "lateral/axial phased 128px",
                "Nakagami m muscle", "skull near-far", "cyst re tissue", "A-lines at k x pleural depth"):
    assert check in text, check
  stats = {r["check"]: r for r in fileio.read_json(out)["stats"]}
  assert all(stats[f"Nakagami m {t}"]["ok"] for t in realism.TISSUES)
  assert stats["cyst re tissue"]["ok"] and stats["skull near-far / side walls (3 scenes)"]["ok"]
