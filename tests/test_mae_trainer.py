"""Smoke pretraining on the phantoms plus the real MNI152 T1: held-out loss per domain drops; measurement rows feed
the scaling fit."""

import json

import numpy as np
import pytest

from m2dino_jax import configlib
from m2dino_jax.data import volumes
from m2dino_jax.errors import ConfigError, DataError
from m2dino_jax.scaling import measurements
from m2dino_jax.train import loop, mae


def _config(*overrides):
  return configlib.load_config("configs/mae3d.py:smoke", ["total_steps=40", "data.per_domain=4", "data.heldout=1",
                                                          *overrides])


@pytest.mark.slow
def test_smoke_pretraining_lowers_heldout_loss_and_writes_rows(tmp_path):
  # the phantoms plus the real MNI152 T1 template (nilearn wheel) as the first brain_t1 volume
  work, cache = tmp_path / "run_a", {}
  cfg = _config("data.budget=abd_ct=2", f"measurements={tmp_path / 'm.jsonl'}", "data.source=phantoms+files",
                "data.files=brain_t1=mni152")
  assert mae.train_and_evaluate(cfg, str(work), cache) == loop.COMPLETED
  mni = cache["data"]["brain_t1"][0][0]  # the prepared training volume the batches were cropped from
  assert mni.shape == (197, 233, 189) and mni.min() == 0.0 and mni.max() == 1.0
  rows = measurements.read_measurements(tmp_path / "m.jsonl")
  assert [r.step for r in rows] == [0, 40] and {r.run_id for r in rows} == {"run_a"}
  first, last = rows
  assert set(last.loss) == set(volumes.DOMAINS)
  for d in volumes.DOMAINS:
    assert last.loss[d] < first.loss[d], (d, first.loss, last.loss)
  assert last.data["abd_ct"] == 2 and last.data["hn_pet"] == 3 and last.data["brain_t1"] == 4
  assert last.budget == 2 + 4 * 3 + 4 and last.available["abd_ct"] == 3 and last.available["brain_t1"] == 4
  np.testing.assert_allclose(sum(last.weights.values()), 1.0)
  arrays = measurements.to_arrays(rows)
  assert arrays.loss.shape == (1, 6) and np.all(np.isfinite(arrays.loss))
  ev = json.loads((work / "eval" / "40.json").read_text())
  assert ev["heldout_loss"] == pytest.approx(last.loss)
  # a finished run is not retrained
  assert mae.train_and_evaluate(cfg, str(work)) == loop.COMPLETED
  assert len(measurements.read_measurements(tmp_path / "m.jsonl")) == 2


def test_mni152_is_read_like_any_nifti_and_precedes_the_phantoms(monkeypatch):
  import nibabel as nib

  path = volumes.shipped_volume("mni152")
  assert path.name == "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz" and path.parent.name == "data"
  cfg = _config("data.domains=brain_t1,hn_pet", "data.source=phantoms+files", "data.files=brain_t1=mni152",
                "data.per_domain=2", "data.phantom_size=32")
  data = mae.load_domains(cfg)
  raw = np.asarray(nib.load(path).get_fdata(), np.float64)  # independent: nibabel + percentile scaling
  lo, hi = np.percentile(raw, (0.5, 99.5))
  np.testing.assert_allclose(data["brain_t1"].train[0], np.clip((raw - lo) / (hi - lo), 0, 1), atol=1e-5)
  assert [v.shape for v in data["brain_t1"].train] == [(197, 233, 189), (32, 32, 32)]
  assert len(data["hn_pet"].train) == 1 and data["brain_t1"].available == 2
  with pytest.raises(ConfigError, match="data.files.*abd_ct"):
    mae.load_domains(_config("data.domains=brain_t1", "data.source=phantoms+files", "data.files=abd_ct=mni152"))
  with pytest.raises(ConfigError, match="no files match"):
    mae.load_domains(_config("data.domains=brain_t1", "data.source=phantoms+files", "data.files=brain_t1=/no/*.nii"))
  with pytest.raises(DataError, match="unknown shipped volume"):
    volumes.shipped_volume("colin99")
  # without nilearn: a clear error naming what to install (the package is never imported)
  monkeypatch.setattr(volumes.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(DataError, match="pip install nilearn"):
    mae.load_domains(cfg)


def test_batches_are_a_function_of_seed_and_index_and_follow_the_mixture():
  cfg = _config("data.domains=abd_ct,hn_pet", "data.mixture=json", "data.phantom_size=32")
  with pytest.raises(ConfigError, match="weights_file"):
    mae.mixture_weights(cfg, mae.load_domains(cfg))
  cfg = _config("data.domains=abd_ct,hn_pet", "data.mixture=size", "data.budget=hn_pet=1",
                "data.phantom_size=32")
  data = mae.load_domains(cfg)
  w = mae.mixture_weights(cfg, data)
  assert w == pytest.approx({"abd_ct": 0.75, "hn_pet": 0.25})
  make = mae._Batches(cfg, data, w)
  a, b = make(3), make(3)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["image"].shape == (8, 32, 32, 32, 1)
  # two processes' halves are the two halves of the global batch
  halves = [mae._Batches(cfg, data, w, p, 2)(3) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), a["image"])
  doms = np.concatenate([make(s)["domain"] for s in range(60)])
  assert abs(doms.mean() - 0.25) < 0.06
  with pytest.raises(ConfigError, match="data.crop"):
    mae.Program(_config("data.crop=16"), None, None, 1)
