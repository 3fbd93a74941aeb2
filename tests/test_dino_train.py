"""UltraDINO training end to end on the smoke config: loss falls, monitors, collapse stop, teacher hand-off to
the multi-task trainer (bit-equal weights), DINOv2 .pth round trip, bit-identical resume, and a sharded step
equal to one device.

One smoke pretraining (module fixture `pretrained`) is shared by the tests that need a trained run; the others
use a depth-2 variant of the smoke model (compilation dominates their time on CPU)."""

import json
import pickle
import shutil
import types

import jax
import numpy as np
import pytest
from flax import nnx

from configs import ultradino
from m2dino_jax import cli
from m2dino_jax.errors import DataError
from m2dino_jax.infer import predict
from m2dino_jax.models import convert, dinov2_pth, vit
from m2dino_jax.tasks import registry
from m2dino_jax.train import checkpointing, loop
from m2dino_jax.train.dino import trainer
from m2dino_jax.train.multitask import trainer as mt_trainer
from tests.util import run_with_devices

DICOMS = ("US1_UNCR.dcm", "gdcm-US-ALOKA-16.dcm", "color3d_jpeg_baseline.dcm")
STEPS = 24


def smoke_config(steps: int, **updates):
  c = ultradino.get_config(f"smoke,steps={steps}")
  c.checkpoint.async_save = False
  c.log_every = 1
  for k, v in updates.items():
    *path, leaf = k.split(".")
    target = c
    for p in path:
      target = target[p]
    target[leaf] = v
  return c


def dicom_folder(root):
  from pydicom.data import get_testdata_file
  root.mkdir()
  for name in DICOMS:
    shutil.copy(get_testdata_file(name), root / name)
  return root


def read_metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def flat(tree, prefix=""):
  """Nested dicts (a restored Param state, leaves {'value': array}) -> {dotted name: array}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and set(v) == {"value"}:
      v = v["value"]
    out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": np.asarray(v)})
  return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """The smoke pretraining on simulator images plus pydicom's real echo / cine frames, checkpoints every 8."""
  root = tmp_path_factory.mktemp("dino")
  cfg = smoke_config(STEPS, **{"data.sources": f"synthetic=1;folder:{dicom_folder(root / 'dicom')}=1",
                               "teacher.warmup_temp_epochs": 0, "checkpoint.every": 8})
  run = trainer.Run(cfg, root / "run")
  assert run.train() == loop.COMPLETED
  return types.SimpleNamespace(cfg=cfg, workdir=root / "run", state=jax.device_get(run.state), root=root)


@pytest.mark.slow
def test_smoke_pretraining_lowers_loss_and_keeps_rank(pretrained):
  rows = read_metrics(pretrained.workdir)
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == STEPS
  first, last = np.mean(losses[:4]), np.mean(losses[-4:])
  assert last < first - 0.1, f"loss did not fall: first 4 steps {first:.4f}, last 4 {last:.4f}"
  mon = [r for r in rows if "monitor/rankme" in r]
  assert [r["step"] for r in mon] == [10, 20, STEPS]
  assert all(r["monitor/rankme"] > pretrained.cfg.monitor.min_rankme for r in mon), mon
  assert json.loads((pretrained.workdir / "done.json").read_text())["step"] == STEPS


class _Kill(Exception):
  pass


@pytest.mark.slow
def test_resume_is_bit_identical(pretrained, tmp_path, capfd):
  def kill(step, state, ckpt):
    if step == STEPS - 6:  # after the checkpoint at STEPS - 8
      raise _Kill
  loop.AFTER_STEP_HOOKS.append(kill)
  try:
    with pytest.raises(_Kill):
      trainer.Run(pretrained.cfg, tmp_path / "b").train()
  finally:
    loop.AFTER_STEP_HOOKS.remove(kill)
  capfd.readouterr()
  resumed = trainer.Run(pretrained.cfg, tmp_path / "b")
  assert resumed.train() == loop.COMPLETED
  assert f"resumed from step {STEPS - 8}" in capfd.readouterr().err
  b = jax.device_get(resumed.state)
  assert int(b.step) == STEPS
  leaves_a, leaves_b = jax.tree.leaves(pretrained.state), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 50
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_teacher_starts_the_multitask_trainer_bit_equal(pretrained, tmp_path):
  """configs/m2dino.py (DINOv3 kind) + init_from=WORKDIR/teacher (DINOv2 kind): the run adopts the teacher's
  architecture, upcycles its dense FFNs into the MoE blocks, and (encoder frozen) its final checkpoint holds exactly the
  teacher's weights."""
  teacher = pretrained.workdir / "teacher"
  _, saved = convert.load_encoder_params(teacher)
  # without adoption the mismatch is named
  dinov3 = vit.Encoder(vit.ViTConfig.from_config({"variant": "mu/16", "in_chans": 1, "num_registers": 2}),
                       rngs=nnx.Rngs(0))
  with pytest.raises(DataError, match="architectures differ.*kind: model 'dinov3' vs checkpoint 'dinov2'"):
    convert.init_encoder_from(dinov3, teacher)
  work = tmp_path / "mt"
  assert cli.main(["train", "--config=configs/m2dino.py:paradigm=au,smoke,tasks=fetal_plane_cls",
                   f"--workdir={work}", f"--config.init_from={teacher}", "--config.init_from_adopt=True",
                   "--config.total_steps=1",
                   "--config.optim.freeze=all_but_heads", "--config.data.image_size=64",
                   "--config.data.source.synthetic_count=8", "--config.data.batch_size=4",
                   "--config.data.eval_batch_size=8", "--config.tensorboard=False",
                   "--config.checkpoint.async_save=False"]) == 0
  run_cfg = predict.load_config(work)
  m = run_cfg.model
  assert (m.kind, m.pos_grid, m.key_bias, m.layerscale_init, m.norm_eps, m.variant) == \
      ("dinov2", 4, True, None, 1e-6, "mu/16"), m
  enc, _ = nnx.eval_shape(lambda: mt_trainer.build_modules(run_cfg, registry.resolve("fetal_plane_cls"),
                                                           moe_on=True, seed=0))
  assert enc.cfg.kind == "dinov2" and [b.is_moe for b in enc.blocks] == [False, False, True, True]
  state = checkpointing.restore_params(work / "all" / "ckpt" / "1" / "state")
  got = flat(state["params"]["encoder"])
  dense_to_experts = {"up.kernel": "w_in", "up.bias": "b_in", "down.kernel": "w_out", "down.bias": "b_out"}
  checked = set()
  for name, want in saved.items():
    block, _, rest = name.partition(".mlp.")
    experts = f"{block}.mlp.{dense_to_experts.get(rest, '')}"
    if block in ("blocks.2", "blocks.3") and rest:  # MoE blocks: every expert is the dense FFN
      assert got[experts].shape[0] == run_cfg.moe.num_experts
      for e in range(run_cfg.moe.num_experts):
        np.testing.assert_array_equal(got[experts][e], want, err_msg=f"{name} -> expert {e}")
      checked.add(experts)
    else:
      np.testing.assert_array_equal(got[name], want, err_msg=name)
      checked.add(name)
  left = set(got) - checked  # only the routers are new
  assert left and all(k.split(".mlp.")[1] in ("router", "task_bias", "task_gate") for k in left), left


@pytest.mark.slow
def test_dinov2_pth_round_trip_and_init_from(pretrained, tmp_path):
  teacher = pretrained.workdir / "teacher"
  cfg, saved = convert.load_encoder_params(teacher)
  model = vit.Encoder(cfg, rngs=nnx.Rngs(5))
  convert.init_encoder_from(model, teacher)
  pth = dinov2_pth.save_pth(model, tmp_path / "teacher.pth")
  # the architecture is read off the state dict; init_from takes the .pth directly
  assert convert.architecture_diff(cfg, convert.checkpoint_config(pth)) == {}
  back = dinov2_pth.encoder_from_pth(pth, seed=9)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 1)).astype(np.float32)
  a, b = model(x), back(x)
  diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in ("cls", "patch_tokens"))
  assert diff <= 1e-5, diff
  pth_cfg, pth_params = convert.load_encoder_params(pth)
  assert set(pth_params) == set(saved)
  for k in saved:
    np.testing.assert_array_equal(pth_params[k], saved[k])
  # block-chunked training checkpoints (FSDP `block_chunks`) read the same
  chunked = {}
  for k, v in dinov2_pth.load_pth(pth).items():
    if k.startswith("teacher.backbone.blocks."):
      i = int(k.split(".")[3])
      k = k.replace(f"blocks.{i}.", f"blocks.{i // 2}.{i}.", 1)
    chunked[k] = v
  assert any(k.startswith("teacher.backbone.blocks.1.3.") for k in chunked)
  for k, v in dinov2_pth.to_params(chunked, pth_cfg).items():
    np.testing.assert_array_equal(v, saved[k])

  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))
  evil = tmp_path / "evil.pth"
  evil.write_bytes(pickle.dumps({"teacher.backbone.cls_token": Evil()}))
  with pytest.raises(DataError, match="refused"):
    dinov2_pth.load_pth(evil)


@pytest.mark.slow
def test_collapsing_config_is_stopped_by_the_monitor(tmp_path):
  cfg = smoke_config(4, **{"loss.centering": "none", "teacher.temp": 1e-4, "teacher.warmup_temp": 1e-4,
                           "monitor.every": 2, "model.depth": 2})
  with pytest.raises(trainer.CollapseError, match="teacher_entropy"):
    trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert (tmp_path / "run" / "ckpt").is_dir() and not (tmp_path / "run" / "teacher").exists()


@pytest.mark.slow
def test_sharded_step_equals_one_device():
  out = run_with_devices("""
    import json, numpy as np, jax
    from configs import ultradino
    from m2dino_jax.train.dino import trainer, data
    res = {}
    for name, n, preset in (("one", 1, "dp"), ("dp8", 8, "dp"), ("fsdp", 8, "fsdp")):
      c = ultradino.get_config("smoke,steps=4")
      c.model.depth = 2
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
  """, devices=8, timeout=600)
  diffs = json.loads(out.strip().splitlines()[-1])
  for name, (dloss, dparam) in diffs.items():
    assert abs(dloss) < 1e-4 and dparam < 1e-4, (name, dloss, dparam)
