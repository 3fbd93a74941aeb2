"""The unlabelled adapter on real ultrasound DICOM files shipped by pydicom / pydicom-data: crops and
spacings are checked against the region tags read here independently, pixels against pydicom."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

from m2dino_jax.data import adapters

FILES = ("US1_UNCR.dcm", "gdcm-US-ALOKA-16.dcm", "color3d_jpeg_baseline.dcm")


@pytest.fixture(scope="module")
def dicom_records(tmp_path_factory):
  root = tmp_path_factory.mktemp("dicom")
  for name in FILES:
    shutil.copy(get_testdata_file(name), root / name)
  by_file: dict[str, list] = {}
  for rec in adapters.get("unlabelled")(root, "all"):
    by_file.setdefault(rec.source.rsplit("/", 1)[1], []).append(rec)
  return root, by_file


def _tissue_union(ds):
  """Inclusive region corners of the 2D regions, unioned: (x0, y0, x1, y1); spacing of the first (mm)."""
  regs = [r for r in ds.SequenceOfUltrasoundRegions if r.RegionSpatialFormat == 1]
  x0, y0 = min(r.RegionLocationMinX0 for r in regs), min(r.RegionLocationMinY0 for r in regs)
  x1, y1 = max(r.RegionLocationMaxX1 for r in regs), max(r.RegionLocationMaxY1 for r in regs)
  return (x0, y0, x1, y1), (regs[0].PhysicalDeltaX * 10, regs[0].PhysicalDeltaY * 10)


def test_palette_bmode_two_regions(dicom_records):
  root, by_file = dicom_records
  ds = pydicom.dcmread(root / "gdcm-US-ALOKA-16.dcm")
  (x0, y0, x1, y1), spacing = _tissue_union(ds)
  assert (x0, y0, x1, y1) == (32, 24, 639, 415)  # two side-by-side B-mode regions
  [rec] = by_file["gdcm-US-ALOKA-16.dcm"]
  assert rec.image.shape == (y1 - y0 + 1, x1 - x0 + 1, 3) == (392, 608, 3)
  assert rec.spacing_mm == pytest.approx(spacing) and rec.spacing_mm[0] == pytest.approx(0.38265, abs=1e-4)
  rgb16 = apply_color_lut(ds.pixel_array, ds)  # 16-bit palette entries
  ref = np.round(rgb16[y0:y1 + 1, x0:x1 + 1].astype(np.float64) * 255 / 65535).astype(np.uint8)
  np.testing.assert_array_equal(rec.image, ref)


def test_cine_jpeg_ybr_frames(dicom_records):
  root, by_file = dicom_records
  ds = pydicom.dcmread(root / "color3d_jpeg_baseline.dcm")
  (x0, y0, x1, y1), spacing = _tissue_union(ds)
  recs = by_file["color3d_jpeg_baseline.dcm"]
  assert len(recs) == int(ds.NumberOfFrames) == 120
  assert [r.extra["frame"] for r in recs] == list(range(120))
  assert all(r.image.shape == (y1 - y0 + 1, x1 - x0 + 1, 3) == (384, 512, 3) for r in recs)
  assert recs[0].spacing_mm == pytest.approx(spacing) and spacing[0] == pytest.approx(0.5105, abs=1e-4)
  assert ds.PhotometricInterpretation == "YBR_FULL_422"
  pixels = ds.pixel_array  # pydicom converts YBR to RGB by default
  for i in (0, 57, 119):
    np.testing.assert_array_equal(recs[i].image, pixels[i, y0:y1 + 1, x0:x1 + 1])


def test_rgb_without_regions_kept_whole(dicom_records):
  root, by_file = dicom_records
  ds = pydicom.dcmread(root / "US1_UNCR.dcm")
  assert "SequenceOfUltrasoundRegions" not in ds
  [rec] = by_file["US1_UNCR.dcm"]
  assert rec.spacing_mm is None and rec.extra["region"] == "none" and rec.task == ""
  np.testing.assert_array_equal(rec.image, ds.pixel_array)


def test_ybr_full_converted_to_rgb(tmp_path):
  """An uncompressed YBR_FULL cine, written here from known RGB with the JFIF formula, reads back RGB."""
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (2, 12, 16, 3)).astype(np.float64)
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  ybr = np.stack([0.299 * r + 0.587 * g + 0.114 * b,
                  -0.168736 * r - 0.331264 * g + 0.5 * b + 128,
                  0.5 * r - 0.418688 * g - 0.081312 * b + 128], axis=-1)
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = pydicom.Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundMultiFrameImageStorage, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.NumberOfFrames = "US", 2
  ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 12, 16, 3, 0
  ds.PhotometricInterpretation = "YBR_FULL"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
  region = pydicom.Dataset()
  region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
  region.RegionLocationMinX0, region.RegionLocationMinY0 = 2, 3
  region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 13, 10
  region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3
  region.PhysicalDeltaX, region.PhysicalDeltaY = 0.025, 0.03
  ds.SequenceOfUltrasoundRegions = [region]
  ds.PixelData = np.clip(np.round(ybr), 0, 255).astype(np.uint8).tobytes()
  ds.save_as(tmp_path / "cine.dcm", enforce_file_format=True)
  recs = list(adapters.get("unlabelled")(tmp_path, "all"))
  assert len(recs) == 2
  for i, rec in enumerate(recs):
    assert rec.image.shape == (8, 12, 3) and rec.spacing_mm == pytest.approx((0.25, 0.3))
    assert np.abs(rec.image.astype(int) - rgb[i, 3:11, 2:14]).max() <= 2


def test_region_tags_outside_frame(tmp_path):
  """examples_ybr_color.dcm was downsampled to 320x240 but kept 640x480 region tags: no crop, no spacing."""
  shutil.copy(get_testdata_file("examples_ybr_color.dcm"), tmp_path / "small.dcm")
  ds = pydicom.dcmread(tmp_path / "small.dcm")
  (_, _, x1, y1), _ = _tissue_union(ds)
  assert x1 >= ds.Columns and (ds.Rows, ds.Columns) == (240, 320)
  recs = list(adapters.get("unlabelled")(tmp_path, "all"))
  assert len(recs) == 30
  assert all(r.image.shape == (240, 320, 3) and r.spacing_mm is None for r in recs)
  assert {r.extra["region"] for r in recs} == {"outside_frame"}
