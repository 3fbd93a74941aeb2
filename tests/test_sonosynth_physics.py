"""sonosynth image formation against speckle theory and plain references."""

import math

import numpy as np
import pytest
from scipy import ndimage

from m2dino_jax.data.sonosynth import physics, scan

QUIET = physics.Probe("linear", depth_mm=40.0, width_mm=40.0, f0_mhz=7.5, focus_mm=20.0, noise_db=None)
RAYLEIGH_MEAN_OVER_STD = math.sqrt(math.pi / 2) / math.sqrt(2 - math.pi / 2)  # 1.913


def _env(echo, probe=QUIET, seed=0, atten=None):
  return physics.envelope(np.asarray(echo, np.float32), probe, np.random.default_rng(seed), atten)


def test_rayleigh_speckle_in_homogeneous_tissue():
  env = _env(np.zeros((256, 256)))[16:-16, 16:-16]
  assert RAYLEIGH_MEAN_OVER_STD == pytest.approx(1.913, abs=1e-3)
  assert env.mean() / env.std() == pytest.approx(RAYLEIGH_MEAN_OVER_STD, rel=0.05)
  assert np.mean(env ** 2) == pytest.approx(1.0, rel=0.05)  # unit-energy PSF: 0 dB tissue has E[env^2] = 1


def test_rayleigh_on_sector_beam_grid_and_tgc_flattens_depth():
  probe = physics.Probe("sector", depth_mm=100.0, angle_deg=60.0, apex_mm=40.0, f0_mhz=3.5, focus_mm=50.0,
                        noise_db=None)
  h = 192
  env = _env(np.zeros((h, h)), probe, atten=np.full((h, h), probe.nominal_atten))[8:-8, 8:-8]
  assert env.mean() / env.std() == pytest.approx(RAYLEIGH_MEAN_OVER_STD, rel=0.05)
  bands = [np.mean(b ** 2) for b in np.array_split(env, 4, axis=0)]  # TGC undoes the nominal loss
  np.testing.assert_allclose(bands, 1.0, rtol=0.1)


@pytest.mark.parametrize("contrast_db", [-20.0, -6.0, 6.0])
def test_lesion_contrast_matches_configuration(contrast_db):
  yy, xx = np.mgrid[:256, :256]
  r = np.hypot(yy - 128, xx - 128)
  echo = np.where(r < 70, contrast_db, 0.0)
  envs = [_env(echo, seed=s) for s in range(2)]
  inside = r < 60
  outside = (r > 82) & (yy > 12) & (yy < 244) & (xx > 12) & (xx < 244)
  power_in = np.mean([np.mean(e[inside] ** 2) for e in envs])
  power_out = np.mean([np.mean(e[outside] ** 2) for e in envs])
  assert 10 * np.log10(power_in / power_out) == pytest.approx(contrast_db, abs=1.0)


def _lateral_fwhm(env, rows):
  """FWHM (pixels) of the lateral autocovariance of the intensity, averaged over `rows`."""
  intensity = env[rows].astype(np.float64) ** 2
  x = intensity - intensity.mean(axis=1, keepdims=True)
  n = x.shape[1]
  spec = np.fft.rfft(x, n=2 * n, axis=1)
  acov = np.fft.irfft(np.abs(spec) ** 2, axis=1)[:, :n].mean(axis=0)
  acov /= acov[0]
  k = int(np.argmax(acov < 0.5))
  half = k - 1 + (acov[k - 1] - 0.5) / (acov[k - 1] - acov[k])  # linear interpolation
  return 2 * half


def test_speckle_grain_grows_with_psf_and_matches_theory():
  """For a Gaussian PSF of std s the intensity autocovariance is a Gaussian of std s: FWHM 2.355 s."""
  rows = slice(112, 144)  # around the 20 mm focus: the beam width is nearly constant there
  measured, predicted = [], []
  for f_number in (1.5, 3.0, 6.0):
    probe = physics.Probe("linear", f_number=f_number, focus_mm=20.0, noise_db=None)
    env = _env(np.zeros((256, 256)), probe, seed=3)
    measured.append(_lateral_fwhm(env, rows))
    _, sigma_x = physics.psf_sigmas_px(probe, 256, 256)
    predicted.append(2 * math.sqrt(2 * math.log(2)) * sigma_x[rows].mean())
  assert measured[0] < measured[1] < measured[2]
  np.testing.assert_allclose(measured, predicted, rtol=0.15)


def test_axial_grain_shrinks_with_bandwidth():
  def axial_fwhm(bandwidth):
    probe = physics.Probe("linear", f0_mhz=3.0, bandwidth=bandwidth, noise_db=None)
    env = _env(np.zeros((256, 256)), probe, seed=4)
    return _lateral_fwhm(env.T, slice(16, 240))
  assert axial_fwhm(0.3) > 1.5 * axial_fwhm(0.9)


def test_shadow_depth_matches_integrated_attenuation():
  """A 2 mm layer of 5 dB/cm/MHz extra attenuation at 7.5 MHz costs 2 * 7.5 * 4.5 * 0.2 = 13.5 dB."""
  h = 256
  atten = np.full((h, h), QUIET.nominal_atten, np.float32)
  rows_per_mm = h / QUIET.depth_mm
  top = 80
  atten[top:top + int(round(2 * rows_per_mm)), 64:192] = 5.0
  env = _env(np.zeros((h, h)), atten=atten, seed=5)
  below = np.mean(env[140:240, 90:166] ** 2)
  beside = np.mean(np.concatenate([env[140:240, 8:40], env[140:240, 216:248]], axis=1) ** 2)
  expected = 2 * QUIET.f0_mhz * (5.0 - QUIET.nominal_atten) * 0.2
  assert 10 * np.log10(beside / below) == pytest.approx(expected, abs=1.0)


def test_bilinear_sampler_matches_map_coordinates():
  rng = np.random.default_rng(0)
  src = rng.random((40, 50)).astype(np.float32)
  coords = np.stack([rng.uniform(-3, 43, (30, 35)), rng.uniform(-3, 53, (30, 35))]).astype(np.float32)
  ours = scan.Bilinear(coords, src.shape)(src)
  ref = ndimage.map_coordinates(src, coords, order=1, mode="nearest")
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_sector_geometry_round_trip_and_fan():
  """The beam grid is >= 2x finer than the display; a depth ramp scan-converts to the distance from the apex."""
  probe = physics.Probe("sector", depth_mm=80.0, angle_deg=60.0, apex_mm=20.0)
  geo = physics.geometry(probe, 128, 128)
  nz, nl = geo.shape
  s = geo.spacing_mm[0]
  assert geo.depth_step_mm <= s / 2 + 1e-9 and geo.line_step_mm.max() <= s / 2 + 1e-9
  ramp = np.tile(((np.arange(nz) + 0.5) / nz).astype(np.float32)[:, None], (1, nl))  # depth / depth_mm
  img = physics.scan_convert(ramp, probe, 128, 128)
  assert np.all(img[~geo.fov] == 0)
  yy, xx = np.mgrid[:128, :128]
  top = probe.apex_mm * math.cos(math.radians(30))
  r = np.hypot((xx + 0.5 - 64) * s, top + (yy + 0.5) * s)
  expected = (r - probe.apex_mm) / probe.depth_mm
  inner = ndimage.binary_erosion(geo.fov, iterations=2)
  np.testing.assert_allclose(img[inner], expected[inner], atol=0.01)


def test_simulate_is_deterministic_for_a_seed():
  echo = np.zeros((64, 64), np.float32)
  a = physics.simulate(echo, QUIET, np.random.default_rng(7))
  b = physics.simulate(echo, QUIET, np.random.default_rng(7))
  c = physics.simulate(echo, QUIET, np.random.default_rng(8))
  assert a.dtype == np.uint8 and a.shape == (64, 64)
  np.testing.assert_array_equal(a, b)
  assert np.mean(a != c) > 0.5


def test_log_compression_places_tissue_at_its_grey_level():
  """The mean of log-compressed 0 dB speckle is `tissue_grey` (Euler-gamma offset of log-Rayleigh)."""
  env = _env(np.zeros((256, 256)))[16:-16, 16:-16]
  probe = physics.Probe(dynamic_range_db=60.0, tissue_grey=0.45)
  assert physics.log_compress(env, probe).mean() == pytest.approx(0.45, abs=0.01)
