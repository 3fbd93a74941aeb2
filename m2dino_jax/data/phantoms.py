"""Embedded 3D phantoms: six imaging domains with shared anatomy and controlled contrast differences.

  abd_ct   abdomen (body, liver, two kidneys, spine, optional liver lesion) in Hounsfield units
  abd_mri  the same abdominal anatomy with T1-like MRI contrast, a smooth bias field and Rician noise
  brain_t1 head (scalp, skull, grey / white matter, ventricles, optional lesion), T1 contrast
  brain_t2 the same head with T2 contrast (CSF bright, white matter darker than grey: inverted)
  head_ct  the same head in Hounsfield units (bright skull, flat brain contrast)
  hn_pet   head-and-neck PET: blurred low body uptake, brain uptake and sparse hot spots (SUV-like)

So abd_ct and abd_mri share geometry (transfer through anatomy), brain_t1 / t2 are contrast inversions,
head_ct shares the head but hides the brain contrast, and PET shares little (an island). Every volume has a
voxel label map (segmentation) and a class label (1 = a lesion / hot spot is present). Volumes are a pure
function of (domain, index, size, seed), cube-shaped, at 1 mm spacing.
"""

from __future__ import annotations

import numpy as np

from m2dino_jax.data import volumes
from m2dino_jax.errors import ConfigError

DOMAINS = tuple(volumes.DOMAINS)
ABD_LABELS = ("background", "body", "liver", "kidney", "spine", "lesion")
HEAD_LABELS = ("background", "scalp", "skull", "grey", "white", "csf", "lesion")
PET_LABELS = ("background", "body", "hot_spot")
CLASS_NAMES = ("absent", "present")  # the class label: a lesion / hot spot is present


def label_names(domain: str) -> tuple[str, ...]:
  """Names of the voxel labels of a phantom domain (index = label value)."""
  if domain not in DOMAINS:
    raise ConfigError("data.domain", f"no phantom for domain '{domain}'; phantoms: {', '.join(DOMAINS)}")
  return PET_LABELS if domain == "hn_pet" else ABD_LABELS if domain.startswith("abd") else HEAD_LABELS

# intensity per label: abdomen (bg, body, liver, kidney, spine, lesion); head (bg, scalp, skull, gm, wm, csf, les)
_ABD = {"abd_ct": (-1000, 30, 60, 150, 600, 110), "abd_mri": (0, 300, 520, 220, 150, 120)}
_HEAD = {"brain_t1": (0, 600, 80, 450, 700, 100, 300), "brain_t2": (0, 450, 60, 600, 400, 950, 850),
         "head_ct": (-1000, 40, 1100, 40, 30, 8, 70)}
_NOISE = {"abd_ct": 15.0, "head_ct": 10.0, "abd_mri": 25.0, "brain_t1": 25.0, "brain_t2": 25.0, "hn_pet": 0.15}


def _grid(size: int):
  c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
  return np.meshgrid(c, c, c, indexing="ij")


def _ellipsoid(g, centre, radii) -> np.ndarray:
  return sum(((a - c) / r) ** 2 for a, c, r in zip(g, centre, radii)) <= 1.0


def _abdomen(g, rng) -> tuple[np.ndarray, int]:
  j = lambda s=0.06: rng.uniform(-s, s)
  lab = np.zeros(g[0].shape, np.uint8)
  lab[_ellipsoid(g, (j(), j(), 0), (0.85 + j(), 0.6 + j(), 1.2))] = 1
  liver = (-0.35 + j(), -0.1 + j(), 0.1 + j())
  lab[_ellipsoid(g, liver, (0.35 + j(), 0.3 + j(), 0.4 + j()))] = 2
  for side in (-1, 1):
    lab[_ellipsoid(g, (0.4 * side + j(), 0.25 + j(), -0.1 + j()), (0.12, 0.1, 0.22))] = 3
  lab[_ellipsoid(g, (j(0.03), 0.45 + j(0.03), 0), (0.1, 0.1, 1.5))] = 4
  cls = int(rng.random() < 0.5)
  if cls:
    lab[_ellipsoid(g, (liver[0] + j(0.15), liver[1] + j(0.1), liver[2] + j(0.15)), (0.09, 0.09, 0.09))] = 5
  return lab, cls


def _head(g, rng) -> tuple[np.ndarray, int]:
  j = lambda s=0.05: rng.uniform(-s, s)
  c, r = (j(), j(), j()), np.array([0.8, 0.9, 0.85]) + [j(), j(), j()]
  lab = np.zeros(g[0].shape, np.uint8)
  lab[_ellipsoid(g, c, r)] = 1
  lab[_ellipsoid(g, c, r - 0.06)] = 2
  lab[_ellipsoid(g, c, r - 0.14)] = 3
  lab[_ellipsoid(g, c, r - 0.3)] = 4
  for side in (-1, 1):
    lab[_ellipsoid(g, (c[0] + 0.1 * side, c[1] + j(), c[2]), (0.06, 0.22, 0.12))] = 5
  cls = int(rng.random() < 0.5)
  if cls:
    lab[_ellipsoid(g, (c[0] + rng.choice([-0.35, 0.35]), c[1] + j(0.2), c[2] + j(0.2)), (0.1, 0.1, 0.1))] = 6
  return lab, cls


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
  from scipy import ndimage
  return ndimage.gaussian_filter(x, sigma, mode="nearest")


def _pet(g, rng, size: int) -> tuple[np.ndarray, np.ndarray, int]:
  head, _ = _head(g, rng)
  lab = (head > 0).astype(np.uint8)
  act = np.where(head > 0, 1.0, 0.02) + np.where(head >= 3, 2.0, 0.0)
  cls = int(rng.random() < 0.5)
  for _ in range(int(rng.integers(1, 4)) if cls else 0):
    centre = rng.uniform(-0.5, 0.5, 3)
    spot = _ellipsoid(g, centre, (0.07, 0.07, 0.07))
    lab[spot] = 2
    act = act + 8.0 * spot
  act = _smooth(act.astype(np.float32), 0.02 * size)
  return act, lab, cls


def make_phantom(domain: str, index: int, size: int = 48, seed: int = 0) -> volumes.VolumeRecord:
  """One phantom volume of `domain` (raw units of its modality) with labels; deterministic."""
  if domain not in DOMAINS:
    raise ConfigError("data.domains", f"no phantom for domain '{domain}'; phantoms: {', '.join(DOMAINS)}")
  rng = np.random.default_rng([seed, DOMAINS.index(domain), index])
  g = _grid(size)
  if domain == "hn_pet":
    image, lab, cls = _pet(g, rng, size)
  else:
    lab, cls = (_abdomen if domain.startswith("abd") else _head)(g, rng)
    table = np.asarray((_ABD if domain.startswith("abd") else _HEAD)[domain], np.float32)
    image = _smooth(table[lab], 0.6)
  noise = _NOISE[domain] * rng.standard_normal(image.shape).astype(np.float32)
  modality = volumes.DOMAINS[domain]
  if modality == "mri":  # smooth multiplicative bias field, Rician magnitude noise
    bias = 1.0 + 0.15 * (g[0] * rng.uniform(-1, 1) + g[1] * rng.uniform(-1, 1))
    noise2 = _NOISE[domain] * rng.standard_normal(image.shape).astype(np.float32)
    image = np.sqrt((image * bias + noise) ** 2 + noise2 ** 2)
  elif modality == "pet":
    image = np.clip(image * (1.0 + noise), 0.0, None)
  else:
    image = image + noise
  return volumes.VolumeRecord(image.astype(np.float32), (1.0, 1.0, 1.0), domain, modality,
                              f"phantom:{domain}/{index}", lab, cls)
