"""Our DINOv3 / DINOv2 encoders against HF transformers models with the same random weights."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from m2dino_jax.models import convert, vit  # noqa: E402

TOL = 1e-4


def _randomise(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
  return model.eval()


def _dinov3(**kw):
  cfg = transformers.DINOv3ViTConfig(attn_implementation="eager", **kw)
  return _randomise(transformers.DINOv3ViTModel(cfg), 0)


def _dinov2(registers=False, **kw):
  if registers:
    cfg = transformers.Dinov2WithRegistersConfig(attn_implementation="eager", **kw)
    return _randomise(transformers.Dinov2WithRegistersModel(cfg), 1)
  cfg = transformers.Dinov2Config(attn_implementation="eager", **kw)
  return _randomise(transformers.Dinov2Model(cfg), 2)


def _compare(hf_model, image_hw, channels, in_chans=None, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, channels, *image_hw)).astype(np.float32)
  with torch.no_grad():
    ref = hf_model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
  overrides = {} if in_chans is None else {"in_chans": in_chans}
  ours = convert.encoder_from_hf(hf_model.state_dict(), hf_model.config.to_dict(), **overrides)
  img = x.transpose(0, 2, 3, 1)
  if in_chans == 1:
    img = img[..., :1]
  out = ours(jnp.asarray(img))
  r = ours.cfg.num_registers
  np.testing.assert_allclose(np.asarray(out["cls"]), ref[:, 0], atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(out["registers"]), ref[:, 1:1 + r], atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(out["patch_tokens"]), ref[:, 1 + r:], atol=TOL, rtol=0)
  assert vit.count_params(ours) == sum(p.numel() for p in hf_model.parameters())
  return ours


def test_dinov3_mlp_registers_non_square():
  hf = _dinov3(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
               num_register_tokens=4, image_size=64)
  _compare(hf, (48, 64), 3)


def test_dinov3_swiglu_no_registers_key_bias():
  hf = _dinov3(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, intermediate_size=160,
               num_register_tokens=0, use_gated_mlp=True, hidden_act="silu", key_bias=True, image_size=32)
  _compare(hf, (32, 32), 3)


def test_dinov3_grey_input_from_rgb_weights():
  """Grey model built from RGB weights (channels summed) == HF on the grey image replicated x3."""
  hf = _dinov3(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
               num_register_tokens=2, image_size=32)
  rng = np.random.default_rng(3)
  grey = rng.standard_normal((2, 1, 32, 48)).astype(np.float32)
  with torch.no_grad():
    ref = hf(pixel_values=torch.from_numpy(np.repeat(grey, 3, axis=1))).last_hidden_state.numpy()
  ours = convert.encoder_from_hf(hf.state_dict(), hf.config.to_dict(), in_chans=1)
  out = ours(jnp.asarray(grey.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(out["cls"]), ref[:, 0], atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(out["patch_tokens"]), ref[:, 3:], atol=TOL, rtol=0)


def test_dinov2_interpolated_position_embedding():
  hf = _dinov2(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14)
  _compare(hf, (70, 42), 3)  # 4x4 learned grid resized to 5x3


def test_dinov2_registers_swiglu_grey():
  hf = _dinov2(registers=True, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=42,
               patch_size=14, num_channels=1, use_swiglu_ffn=True, num_register_tokens=4)
  _compare(hf, (56, 84), 1)  # 3x3 grid resized (antialiased) to 4x6


def test_convert_roundtrip_safetensors_and_orbax(tmp_path):
  """HF folder -> `m2dino convert` -> our checkpoint -> init_from gives identical outputs."""
  from safetensors.torch import save_file

  from m2dino_jax import cli
  hf = _dinov3(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
               num_register_tokens=4, image_size=32)
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(hf_dir / "model.safetensors"))
  hf.config.to_json_file(str(hf_dir / "config.json"))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32, 32, 3)), jnp.float32)
  ref = convert.encoder_from_hf(hf_dir)(x)["cls"]
  for fmt in ("orbax", "safetensors"):
    out_dir = tmp_path / fmt
    assert cli.main(["convert", "--hf", str(hf_dir), "--out", str(out_dir), "--format", fmt]) == 0
    cfg, _ = convert.load_encoder_params(out_dir)
    fresh = vit.Encoder(cfg, rngs=__import__("flax").nnx.Rngs(7))
    convert.init_encoder_from(fresh, out_dir)
    np.testing.assert_array_equal(np.asarray(fresh(x)["cls"]), np.asarray(ref))


def test_convert_rejects_wrong_depth(tmp_path):
  from m2dino_jax.errors import DataError
  hf = _dinov3(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
  cfg = hf.config.to_dict()
  cfg["num_hidden_layers"] = 3
  with pytest.raises(DataError, match="missing weight 'layer.2"):
    convert.encoder_from_hf(hf.state_dict(), cfg)


def test_init_from_upcycles_dense_ffn_into_moe(tmp_path):
  """A dense checkpoint loaded into an MoE encoder: every expert equals the dense FFN, so with any routing
  (gates renormalised to 1) the MoE encoder computes exactly what the dense one does."""
  import ml_collections
  from flax import nnx

  from m2dino_jax.models import moe
  hf = _dinov3(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
               num_register_tokens=4, image_size=32)
  dense = convert.encoder_from_hf(hf.state_dict(), hf.config.to_dict())
  convert.save_encoder(dense, tmp_path / "enc", "safetensors")
  mcfg = moe.default_moe_config()
  mcfg.update(enabled=True, layers="last1", num_experts=4, capacity_factor=0.0)
  sparse = vit.Encoder(dense.cfg, moe=ml_collections.ConfigDict(mcfg), num_tasks=3, rngs=nnx.Rngs(5))
  convert.init_encoder_from(sparse, tmp_path / "enc")
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  np.testing.assert_allclose(np.asarray(sparse(x, jnp.array([0, 2]))["patch_tokens"]),
                             np.asarray(dense(x)["patch_tokens"]), atol=1e-5)
  assert sparse.blocks[1].is_moe and not sparse.blocks[0].is_moe
