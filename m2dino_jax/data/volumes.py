"""3D volumes: readers (NIfTI, MHA / NRRD), one volume record, per-modality intensity normalisation,
resampling, random 3D crops and augmentation.

Axis convention: arrays are (x, y, z) as nibabel returns them (`img.get_fdata()`), spacing in mm in the
same order; SimpleITK's (z, y, x) arrays are transposed to match. Domains name modality + region
(`abd_ct`, `brain_t1`, `hn_pet`, ...); `DOMAINS` is the default domain -> modality table, extended by
config (`data.modalities`). `SHIPPED` names real volumes that installed packages carry offline (the MNI152 T1
template in the `nilearn` wheel); `shipped_volume(name)` finds one without importing its package.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np

from m2dino_jax.errors import ConfigError, DataError

MODALITIES = ("ct", "mri", "pet")
DOMAINS = {"abd_ct": "ct", "abd_mri": "mri", "brain_t1": "mri", "brain_t2": "mri", "head_ct": "ct",
           "hn_pet": "pet"}

# real volumes shipped inside installed packages: name -> (package, path inside the package, what to install)
SHIPPED = {
    "mni152": ("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "pip install nilearn"),
}

# intensity normalisation per modality: CT Hounsfield window, MRI percentile scaling, PET SUV-like scaling
NORM = {"ct_window": (-1000.0, 1000.0), "mri_percentiles": (0.5, 99.5), "pet_suv_max": 10.0}


@dataclasses.dataclass
class VolumeRecord:
  """One volume: image (x, y, z) float32, spacing (mm), domain, modality, source path; optional voxel
  labels (segmentation) and a class label (-1 = none)."""
  image: np.ndarray
  spacing: tuple[float, float, float]
  domain: str
  modality: str
  path: str = ""
  label: np.ndarray | None = None
  cls: int = -1


def modality_of(domain: str, table: dict | None = None) -> str:
  table = {**DOMAINS, **(table or {})}
  if domain not in table:
    raise ConfigError("data.modalities", f"domain '{domain}' has no modality; add it as {domain}=ct|mri|pet")
  if table[domain] not in MODALITIES:
    raise ConfigError("data.modalities", f"domain '{domain}': modality '{table[domain]}' not in {MODALITIES}")
  return table[domain]


def _check(image: np.ndarray, path) -> np.ndarray:
  if image.ndim == 4 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim != 3:
    raise DataError(path, f"expected a 3D volume, got shape {image.shape}")
  bad = int(np.count_nonzero(~np.isfinite(image)))
  if bad:
    raise DataError(path, f"{bad} NaN / infinite voxel(s); clean the volume or mask them before training")
  return image.astype(np.float32)


def read_nifti(path) -> tuple[np.ndarray, tuple[float, float, float]]:
  import nibabel as nib
  try:
    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
  except Exception as e:  # nibabel raises many types for corrupt files
    raise DataError(path, f"cannot read NIfTI ({e})") from None
  return _check(data, path), tuple(float(s) for s in img.header.get_zooms()[:3])


def read_itk(path) -> tuple[np.ndarray, tuple[float, float, float]]:
  """MHA / MHD / NRRD through SimpleITK; (z, y, x) -> (x, y, z)."""
  import SimpleITK as sitk
  try:
    img = sitk.ReadImage(str(path))
  except RuntimeError as e:
    raise DataError(path, f"cannot read image ({str(e).strip().splitlines()[-1]})") from None
  data = np.transpose(sitk.GetArrayFromImage(img)).astype(np.float32)
  return _check(data, path), tuple(float(s) for s in img.GetSpacing()[:3])


def shipped_volume(name: str) -> Path:
  """Path of a real volume shipped inside an installed package (`SHIPPED`), found without importing it."""
  if name not in SHIPPED:
    raise DataError(name, f"unknown shipped volume; known: {', '.join(sorted(SHIPPED))}")
  package, rel, install = SHIPPED[name]
  spec = importlib.util.find_spec(package)
  where = f"{package}/{rel}"
  if spec is None or not spec.submodule_search_locations:
    raise DataError(where, f"shipped volume '{name}' needs the '{package}' package; {install}")
  path = Path(list(spec.submodule_search_locations)[0]) / rel
  if not path.is_file():
    raise DataError(path, f"shipped volume '{name}' is missing from the installed '{package}'; {install}")
  return path


def read_volume(path, domain: str, modalities: dict | None = None) -> VolumeRecord:
  """Reads a NIfTI (.nii, .nii.gz) or ITK (.mha, .mhd, .nrrd) volume into a record."""
  path = Path(path)
  modality = modality_of(domain, modalities)
  name = path.name.lower()
  if name.endswith((".nii", ".nii.gz")):
    image, spacing = read_nifti(path)
  elif name.endswith((".mha", ".mhd", ".nrrd", ".nhdr")):
    image, spacing = read_itk(path)
  elif not path.exists():
    raise DataError(path, "file not found")
  else:
    raise DataError(path, "unknown volume format; expected .nii, .nii.gz, .mha, .mhd or .nrrd")
  return VolumeRecord(image, spacing, domain, modality, str(path))


def normalize(image: np.ndarray, modality: str, norm: dict | None = None) -> np.ndarray:
  """Maps raw intensities to about [0, 1]: CT window (HU), MRI percentiles, PET SUV-like (/ mean, capped)."""
  norm = {**NORM, **(norm or {})}
  x = image.astype(np.float32)
  if modality == "ct":
    lo, hi = norm["ct_window"]
    return (np.clip(x, lo, hi) - lo) / (hi - lo)
  if modality == "mri":
    lo, hi = np.percentile(x, norm["mri_percentiles"])
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
  if modality == "pet":
    suv = np.clip(x, 0.0, None) / max(float(np.mean(np.clip(x, 0.0, None))), 1e-6)
    return (np.minimum(suv, norm["pet_suv_max"]) / norm["pet_suv_max"]).astype(np.float32)
  raise ConfigError("data.modalities", f"unknown modality '{modality}'")


def resample(image: np.ndarray, spacing, target, order: int = 1) -> np.ndarray:
  """Linear (order 1) resampling from `spacing` to `target` spacing (mm); a no-op when they match."""
  from scipy import ndimage
  factors = [s / t for s, t in zip(spacing, target)]
  if np.allclose(factors, 1.0):
    return image
  return ndimage.zoom(image, factors, order=order, mode="nearest").astype(image.dtype)


def crop_origin(shape, size: int, rng: np.random.Generator, path="", fg: np.ndarray | None = None,
                foreground_bias: float = 0.0) -> tuple[int, int, int]:
  """Corner of a random size^3 crop inside `shape`; with probability `foreground_bias` centred (as far as
  possible) on a random voxel of `fg` (a boolean mask)."""
  if any(s < size for s in shape):
    raise DataError(path, f"volume of shape {tuple(shape)} is smaller than the {size}^3 crop; pad it, "
                    "lower data.crop or resample to a finer spacing")
  hi = [s - size for s in shape]
  if fg is not None and foreground_bias > 0 and rng.random() < foreground_bias and fg.any():
    idx = np.argwhere(fg)
    centre = idx[rng.integers(len(idx))]
    return tuple(int(np.clip(c - size // 2, 0, h)) for c, h in zip(centre, hi))
  return tuple(int(rng.integers(h + 1)) for h in hi)


def crop(image: np.ndarray, origin, size: int) -> np.ndarray:
  x, y, z = origin
  return image[x:x + size, y:y + size, z:z + size]


def augment(vol: np.ndarray, rng: np.random.Generator, flip: bool = True, intensity: float = 0.0) -> np.ndarray:
  """Random flips along each axis and an intensity scale / shift of relative size `intensity`."""
  if flip:
    for ax in range(3):
      if rng.random() < 0.5:
        vol = np.flip(vol, axis=ax)
  if intensity > 0:
    vol = vol * (1.0 + intensity * rng.uniform(-1, 1)) + intensity * rng.uniform(-1, 1)
  return np.ascontiguousarray(vol, dtype=np.float32)


def prepare(rec: VolumeRecord, target_spacing=None, norm: dict | None = None) -> np.ndarray:
  """Resampled and normalised image of a record (what crops are taken from)."""
  image = rec.image
  if target_spacing:
    image = resample(image, rec.spacing, target_spacing)
  return normalize(image, rec.modality, norm)
