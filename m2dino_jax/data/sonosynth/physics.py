"""B-mode image formation by the standard convolution model of ultrasound.

A scene gives, on the output image grid, a backscatter (echogenicity) map in dB relative to
soft tissue and an attenuation map in dB/cm/MHz. `simulate` turns it into an 8-bit B-mode image:

1. the maps are resampled onto the beam grid (depth x scan line; for a sector probe polar and at
   least 2x finer than the display, see `scan`);
2. the backscatter power gets clutter (a floor with near-field haze), the round-trip attenuation
   integrated along each beam beyond what time-gain compensation undoes (fluid gives posterior
   enhancement, bone a shadow; `Probe.auto_tgc`: the operator's sliders take back most of the
   enhancement below wide fluid), the reverberations of specular plates (A-lines) and the ring-down
   tails of resonators at the pleura (B-lines);
3. a random scatterer field (dense: fully developed speckle; sparse where `density` < 1: K-distributed,
   pre-Rayleigh texture) is weighted by the amplitude and convolved, by FFT, with the baseband (IQ)
   point-spread function: a Gaussian pulse envelope along depth set by the centre frequency and
   bandwidth, and a Gaussian beam across lines whose width depends on depth (transmit focus, dynamic
   receive limited by the array aperture, see `psf_sigmas_px`). Both kernels have unit energy, so 0 dB
   tissue gives an envelope with E[env^2] = 1 at every depth;
4. electronic noise is added; envelope detection |IQ|; area-averaging scan conversion; the operator's
   gain (optional, `simulate(gain_db=)`); log compression.

Working in baseband is exactly equivalent to RF convolution followed by Hilbert envelope
detection, and it needs no sampling of the carrier, so a 256 x 256 image costs a few FFTs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import scipy.fft
from scipy import ndimage

from m2dino_jax.data.sonosynth import scan

SPEED_OF_SOUND_MM_US = 1.54
# E[20 log10 R] for a Rayleigh amplitude R with E[R^2] = 1 is 10 log10(exp(-Euler gamma)).
LOG_RAYLEIGH_MEAN_DB = -10.0 * 0.5772156649015329 / math.log(10.0)
ANTI_ALIAS_SIGMA = 0.5  # PSF floor in display pixels: the scanner's decimation filter before display (linear)
# Sector: the area-averaging scan conversion is itself a (box) decimation filter, so the Gaussian floor before it
# is smaller; 0.5 px on top of the box blurred sub-pixel grain by ~40% at 128 px (issue 18 grain target).
SECTOR_ANTI_ALIAS_SIGMA = 0.3
MAX_LATERAL_SIGMA_PX = 24.0  # cap, in lines: a phased array's apex would otherwise blur ~500 lines
HAZE_DB, HAZE_DEPTH_MM = 10.0, 8.0  # near-field clutter: clutter_db + HAZE_DB at the skin, e-folding depth
RINGDOWN_SPACING_MM = 0.5  # bounce spacing of a ring-down resonator (fluid trapped between air bubbles)


@dataclasses.dataclass(frozen=True)
class Probe:
  """Transducer, beamforming and display settings (lengths in mm, frequency in MHz)."""
  geometry: str = "linear"  # 'linear' (rectangular field) or 'sector' (scan-converted fan)
  depth_mm: float = 40.0  # imaging depth along each beam
  width_mm: float = 40.0  # linear: field-of-view width
  angle_deg: float = 70.0  # sector: full opening angle
  apex_mm: float = 0.0  # sector: virtual apex to skin (0 = phased array, > 0 = convex)
  f0_mhz: float = 7.5
  bandwidth: float = 0.6  # fractional -6 dB pulse-echo bandwidth
  f_number: float = 2.0
  focus_mm: float = 20.0
  nominal_atten: float = 0.5  # dB/cm/MHz of soft tissue, what TGC assumes
  tgc: float = 1.0  # fraction of the nominal attenuation that TGC compensates
  dynamic_range_db: float = 60.0
  tissue_grey: float = 0.45  # display level of 0 dB tissue (mean of log speckle), in [0, 1]
  noise_db: float | None = -50.0  # electronic noise re 0 dB tissue at the skin; None = off
  aperture_mm: float | None = None  # the array's largest active aperture (None = as large as F# needs)
  clutter_db: float | None = None  # clutter power re 0 dB tissue (sidelobes, multipath); None = off
  auto_tgc: float = 0.0  # fraction of the median (over scan lines) excess loss per depth the operator's TGC undoes

  def __post_init__(self):
    if self.geometry not in ("linear", "sector"):
      raise ValueError(f"probe geometry must be 'linear' or 'sector', got {self.geometry!r}")

  @property
  def wavelength_mm(self) -> float:
    return SPEED_OF_SOUND_MM_US / self.f0_mhz


def geometry(probe: Probe, h: int, w: int) -> scan.Geometry:
  """The beam/image grid mapping of `probe` at h x w pixels (cached on the geometric settings only)."""
  return scan.geometry(probe.geometry, probe.depth_mm, probe.width_mm, probe.angle_deg, probe.apex_mm, h, w)


def psf_sigmas_px(probe: Probe, h: int, w: int) -> tuple[float, np.ndarray]:
  """Gaussian PSF standard deviations on the beam grid: (axial scalar, lateral per depth row [nz]).

  Lateral: the two-way beam is the product of the transmit beam (fixed focus: diffraction limit
  lambda * focus / aperture at the focus, the aperture's geometric cone away from it) and the receive
  beam (dynamic focusing at F# = max(f_number, depth / aperture): diffraction-limited until the array's
  full aperture is in use, then widening in proportion to depth), so 1/s^2 = 1/s_tx^2 + 1/s_rx^2.
  Both get the display's anti-alias filter in quadrature, in mm on both axes (ANTI_ALIAS_SIGMA display
  pixels for a linear probe, SECTOR_ANTI_ALIAS_SIGMA before a sector's area-averaging scan conversion; in
  lines it is wider near a sector's apex, where lines converge); the lateral one is capped at
  MAX_LATERAL_SIGMA_PX lines (a phased array's apex).
  """
  geo = geometry(probe, h, w)
  # Gaussian pulse with -6 dB bandwidth B*f0: sigma_t = sqrt(2 ln 2) / (pi B f0); depth = c t / 2.
  sigma_t_us = math.sqrt(2 * math.log(2)) / (math.pi * probe.bandwidth * probe.f0_mhz)
  sigma_z_mm = SPEED_OF_SOUND_MM_US * sigma_t_us / 2
  fwhm = 2 * math.sqrt(2 * math.log(2))
  aperture = probe.aperture_mm or math.inf
  rx_f_number = np.maximum(probe.f_number, geo.depth_mm / aperture)
  sigma_rx_mm = probe.wavelength_mm * rx_f_number / fwhm
  tx_aperture = min(probe.focus_mm / probe.f_number, aperture)
  sigma_focus_mm = probe.wavelength_mm * probe.focus_mm / tx_aperture / fwhm
  sigma_cone_mm = tx_aperture / fwhm * np.abs(geo.depth_mm - probe.focus_mm) / probe.focus_mm
  sigma_tx_mm = np.sqrt(sigma_focus_mm ** 2 + sigma_cone_mm ** 2)
  sigma_x_mm = 1.0 / np.sqrt(1.0 / sigma_tx_mm ** 2 + 1.0 / sigma_rx_mm ** 2)
  # the display filter, in mm on both axes (a sector's lines converge: in lines it is wider near the apex)
  floor_mm = (ANTI_ALIAS_SIGMA if geo.to_image is None else SECTOR_ANTI_ALIAS_SIGMA) * geo.spacing_mm[1]
  sigma_z = math.hypot(sigma_z_mm, floor_mm) / geo.depth_step_mm
  sigma_x = np.minimum(np.hypot(sigma_x_mm, floor_mm) / geo.line_step_mm, MAX_LATERAL_SIGMA_PX)
  return sigma_z, sigma_x


def _unit_energy_gaussian_tf(sigma: np.ndarray, n: int) -> np.ndarray:
  """DFT of Gaussian kernels (one per entry of `sigma`) scaled so each kernel has sum(h^2) = 1.
  Real (a centred Gaussian's transform), float32: half the memory and multiply of a complex one."""
  f = scipy.fft.fftfreq(n)
  tf = np.exp(-2 * np.pi ** 2 * np.asarray(sigma, np.float64).reshape(-1, 1) ** 2 * f ** 2)
  energy = np.mean(tf ** 2, axis=-1, keepdims=True)  # Parseval: sum h^2 = mean |H|^2
  return (tf / np.sqrt(energy)).astype(np.float32)


def _filters(probe: Probe, h: int, w: int):
  """Padding (tissue continues beyond the field) and the FFT transfer functions on the padded grid."""
  beam = dataclasses.replace(probe, dynamic_range_db=60.0, tissue_grey=0.45, noise_db=None, tgc=1.0,
                             nominal_atten=0.5, clutter_db=None, auto_tgc=0.0)  # cache key: what shapes the PSF
  return _filters_cached(beam, h, w)


@functools.lru_cache(maxsize=128)
def _filters_cached(probe: Probe, h: int, w: int):
  sigma_z, sigma_x = psf_sigmas_px(probe, h, w)
  nz, nl = geometry(probe, h, w).shape
  pad_x = int(math.ceil(4 * sigma_x.max()))
  pad_z = int(math.ceil(4 * sigma_z))
  nx = scipy.fft.next_fast_len(nl + 2 * pad_x)
  nzp = scipy.fft.next_fast_len(nz + 2 * pad_z)
  sigma_x_padded = np.pad(sigma_x, pad_z, mode="edge")
  tf_x = _unit_energy_gaussian_tf(sigma_x_padded, nx)
  tf_z = _unit_energy_gaussian_tf(np.array([sigma_z]), nzp)[0][:, None]
  return tf_x, tf_z, pad_x, pad_z


def warm(probe: Probe, h: int, w: int) -> None:
  """Build (and cache) the geometry and PSF filters of `probe` at h x w."""
  geometry(probe, h, w)
  _filters(probe, h, w)


def _to_beam(image_map: np.ndarray, geo: scan.Geometry) -> np.ndarray:
  return image_map if geo.to_beam is None else geo.to_beam(image_map)


def _density_to_beam(density: np.ndarray, geo: scan.Geometry) -> np.ndarray:
  """The scatterer density on the beam grid, resampling only the beam rows that reach sparse tissue
  (fat lies in shallow layers; the rest of the field is dense)."""
  sparse_rows = np.flatnonzero((density < 1).any(axis=1))
  if geo.to_beam is None or not sparse_rows.size:
    return np.clip(_to_beam(density, geo), 0, 1)
  out = np.ones(geo.shape, np.float32)
  reach = int(np.searchsorted(geo.to_beam.min_src_row, sparse_rows[-1] + 2))  # deeper rows read dense pixels
  if reach:
    out[:reach] = np.clip(geo.to_beam(density, rows=reach), 0, 1)
  return out


def _scatterer_tables():
  """256-entry amplitude table (Rayleigh quantiles, E|s|^2 = 1) and 256 phases: a byte each."""
  q = (np.arange(256) + 0.5) / 256
  amp = np.sqrt(-np.log1p(-q))
  amp /= np.sqrt(np.mean(amp ** 2))
  phase = np.exp(2j * np.pi * (np.arange(256) + 0.5) / 256)
  return amp.astype(np.float32), phase.astype(np.complex64), float(np.mean(amp ** 4))


_AMP, _PHASE, SCATTERER_KURTOSIS = _scatterer_tables()  # kurtosis E|s|^4 = 1.98 (complex Gaussian: 2)


def scatterers(shape, rng: np.random.Generator, density=None) -> np.ndarray:
  """Complex scatterer field with E|s|^2 = 1 per sample, from random bytes via two small tables.

  Amplitudes are Rayleigh quantiles and phases uniform, so the field is (to 1%) circular complex
  Gaussian, at a quarter of the cost of normal deviates. `density` (in (0, 1] per sample; None = 1)
  keeps each scatterer with that probability and scales the survivors by 1/sqrt(density): the mean
  power is unchanged but, with few scatterers per resolution cell, the envelope is K-distributed
  (pre-Rayleigh, Nakagami m < 1, see `nakagami_m`) as in fat.
  """
  n = int(np.prod(shape))
  b = np.frombuffer(rng.bytes(2 * n), np.uint8)
  field = (_PHASE[b[n:]] * _AMP[b[:n]]).reshape(shape)
  if density is not None:  # only the rows holding sparse tissue (fat lies in layers) pay for the thinning
    rows = np.flatnonzero(np.min(density, axis=tuple(range(1, density.ndim))) < 1)
    if rows.size:
      d = density[rows[0]:rows[-1] + 1]
      keep = np.frombuffer(rng.bytes(d.size), np.uint8).reshape(d.shape) < np.round(d * 256)
      field[rows[0]:rows[-1] + 1] *= np.where(keep, 1.0 / np.sqrt(np.maximum(d, 1 / 256)), 0.0).astype(np.float32)
  return field


def nakagami_m(density: float, sigma_z: float, sigma_x: float) -> float:
  """Theoretical Nakagami m of the envelope for scatterer `density` and a Gaussian PSF (samples).

  For a sum of independent circular terms h_i s_i b_i / sqrt(p): E[I^2]/E[I]^2 = 2 + (k/p - 2) / C with
  k = E|s|^4 and C = (sum h^2)^2 / sum h^4 = 2 pi sigma_z sigma_x the cell count; m = 1 / (E[I^2]/E[I]^2 - 1).
  """
  cells = 2 * math.pi * sigma_z * sigma_x
  return 1.0 / (1.0 + (SCATTERER_KURTOSIS / density - 2.0) / cells)


def _reverberation(power: np.ndarray, mirror: np.ndarray, loss_excess_db: np.ndarray) -> np.ndarray:
  """Multiple reflections between the probe face and the shallowest mirror of each beam line.

  `mirror` [nz, nl]: per-bounce power ratio (0..1) where a specular, plate-like reflector (the pleura)
  lies, 0 elsewhere. The echo of a mirror at depth d comes back again at 2d, 3d, ... (the pulse
  bounces probe -> mirror -> probe), the k-th time weaker by (ratio * excess loss)^(k - 1), where the
  excess loss is what TGC does not undo on the way (a rib's shadow kills its own A-lines).
  Returns the reverberation power to add; A-lines of a normal lung arise here rather than being drawn.
  """
  nz, nl = power.shape
  has = mirror.max(axis=0) > 0.01
  if not has.any():
    return np.zeros_like(power)
  first = np.argmax(mirror > 0.01, axis=0)  # shallowest mirror sample per line
  ratio = mirror.max(axis=0)
  rows = np.arange(nz)[:, None]
  band = (rows >= first[None, :]) & (rows < first[None, :] + 4) & (mirror > 0.01)
  primary = np.where(band, power, 0.0)
  gain = ratio * np.power(10.0, -np.maximum(loss_excess_db[np.minimum(first, nz - 1), np.arange(nl)], 0) / 10)
  out = np.zeros_like(power)
  d = first + 0.5  # depth of the mirror in samples: its k-th echo comes back from depth k * d
  for k in range(2, 12):
    src = rows - np.round((k - 1) * d[None, :]).astype(np.int64)
    ok = (src >= 0) & has[None, :]
    if not ok.any():
      break
    out += np.where(ok, np.take_along_axis(primary, np.clip(src, 0, nz - 1), axis=0), 0.0) * gain ** (k - 1)
  return out.astype(np.float32)


def _slider_profile(excess_db: np.ndarray, step_mm: float) -> np.ndarray:
  """The TGC sliders an operator (or a scanner's automatic optimisation) sets: per depth, the median over
  scan lines of the enhancement the nominal TGC leaves (the negative part of the excess loss: below fluid,
  which barely attenuates), smoothed over about 8 mm as a slider bank is. Shadows are left alone (no one
  turns the gain up into a bone's shadow), a few enhanced lines do not move it, a wide fluid layer does."""
  nl = excess_db.shape[1]
  profile = np.median(np.minimum(excess_db[:, :: max(1, nl // 64)], 0.0), axis=1)
  sigma = 8.0 / step_mm / 2.355
  return ndimage.gaussian_filter1d(profile.astype(np.float64), sigma, mode="nearest").astype(np.float32)


def _ringdown(power: np.ndarray, ring: np.ndarray, tgc_db: np.ndarray, step_mm: float) -> np.ndarray:
  """Ring-down tails (B-lines) of resonators: fluid trapped among air bubbles at the pleura.

  `ring` [nz, nl]: per-bounce power ratio (0..1) where a resonator lies, 0 elsewhere. The pulse trapped in
  it re-emits every RINGDOWN_SPACING_MM of depth, each time weaker by the ratio, for as long as it rings,
  so the echo continues below the resonator as a vertical line. Its energy travels no further than the
  resonator (no tissue attenuation beyond it) while the TGC keeps raising the gain with time: a ratio near
  1 gives the laser-like line that does not fade to the bottom of the image. Returns the power to add.
  """
  nz, nl = power.shape
  out = np.zeros_like(power)
  lines = np.flatnonzero(ring.max(axis=0) > 0.01)  # only the lines through a resonator
  if not lines.size:
    return out
  sub = ring[:, lines]
  first = np.argmax(sub > 0.01, axis=0)
  source = power[first, lines]
  ratio_db = (10.0 * np.log10(np.maximum(sub.max(axis=0), 1e-6))).astype(np.float32)
  rows = np.arange(nz, dtype=np.float32)[:, None]
  steps = (rows - first[None, :]) * np.float32(step_mm / RINGDOWN_SPACING_MM)
  db = steps * ratio_db[None, :] + (tgc_db[:, None] - tgc_db[first][None, :]).astype(np.float32)
  tail = source[None, :] * np.power(np.float32(10.0), np.minimum(db, 30.0) / np.float32(10.0))
  out[:, lines] = np.where(rows > first[None, :], tail, 0.0)
  return out


def envelope(echo_db: np.ndarray, probe: Probe, rng: np.random.Generator, atten=None, density=None,
             mirror=None, ringdown=None) -> np.ndarray:
  """Detected envelope on the beam grid [nz, nl] (before log compression); 0 dB tissue has E[env^2] = 1.

  `echo_db`: backscatter level in dB re soft tissue on the image grid [H, W].
  `atten`: attenuation in dB/cm/MHz on the image grid, or None for the nominal value everywhere.
  `density`: scatterers per beam sample in (0, 1] on the image grid (None = 1: fully developed speckle).
  `mirror`: per-bounce reverberation power ratio (0..1) on the image grid where a specular plate lies.
  `ringdown`: per-bounce power ratio (0..1) on the image grid where a ring-down resonator lies (B-lines).
  Clutter (probe.clutter_db, sidelobes and multipath, speckled like tissue) is added to the backscatter
  power, with near-field haze decaying over the first centimetres: a cyst reads about -22 dB, not black.
  """
  h, w = echo_db.shape
  geo = geometry(probe, h, w)
  nz, nl = geo.shape
  power = np.power(np.float32(10.0), _to_beam(np.asarray(echo_db, np.float32), geo) / np.float32(10.0))
  if probe.clutter_db is not None:
    haze = probe.clutter_db + HAZE_DB * np.exp(-geo.depth_mm / HAZE_DEPTH_MM)
    power = power + np.power(10.0, haze / 10.0).astype(np.float32)[:, None]
  # Round-trip attenuation integrated along each beam (to the middle of each sample) and TGC.
  two_way = 2 * probe.f0_mhz * geo.depth_step_mm / 10.0  # dB per (dB/cm/MHz) per sample
  tgc_db = probe.tgc * probe.nominal_atten * two_way * (np.arange(nz) + 0.5)
  if atten is None:
    loss_db = np.broadcast_to((np.arange(nz) + 0.5)[:, None] * (probe.nominal_atten * two_way), (nz, nl))
  else:
    a = _to_beam(np.asarray(atten, np.float32), geo) * two_way
    loss_db = np.cumsum(a, axis=0) - 0.5 * a
  excess_db = loss_db - tgc_db.astype(np.float32)[:, None]  # float32: the maps are, and it halves the work
  if probe.auto_tgc and atten is not None:
    excess_db = excess_db - probe.auto_tgc * _slider_profile(excess_db, geo.depth_step_mm)[:, None]
  power = power * np.power(np.float32(10.0), excess_db * np.float32(-0.1))
  reverb = None
  if mirror is not None:
    reverb = _reverberation(power, _to_beam(np.asarray(mirror, np.float32), geo), excess_db)
  if ringdown is not None:
    ring = _ringdown(power, _to_beam(np.asarray(ringdown, np.float32), geo), tgc_db, geo.depth_step_mm)
    reverb = ring if reverb is None else reverb + ring
  if reverb is not None:
    power = power + reverb
  amp = np.sqrt(power)

  tf_x, tf_z, pad_x, pad_z = _filters(probe, h, w)
  pad = ((pad_z, pad_z), (pad_x, pad_x))  # tissue continues beyond the field
  dens = None if density is None else np.pad(_density_to_beam(np.asarray(density, np.float32), geo), pad, mode="edge")
  amp = np.pad(amp, pad, mode="edge")
  field = scatterers(amp.shape, rng, dens) * amp
  field = scipy.fft.ifft(scipy.fft.fft(field, n=tf_x.shape[1], axis=1) * tf_x, axis=1)
  field = scipy.fft.ifft(scipy.fft.fft(field[:, pad_x:pad_x + nl], n=tf_z.shape[0], axis=0) * tf_z, axis=0)
  field = field[pad_z:pad_z + nz]
  if probe.noise_db is not None:
    gain = np.power(10.0, (tgc_db + probe.noise_db) / 20.0).astype(np.float32)
    field = field + scatterers((nz, nl), rng) * gain[:, None]
  return np.abs(field).astype(np.float32)


def log_compress(env: np.ndarray, probe: Probe) -> np.ndarray:
  """Envelope -> display level in [0, 1]: 0 dB tissue speckle averages `probe.tissue_grey`."""
  db = 20.0 * np.log10(np.maximum(env, 1e-12)) - LOG_RAYLEIGH_MEAN_DB
  return np.clip(db / probe.dynamic_range_db + probe.tissue_grey, 0.0, 1.0)


def scan_convert(beam_img: np.ndarray, probe: Probe, h: int, w: int) -> np.ndarray:
  """Beam grid -> h x w image grid (identity for a linear probe, area average for a sector); outside the fan 0."""
  return scan.to_image(beam_img, geometry(probe, h, w), h, w)


def display_envelope(echo_db, probe: Probe, rng, atten=None, density=None, mirror=None,
                     ringdown=None) -> np.ndarray:
  """The envelope as displayed (area-averaged onto the image grid), before log compression."""
  h, w = echo_db.shape
  return scan_convert(envelope(echo_db, probe, rng, atten, density, mirror, ringdown), probe, h, w)


def simulate(echo_db: np.ndarray, probe: Probe, rng: np.random.Generator, atten=None, density=None,
             mirror=None, ringdown=None, gain_db=None) -> np.ndarray:
  """Scene maps on the image grid -> uint8 B-mode image of the same size.

  `gain_db` (scalar or [H, W]): the operator's overall gain and TGC sliders, added to the displayed echo
  before log compression (None = the preset's gain: 0 dB tissue at `probe.tissue_grey`)."""
  h, w = echo_db.shape
  env = display_envelope(echo_db, probe, rng, atten, density, mirror, ringdown)
  if gain_db is not None:
    env = env * np.power(10.0, np.asarray(gain_db, np.float32) / 20.0).astype(np.float32)
  display = np.where(geometry(probe, h, w).fov, log_compress(env, probe), 0.0)
  return np.round(display * 255.0).astype(np.uint8)
