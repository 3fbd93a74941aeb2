"""init_from across encoder kinds: a config adopts the checkpoint's architecture (convert.adopt_architecture) and
keeps its own settings; DINOv2 .pth architectures are read off the state dict. (The end-to-end hand-off of a
trained UltraDINO teacher to the multi-task trainer is in test_dino_train.py.)"""

import numpy as np
import pytest
from flax import nnx

from m2dino_jax import cli, configlib
from m2dino_jax.errors import DataError
from m2dino_jax.models import convert, dinov2_pth, vit


def _teacher(tmp_path, **kw):
  cfg = vit.ViTConfig(**{**dict(kind="dinov2", dim=64, depth=4, heads=2, mlp_dim=256, patch=16, in_chans=1,
                                num_registers=2, pos_grid=4, key_bias=True, layerscale_init=None, norm_eps=1e-6,
                                drop_path=0.1), **kw})
  model = vit.Encoder(cfg, rngs=nnx.Rngs(1))
  return model, convert.save_encoder(model, tmp_path / "teacher", "safetensors")


def test_m2dino_config_adopts_a_dinov2_teacher(tmp_path):
  teacher, path = _teacher(tmp_path)
  config = configlib.load_config("configs/m2dino.py:paradigm=ts,smoke", [f"init_from={path}"])
  before = vit.ViTConfig.from_config(config.model)
  changed = convert.adopt_architecture(config.model, path, verbose=False)
  assert set(changed) == {"kind", "key_bias", "norm_eps", "pos_grid", "layerscale_init"}
  after = vit.ViTConfig.from_config(config.model)
  assert convert.architecture_diff(after, teacher.cfg) == {}
  assert config.model.variant == "mu/16"
  # the run keeps its own settings
  for field in ("in_chans", "out_blocks", "drop_path", "dtype"):
    assert getattr(after, field) == getattr(before, field)
  assert convert.adopt_architecture(config.model, path, verbose=False) == {}  # idempotent
  model = vit.Encoder(after, rngs=nnx.Rngs(7))
  convert.init_encoder_from(model, path)
  want = convert.flat_params(teacher)
  got = convert.flat_params(model)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k][...]), np.asarray(want[k][...]), err_msg=k)


def test_sizes_outside_the_variants_are_written_out(tmp_path):
  teacher, path = _teacher(tmp_path, dim=48, heads=3, mlp_dim=96, depth=2)
  config = configlib.load_config("configs/m2dino.py:paradigm=ts,smoke", ["model.out_blocks=(0, 1)"])
  convert.adopt_architecture(config.model, path, verbose=False)
  assert config.model.variant == ""
  assert convert.architecture_diff(vit.ViTConfig.from_config(config.model), teacher.cfg) == {}


def test_dinov2_state_dict_architecture_and_errors(tmp_path):
  teacher, _ = _teacher(tmp_path, layerscale_init=1e-5, num_registers=0)
  pth = dinov2_pth.save_pth(teacher, tmp_path / "t.pth", prefix="backbone.")
  cfg = convert.checkpoint_config(pth)
  assert convert.architecture_diff(cfg, teacher.cfg) == {} and cfg.num_registers == 0
  # `m2dino convert --pth` writes our checkpoint with the same weights
  assert cli.main(["convert", "--pth", str(pth), "--out", str(tmp_path / "ours"), "--format", "safetensors"]) == 0
  _, ours = convert.load_encoder_params(tmp_path / "ours")
  want = convert.flat_params(teacher)
  assert set(ours) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(ours[k], np.asarray(v[...]), err_msg=k)
  sd = dinov2_pth.load_pth(pth)
  sd["backbone.cls_token"] = np.zeros((1, 1, 40), np.float32)
  sd["backbone.patch_embed.proj.weight"] = np.zeros((40, 1, 16, 16), np.float32)
  with pytest.raises(DataError, match="number of heads of a width-40"):
    dinov2_pth.config_from_state(sd)
  with pytest.raises(DataError, match="not a DINOv2 ViT state dict"):
    dinov2_pth.config_from_state({"backbone.cls_token": np.zeros((1, 1, 8))})
  with pytest.raises(DataError, match="no such checkpoint"):
    convert.checkpoint_config(tmp_path / "missing")


def test_init_from_loads_strictly_except_the_routers_upcycling_adds(tmp_path, monkeypatch):
  """A dense checkpoint fills every weight of an MoE encoder but its routers and task biases (which upcycling cannot
  provide); a checkpoint that lacks any other weight is refused, naming it."""
  import ml_collections

  from m2dino_jax.models import moe
  teacher, path = _teacher(tmp_path)
  mcfg = moe.default_moe_config()
  mcfg.update(enabled=True, layers="last2", num_experts=2, capacity_factor=0.0)
  sparse = vit.Encoder(teacher.cfg, moe=ml_collections.ConfigDict(mcfg), num_tasks=3, rngs=nnx.Rngs(5))
  convert.init_encoder_from(sparse, path)
  got, want = convert.flat_params(sparse), convert.flat_params(teacher)
  assert "blocks.3.mlp.router" in got and "blocks.3.mlp.router" not in want  # kept its initial value
  for name in ("blocks.0.norm1.scale", "blocks.3.attn.q.kernel"):
    np.testing.assert_array_equal(np.asarray(got[name][...]), np.asarray(want[name][...]))
  cfg, params = convert.load_encoder_params(path)
  params.pop("blocks.1.norm2.scale")
  monkeypatch.setattr(convert, "load_encoder_params", lambda p: (cfg, params))
  with pytest.raises(DataError, match="blocks.1.norm2.scale"):
    convert.init_encoder_from(vit.Encoder(teacher.cfg, rngs=nnx.Rngs(2)), path)
