"""UltraDINO training end to end on the smoke config: loss falls, monitors, collapse stop, teacher hand-off,
DINOv2 .pth round trip, bit-identical resume and a sharded step equal to one device."""

import json
import pickle
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from configs import ultradino
from m2dino_jax.errors import DataError
from m2dino_jax.models import convert, vit
from m2dino_jax.train import loop
from m2dino_jax.train.dino import dinov2_io, trainer
from tests.util import run_with_devices

DICOMS = ("US1_UNCR.dcm", "gdcm-US-ALOKA-16.dcm", "color3d_jpeg_baseline.dcm")


def smoke_config(steps: int, **updates):
  c = ultradino.get_config(f"smoke,steps={steps}")
  c.checkpoint.async_save = False
  c.log_every = 1
  for k, v in updates.items():
    obj, *path = k.split(".")
    target = c
    for p in [obj] + path[:-1]:
      target = target[p]
    target[path[-1] if path else obj] = v
  return c


def dicom_folder(tmp_path):
  from pydicom.data import get_testdata_file
  root = tmp_path / "dicom"
  root.mkdir()
  for name in DICOMS:
    shutil.copy(get_testdata_file(name), root / name)
  return root


def read_metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_smoke_pretraining_lowers_loss_and_hands_off_teacher(tmp_path):
  cfg = smoke_config(24, **{"data.sources": f"synthetic=1;folder:{dicom_folder(tmp_path)}=1",
                            "teacher.warmup_temp_epochs": 0})
  workdir = tmp_path / "run"
  assert trainer.train_and_evaluate(cfg, str(workdir)) == loop.COMPLETED
  rows = read_metrics(workdir)
  losses = [r["loss"] for r in rows if "loss" in r]
  first, last = np.mean(losses[:4]), np.mean(losses[-4:])
  assert last < first - 0.1, f"loss did not fall: first 4 steps {first:.4f}, last 4 {last:.4f}"
  mon = [r for r in rows if "monitor/rankme" in r]
  assert mon[-1]["step"] == 24 and all(r["monitor/rankme"] > cfg.monitor.min_rankme for r in mon), mon
  # the teacher backbone loads into an encoder as the multi-task trainer builds it (init_from)
  vcfg = vit.ViTConfig.from_config(dict(cfg.model, out_blocks=(0, 1, 2, 3)))
  target = vit.Encoder(vcfg, rngs=nnx.Rngs(5))
  convert.init_encoder_from(target, workdir / "teacher")
  saved = convert.load_encoder_params(workdir / "teacher")[1]
  got = {k: np.asarray(v[...]) for k, v in convert.flat_params(target).items()}
  assert set(got) == set(saved)
  for k in saved:
    np.testing.assert_array_equal(got[k], saved[k])
  # DINOv2-layout .pth made from our weights imports back to equal outputs; code-executing pickles are refused
  pth = dinov2_io.save_pth(target, tmp_path / "teacher.pth")
  back = dinov2_io.encoder_from_pth(pth, vcfg, seed=9)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 1)).astype(np.float32)
  a, b = target(x), back(x)
  diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in ("cls", "patch_tokens"))
  assert diff <= 1e-5, diff

  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))
  evil = tmp_path / "evil.pth"
  evil.write_bytes(pickle.dumps({"teacher.backbone.cls_token": Evil()}))
  with pytest.raises(DataError, match="refused"):
    dinov2_io.load_pth(evil)


@pytest.mark.slow
def test_collapsing_config_is_stopped_by_the_monitor(tmp_path):
  cfg = smoke_config(10, **{"loss.centering": "none", "teacher.temp": 1e-4, "teacher.warmup_temp": 1e-4,
                            "monitor.every": 5})
  with pytest.raises(trainer.CollapseError, match="teacher_entropy"):
    trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert (tmp_path / "run" / "ckpt").is_dir() and not (tmp_path / "run" / "teacher").exists()


class _Kill(Exception):
  pass


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
  cfg = smoke_config(8, **{"checkpoint.every": 4, "monitor.every": 100})
  full = trainer.Run(cfg, tmp_path / "a")
  assert full.train() == loop.COMPLETED

  def kill(step, state, ckpt):
    if step == 6:
      raise _Kill
  loop.AFTER_STEP_HOOKS.append(kill)
  try:
    with pytest.raises(_Kill):
      trainer.Run(cfg, tmp_path / "b").train()
  finally:
    loop.AFTER_STEP_HOOKS.remove(kill)
  resumed = trainer.Run(cfg, tmp_path / "b")
  assert resumed.train() == loop.COMPLETED
  a, b = jax.device_get(full.state), jax.device_get(resumed.state)
  assert int(b.step) == 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_sharded_step_equals_one_device():
  out = run_with_devices("""
    import json, numpy as np, jax
    from configs import ultradino
    from m2dino_jax.train.dino import trainer, data
    res = {}
    for name, n, preset in (("one", 1, "dp"), ("dp8", 8, "dp"), ("fsdp", 8, "fsdp")):
      c = ultradino.get_config("smoke,steps=4")
      c.mesh_devices = n
      c.sharding = preset
      if preset == "fsdp":
        c.mesh.data, c.mesh.fsdp = 2, 4
      run = trainer.Run(c, None)
      it = data.make_iterator(c.data, patch=16, seed=0)
      state = run.state
      for _ in range(2):
        state, m = run.step(state, next(it))
      res[name] = (float(m["loss"]), jax.device_get(state))
    ref = res["one"][1]
    out = {}
    for name in ("dp8", "fsdp"):
      d = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
              for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(res[name][1])))
      out[name] = [res[name][0] - res["one"][0], d]
    print(json.dumps(out))
  """, devices=8, timeout=400)
  diffs = json.loads(out.strip().splitlines()[-1])
  for name, (dloss, dparam) in diffs.items():
    assert abs(dloss) < 1e-4 and dparam < 1e-4, (name, dloss, dparam)
