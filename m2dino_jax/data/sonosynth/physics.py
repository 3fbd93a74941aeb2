"""B-mode image formation by the standard convolution model of ultrasound.

A scene gives, on the output image grid, a backscatter (echogenicity) map in dB relative to
soft tissue and an attenuation map in dB/cm/MHz. `simulate` turns it into an 8-bit B-mode image:

1. the maps are resampled onto the beam grid (depth x scan line; polar for a sector probe);
2. a complex Gaussian scatterer field (many random scatterers per resolution cell, so the echo is
   fully developed speckle) is weighted by the backscatter amplitude and by the round-trip
   attenuation integrated along each beam (fluid gives posterior enhancement, bone a shadow);
3. the field is convolved, by FFT, with the baseband (IQ) point-spread function: a Gaussian pulse
   envelope along depth set by the centre frequency and bandwidth, and a Gaussian beam across lines
   whose width depends on depth (diffraction limit lambda * F# at the focus, the aperture's
   geometric cone away from it). Both kernels are scaled to unit energy, so 0 dB tissue gives an
   envelope with E[env^2] = 1 at every depth;
4. time-gain compensation undoes the nominal tissue attenuation; electronic noise is added;
5. envelope detection |IQ|, log compression to the dynamic range, and (sector) scan conversion.

Working in baseband is exactly equivalent to RF convolution followed by Hilbert envelope
detection, and it needs no sampling of the carrier, so a 256 x 256 image costs a few FFTs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import scipy.fft

SPEED_OF_SOUND_MM_US = 1.54
# E[20 log10 R] for a Rayleigh amplitude R with E[R^2] = 1 is 10 log10(exp(-Euler gamma)).
LOG_RAYLEIGH_MEAN_DB = -10.0 * 0.5772156649015329 / math.log(10.0)
ANTI_ALIAS_SIGMA_PX = 0.5  # the scanner's decimation filter before display


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

  def __post_init__(self):
    if self.geometry not in ("linear", "sector"):
      raise ValueError(f"probe geometry must be 'linear' or 'sector', got {self.geometry!r}")

  @property
  def wavelength_mm(self) -> float:
    return SPEED_OF_SOUND_MM_US / self.f0_mhz


class Bilinear:
  """Bilinear resampling at fixed fractional (row, col) coordinates, edges clamped: the same as
  `ndimage.map_coordinates(src, coords, order=1, mode='nearest')`, with the indices and weights
  computed once so each call is four gathers."""

  def __init__(self, coords: np.ndarray, src_shape: tuple[int, int]):
    h, w = src_shape
    r = np.clip(coords[0].astype(np.float64), 0, h - 1)
    c = np.clip(coords[1].astype(np.float64), 0, w - 1)
    r0 = np.minimum(np.floor(r).astype(np.int64), h - 2)
    c0 = np.minimum(np.floor(c).astype(np.int64), w - 2)
    fr, fc = (r - r0).astype(np.float32), (c - c0).astype(np.float32)
    base = (r0 * w + c0).ravel()
    self.shape = coords.shape[1:]
    self.index = np.stack([base, base + 1, base + w, base + w + 1]).astype(np.intp)
    self.weight = np.stack([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc]).reshape(4, -1)

  def __call__(self, src: np.ndarray) -> np.ndarray:
    flat = np.asarray(src, np.float32).ravel()
    out = flat[self.index[0]] * self.weight[0]
    for k in (1, 2, 3):
      out += flat[self.index[k]] * self.weight[k]
    return out.reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Beam grid <-> image grid mapping for one probe and image size (cached)."""
  spacing_mm: tuple[float, float]  # (x, y) image pixel size
  depth_step_mm: float  # beam-grid sample spacing along depth
  line_step_mm: np.ndarray  # [H] lateral spacing of beam-grid lines at each depth
  depth_mm: np.ndarray  # [H] depth of each beam-grid row
  to_beam: Bilinear | None  # samples image-grid maps at the beam samples (sector only)
  to_image: Bilinear | None  # samples beam-grid data at the image pixels (sector only)
  fov: np.ndarray  # [H, W] bool: image pixels inside the imaged field


def geometry(probe: Probe, h: int, w: int) -> Geometry:
  """The beam/image grid mapping of `probe` at h x w pixels (cached on the geometric settings only)."""
  return _geometry(probe.geometry, probe.depth_mm, probe.width_mm, probe.angle_deg, probe.apex_mm, h, w)


@functools.lru_cache(maxsize=64)
def _geometry(kind: str, depth_mm: float, width_mm: float, angle_deg: float, apex_mm: float,
              h: int, w: int) -> Geometry:
  probe = Probe(kind, depth_mm=depth_mm, width_mm=width_mm, angle_deg=angle_deg, apex_mm=apex_mm)
  dz = probe.depth_mm / h
  depth = (np.arange(h) + 0.5) * dz
  if probe.geometry == "linear":
    dx = probe.width_mm / w
    return Geometry((dx, dz), dz, np.full(h, dx), depth, None, None, np.ones((h, w), bool))
  half = math.radians(probe.angle_deg) / 2
  r_max = probe.apex_mm + probe.depth_mm
  top = probe.apex_mm * math.cos(half)  # shallowest point of the fan, from the apex
  s = max(2 * r_max * math.sin(half) / w, (r_max - top) / h)  # square pixels, fan fits the box
  radius = probe.apex_mm + depth
  theta = -half + (np.arange(w) + 0.5) * (2 * half / w)
  # beam sample -> image pixel (fractional row, col)
  x = radius[:, None] * np.sin(theta)[None, :]
  y = radius[:, None] * np.cos(theta)[None, :]
  beam_to_image = np.stack([(y - top) / s - 0.5, x / s + (w - 1) / 2]).astype(np.float32)
  # image pixel -> beam sample
  yy = top + (np.arange(h)[:, None] + 0.5) * s
  xx = (np.arange(w)[None, :] - (w - 1) / 2) * s
  r = np.hypot(xx, yy)
  th = np.arctan2(xx, yy)
  row = (r - probe.apex_mm) / dz - 0.5
  col = (th + half) / (2 * half / w) - 0.5
  fov = (r >= probe.apex_mm) & (r <= r_max) & (np.abs(th) <= half)
  image_to_beam = np.stack([row, col]).astype(np.float32)
  return Geometry((s, s), dz, radius * (2 * half / w), depth, Bilinear(beam_to_image, (h, w)),
                  Bilinear(image_to_beam, (h, w)), fov)


def psf_sigmas_px(probe: Probe, h: int, w: int) -> tuple[float, np.ndarray]:
  """Gaussian PSF standard deviations on the beam grid: (axial scalar, lateral per depth row [H]).

  Lateral: the two-way beam is the product of the transmit beam (fixed focus: diffraction limit
  lambda * F# / 2.355 at the focus, the aperture's geometric cone away from it) and the receive
  beam (dynamic focusing keeps it at the diffraction limit), so 1/s^2 = 1/s_tx^2 + 1/s_rx^2.
  """
  geo = geometry(probe, h, w)
  # Gaussian pulse with -6 dB bandwidth B*f0: sigma_t = sqrt(2 ln 2) / (pi B f0); depth = c t / 2.
  sigma_t_us = math.sqrt(2 * math.log(2)) / (math.pi * probe.bandwidth * probe.f0_mhz)
  sigma_z_mm = SPEED_OF_SOUND_MM_US * sigma_t_us / 2
  fwhm = 2 * math.sqrt(2 * math.log(2))
  sigma_rx_mm = probe.wavelength_mm * probe.f_number / fwhm
  aperture_mm = probe.focus_mm / probe.f_number
  sigma_cone_mm = aperture_mm / fwhm * np.abs(geo.depth_mm - probe.focus_mm) / probe.focus_mm
  sigma_tx_mm = np.sqrt(sigma_rx_mm ** 2 + sigma_cone_mm ** 2)
  sigma_x_mm = 1.0 / np.sqrt(1.0 / sigma_tx_mm ** 2 + 1.0 / sigma_rx_mm ** 2)
  sigma_z = math.hypot(sigma_z_mm / geo.depth_step_mm, ANTI_ALIAS_SIGMA_PX)
  sigma_x = np.hypot(sigma_x_mm / geo.line_step_mm, ANTI_ALIAS_SIGMA_PX)
  return sigma_z, sigma_x


def _unit_energy_gaussian_tf(sigma: np.ndarray, n: int) -> np.ndarray:
  """DFT of Gaussian kernels (one per entry of `sigma`) scaled so each kernel has sum(h^2) = 1."""
  f = scipy.fft.fftfreq(n)
  tf = np.exp(-2 * np.pi ** 2 * np.asarray(sigma, np.float64).reshape(-1, 1) ** 2 * f ** 2)
  energy = np.mean(tf ** 2, axis=-1, keepdims=True)  # Parseval: sum h^2 = mean |H|^2
  return (tf / np.sqrt(energy)).astype(np.complex64)


def _filters(probe: Probe, h: int, w: int):
  """Padding (tissue continues beyond the field) and the FFT transfer functions on the padded grid."""
  beam = dataclasses.replace(probe, dynamic_range_db=60.0, tissue_grey=0.45, noise_db=None, tgc=1.0,
                             nominal_atten=0.5)  # cache key: only the settings that shape the PSF
  return _filters_cached(beam, h, w)


@functools.lru_cache(maxsize=256)
def _filters_cached(probe: Probe, h: int, w: int):
  sigma_z, sigma_x = psf_sigmas_px(probe, h, w)
  pad_x = int(math.ceil(4 * sigma_x.max()))
  pad_z = int(math.ceil(4 * sigma_z))
  nx = scipy.fft.next_fast_len(w + 2 * pad_x)
  nz = scipy.fft.next_fast_len(h + 2 * pad_z)
  sigma_x_padded = np.pad(sigma_x, pad_z, mode="edge")
  tf_x = _unit_energy_gaussian_tf(sigma_x_padded, nx)
  tf_z = _unit_energy_gaussian_tf(np.array([sigma_z]), nz)[0][:, None]
  return tf_x, tf_z, pad_x, pad_z


def _to_beam(image_map: np.ndarray, geo: Geometry) -> np.ndarray:
  return image_map if geo.to_beam is None else geo.to_beam(image_map)


def envelope(echo_db: np.ndarray, probe: Probe, rng: np.random.Generator, atten=None) -> np.ndarray:
  """Detected envelope on the beam grid [H, W] (before log compression); 0 dB tissue has E[env^2] = 1.

  `echo_db`: backscatter level in dB re soft tissue on the image grid [H, W].
  `atten`: attenuation in dB/cm/MHz on the image grid, or None for the nominal value everywhere.
  """
  h, w = echo_db.shape
  geo = geometry(probe, h, w)
  log_amp = _to_beam(np.asarray(echo_db, np.float32), geo) / 20.0  # log10 amplitude
  # Round-trip attenuation integrated along each beam (to the middle of each sample) and TGC.
  two_way = 2 * probe.f0_mhz * geo.depth_step_mm / 10.0  # dB per (dB/cm/MHz) per sample
  if atten is None:
    loss_db = np.broadcast_to((np.arange(h) + 0.5)[:, None] * (probe.nominal_atten * two_way), (h, w))
  else:
    a = _to_beam(np.asarray(atten, np.float32), geo) * two_way
    loss_db = np.cumsum(a, axis=0) - 0.5 * a
  tgc_db = probe.tgc * probe.nominal_atten * two_way * (np.arange(h) + 0.5)
  log_amp = log_amp + (tgc_db[:, None] - loss_db) / 20.0
  amp = np.power(10.0, log_amp, dtype=np.float32)

  tf_x, tf_z, pad_x, pad_z = _filters(probe, h, w)
  amp = np.pad(amp * np.float32(math.sqrt(0.5)), ((pad_z, pad_z), (pad_x, pad_x)), mode="edge")
  noise = rng.standard_normal((2,) + amp.shape, dtype=np.float32)
  field = (noise[0] + 1j * noise[1]) * amp
  field = scipy.fft.ifft(scipy.fft.fft(field, n=tf_x.shape[1], axis=1) * tf_x, axis=1)
  field = scipy.fft.ifft(scipy.fft.fft(field[:, pad_x:pad_x + w], n=tf_z.shape[0], axis=0) * tf_z, axis=0)
  field = field[pad_z:pad_z + h]
  if probe.noise_db is not None:
    e = rng.standard_normal((2, h, w), dtype=np.float32)
    gain = np.power(10.0, (tgc_db + probe.noise_db) / 20.0).astype(np.float32) * np.float32(math.sqrt(0.5))
    field = field + (e[0] + 1j * e[1]) * gain[:, None]
  return np.abs(field).astype(np.float32)


def log_compress(env: np.ndarray, probe: Probe) -> np.ndarray:
  """Envelope -> display level in [0, 1]: 0 dB tissue speckle averages `probe.tissue_grey`."""
  db = 20.0 * np.log10(np.maximum(env, 1e-12)) - LOG_RAYLEIGH_MEAN_DB
  return np.clip(db / probe.dynamic_range_db + probe.tissue_grey, 0.0, 1.0)


def scan_convert(beam_img: np.ndarray, probe: Probe) -> np.ndarray:
  """Beam grid -> image grid (identity for a linear probe); outside the fan is 0."""
  h, w = beam_img.shape
  geo = geometry(probe, h, w)
  return beam_img if geo.to_image is None else np.where(geo.fov, geo.to_image(beam_img), 0.0)


def simulate(echo_db: np.ndarray, probe: Probe, rng: np.random.Generator, atten=None) -> np.ndarray:
  """Scene maps on the image grid -> uint8 B-mode image of the same size."""
  display = scan_convert(log_compress(envelope(echo_db, probe, rng, atten), probe), probe)
  return np.round(display * 255.0).astype(np.uint8)
