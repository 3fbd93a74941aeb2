"""Reading images and masks as released: PNG/JPG (PIL), NIfTI (nibabel), MHA (SimpleITK), DICOM (pydicom).

Every reader returns plain NumPy arrays in [row, column] order and turns a missing, corrupt or
truncated file into a `DataError` naming the file, so one bad file never surfaces as a library
traceback. Images come back as uint8, grey [H, W] or RGB [H, W, 3]; masks as integer [H, W].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from m2dino_jax.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")


def _exists(path) -> Path:
  path = Path(path)
  if not path.is_file():
    raise DataError(path, "file not found")
  return path


def to_uint8(arr: np.ndarray, bits: int | None = None) -> np.ndarray:
  """Integer or float pixels to uint8: a known bit depth is scaled to 0..255, floats are clipped."""
  arr = np.asarray(arr)
  if arr.dtype == np.uint8:
    return arr
  if np.issubdtype(arr.dtype, np.integer):
    if bits is None:
      bits = 8 if int(arr.max(initial=0)) < 256 else 16
    if bits <= 8:
      return np.clip(arr, 0, 255).astype(np.uint8)
    return (arr.astype(np.float64) * (255.0 / (2**bits - 1))).round().clip(0, 255).astype(np.uint8)
  return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def grey_or_rgb(arr: np.ndarray) -> np.ndarray:
  """[H, W, 3] images whose channels are equal become grey [H, W] (ultrasound saved as RGB)."""
  if arr.ndim == 3 and arr.shape[2] == 1:
    return arr[..., 0]
  if arr.ndim == 3 and arr.shape[2] == 3 and np.array_equal(arr[..., 0], arr[..., 1]) and \
      np.array_equal(arr[..., 0], arr[..., 2]):
    return np.ascontiguousarray(arr[..., 0])
  return arr


def _open_pil(path):
  from PIL import Image
  path = _exists(path)
  try:
    img = Image.open(path)
    img.load()  # decodes now: a truncated file fails here, not later
  except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
    raise DataError(path, f"corrupt or truncated image ({e})") from None
  return img


def read_image(path, mode: str = "auto") -> np.ndarray:
  """Reads a 2D image file as uint8.

  mode: 'auto' keeps grey images grey and RGB images whose channels are all equal grey, other
  colour images RGB; 'L' forces grey; 'RGB' forces RGB.
  """
  img = _open_pil(path)
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    arr = to_uint8(np.asarray(img), bits=16)
  elif img.mode == "L":
    arr = np.asarray(img)
  else:
    arr = np.asarray(img.convert("RGB"))
  if mode == "L":
    return arr if arr.ndim == 2 else np.asarray(img.convert("L"))
  if mode == "RGB":
    return arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=2)
  return grey_or_rgb(arr)


def read_mask(path) -> np.ndarray:
  """Reads a label image of class ids (grey, 16-bit or palette-indexed PNG) as int32 [H, W]."""
  img = _open_pil(path)
  arr = np.asarray(img)
  if arr.ndim == 3:  # RGB(A) masks are accepted only when they are grey in disguise
    arr = grey_or_rgb(arr[..., :3])
    if arr.ndim == 3:
      raise DataError(path, f"mask must be single-channel class ids, got a colour image {arr.shape}")
  return arr.astype(np.int32)


def read_nifti(path) -> tuple[np.ndarray, tuple[float, ...]]:
  """Reads a NIfTI volume: (array in NIfTI index order [i, j, ...], voxel sizes in mm)."""
  import nibabel as nib
  path = _exists(path)
  try:
    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj)
    zooms = tuple(float(z) for z in img.header.get_zooms())
  except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as e:
    raise DataError(path, f"corrupt or truncated NIfTI file ({type(e).__name__}: {e})") from None
  except Exception as e:  # zlib.error and friends from a broken .gz
    if type(e).__module__ in ("zlib", "gzip"):
      raise DataError(path, f"corrupt or truncated NIfTI file ({e})") from None
    raise
  return np.asarray(arr), zooms


def nifti_2d(path) -> tuple[np.ndarray, tuple[float, float]]:
  """A 2D NIfTI image as [row, column] plus (x, y) spacing: NIfTI's first axis is x (the column)."""
  arr, zooms = read_nifti(path)
  arr = np.squeeze(arr)
  if arr.ndim != 2:
    raise DataError(path, f"expected a 2D image, got array of shape {arr.shape}")
  return np.ascontiguousarray(arr.T), (zooms[0], zooms[1] if len(zooms) > 1 else zooms[0])


def read_mha(path) -> tuple[np.ndarray, tuple[float, float]]:
  """Reads a 2D MetaImage (.mha/.mhd) as [H, W] or [H, W, C] plus (x, y) spacing in mm.

  A 2D vector image, or a 3D image with a depth of 1 or 3 (channels stored as slices, as some
  releases do), both become one 2D image.
  """
  import SimpleITK as sitk
  path = _exists(path)
  try:
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
  except RuntimeError as e:  # ITK's message: the useful part follows 'ERROR:' (its 'Reason:' is errno noise)
    lines = [ln.split("ERROR:", 1)[1].strip() for ln in str(e).splitlines() if "ERROR:" in ln]
    raise DataError(path, f"corrupt or truncated MetaImage ({lines[0] if lines else 'unreadable'})") from None
  spacing = tuple(float(s) for s in img.GetSpacing())
  if img.GetDimension() == 3:
    if arr.shape[0] == 1:
      arr = arr[0]
    elif arr.shape[0] == 3 and arr.ndim == 3:
      arr = np.moveaxis(arr, 0, -1)  # channels stored as 3 slices
    else:
      raise DataError(path, f"expected a 2D image, got a volume of shape {arr.shape}")
  return np.ascontiguousarray(arr), (spacing[0], spacing[1])


def is_dicom(path) -> bool:
  """True for files with a DICOM suffix, or with the 'DICM' preamble marker."""
  path = Path(path)
  if path.suffix.lower() in DICOM_SUFFIXES:
    return True
  if path.suffix:
    return False
  try:
    with open(path, "rb") as f:
      f.seek(128)
      return f.read(4) == b"DICM"
  except OSError:
    return False


def read_dicom_header(path):
  """The DICOM dataset with large values (the pixel data) deferred: tags are read, pixels are not."""
  import pydicom
  path = _exists(path)
  try:
    ds = pydicom.dcmread(os.fspath(path), defer_size="64 KB")
  except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError) as e:
    raise DataError(path, f"not a readable DICOM file ({e})") from None
  return ds


def iter_dicom_frames(path, header=None):
  """Yields each frame of a DICOM file as uint8 grey [H, W] or RGB [H, W, 3].

  Palette colour goes through the colour table, YBR through pydicom's RGB conversion, MONOCHROME1
  is inverted; deeper pixels are scaled to 0..255 by their stored bit depth.
  """
  from pydicom.pixels import apply_color_lut, iter_pixels
  path = Path(path)
  ds = header if header is not None else read_dicom_header(path)
  if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
    raise DataError(path, "DICOM file has no pixel data")
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
  try:
    for frame in iter_pixels(os.fspath(path), as_rgb=True):
      if photometric == "PALETTE COLOR":
        lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        frame = to_uint8(apply_color_lut(frame, ds), bits=lut_bits)
      else:
        frame = to_uint8(frame, bits=bits)
        if photometric == "MONOCHROME1":
          frame = 255 - frame
      yield grey_or_rgb(frame)
  except Exception as e:  # pydicom raises many types for a bad stream; all mean "cannot decode"
    raise DataError(path, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from None
