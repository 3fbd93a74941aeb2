"""Volume readers (vs nibabel / SimpleITK), normalisation (vs NumPy formulas), crops, errors, phantoms."""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from m2dino_jax.data import phantoms, volumes
from m2dino_jax.errors import ConfigError, DataError


def test_nifti_round_trip_matches_nibabel(tmp_path):
  arr = np.random.default_rng(0).normal(40, 300, (7, 9, 11)).astype(np.float32)
  path = tmp_path / "ct.nii.gz"
  nib.save(nib.Nifti1Image(arr, np.diag([1.5, 2.0, 3.0, 1.0])), str(path))
  rec = volumes.read_volume(path, "abd_ct")
  ref = nib.load(str(path))
  np.testing.assert_array_equal(rec.image, ref.get_fdata().astype(np.float32))
  np.testing.assert_allclose(rec.image, arr, rtol=1e-6)
  assert rec.spacing == (1.5, 2.0, 3.0) and rec.modality == "ct" and rec.domain == "abd_ct"


def test_mha_round_trip_matches_simpleitk_in_xyz_order(tmp_path):
  zyx = np.random.default_rng(1).random((5, 6, 7)).astype(np.float32)
  img = sitk.GetImageFromArray(zyx)
  img.SetSpacing((0.5, 0.7, 2.5))
  path = tmp_path / "t1.mha"
  sitk.WriteImage(img, str(path))
  rec = volumes.read_volume(path, "brain_t1")
  np.testing.assert_array_equal(rec.image, zyx.transpose(2, 1, 0))
  assert rec.image.shape == (7, 6, 5) and rec.spacing == (0.5, 0.7, 2.5) and rec.modality == "mri"


def test_bad_inputs_name_the_file(tmp_path):
  arr = np.ones((8, 8, 8), np.float32)
  arr[2, 3, 4] = np.nan
  bad = tmp_path / "nan.nii.gz"
  nib.save(nib.Nifti1Image(arr, np.eye(4)), str(bad))
  with pytest.raises(DataError, match=r"nan\.nii\.gz.*1 NaN"):
    volumes.read_volume(bad, "abd_ct")
  with pytest.raises(DataError, match=r"small\.nii.*smaller than the 16\^3 crop"):
    volumes.crop_origin((8, 20, 20), 16, np.random.default_rng(0), tmp_path / "small.nii")
  with pytest.raises(DataError, match="unknown volume format"):
    (tmp_path / "x.png").write_bytes(b"")
    volumes.read_volume(tmp_path / "x.png", "abd_ct")
  with pytest.raises(ConfigError, match="data.modalities"):
    volumes.read_volume(tmp_path / "x.png", "spine_xray")


def test_normalisation_per_modality():
  x = np.random.default_rng(2).normal(0, 600, (10, 10, 10)).astype(np.float32)
  ct = volumes.normalize(x, "ct")
  np.testing.assert_allclose(ct, (np.minimum(np.maximum(x, -1000), 1000) + 1000) / 2000, atol=1e-6)
  mri = volumes.normalize(x, "mri")
  lo, hi = np.sort(x.ravel())[[int(0.005 * 999), int(np.ceil(0.995 * 999))]]
  assert abs(np.percentile(x, 0.5) - lo) < 60 and abs(np.percentile(x, 99.5) - hi) < 60
  ref = np.clip((x - np.percentile(x, 0.5)) / (np.percentile(x, 99.5) - np.percentile(x, 0.5)), 0, 1)
  np.testing.assert_allclose(mri, ref, atol=1e-6)
  pet_in = np.abs(x)
  pet = volumes.normalize(pet_in, "pet", {"pet_suv_max": 4.0})
  np.testing.assert_allclose(pet, np.minimum(pet_in / pet_in.mean(), 4.0) / 4.0, rtol=1e-5)


def test_resample_crop_and_augment():
  img = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
  up = volumes.resample(img, (2.0, 2.0, 1.0), (1.0, 1.0, 1.0))
  assert up.shape == (8, 8, 4)
  np.testing.assert_allclose(up[0, 0], img[0, 0])  # corner voxels are kept
  fg = np.zeros((20, 20, 20), bool)
  fg[17, 2, 9] = True
  o = volumes.crop_origin(fg.shape, 8, np.random.default_rng(0), fg=fg, foreground_bias=1.0)
  assert o == (12, 0, 5) and volumes.crop(fg, o, 8).any()
  vol = np.random.default_rng(3).random((4, 4, 4)).astype(np.float32)
  aug = volumes.augment(vol, np.random.default_rng(4), flip=True)
  assert any(np.array_equal(aug, np.flip(vol, axes)) for axes in
             [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)])


def test_phantoms_are_deterministic_with_controlled_contrast():
  a, b = phantoms.make_phantom("brain_t1", 3, 32), phantoms.make_phantom("brain_t1", 3, 32)
  np.testing.assert_array_equal(a.image, b.image)
  t1, t2 = a, phantoms.make_phantom("brain_t2", 3, 32)
  gm, wm, csf = 3, 4, 5
  mean = lambda r, k: float(r.image[r.label == k].mean())
  assert mean(t1, wm) > mean(t1, gm) > mean(t1, csf)  # T1: white > grey > CSF
  assert mean(t2, csf) > mean(t2, gm) > mean(t2, wm)  # T2: inverted
  ct = phantoms.make_phantom("abd_ct", 0, 32)
  assert ct.modality == "ct" and mean(ct, 0) < -900 and mean(ct, 4) > 300  # air, bone in HU
  pets = [phantoms.make_phantom("hn_pet", i, 32) for i in range(6)]
  for p in pets:
    assert (p.cls == 1) == bool((p.label == 2).any())
    if p.cls:
      assert p.image[p.label == 2].mean() > 2 * p.image[p.label == 1].mean()
  with pytest.raises(ConfigError, match="data.domains"):
    phantoms.make_phantom("knee_mri", 0)
