"""UNETR / classifier heads and sliding-window inference, against brute-force loops and the MAE encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2dino_jax.errors import ConfigError
from m2dino_jax.models import mae3d, unetr


def _brute_force(predict, vol, crop, origins, weights):
  """Each voxel: the weighted mean of the outputs of the windows (given origins) that contain it."""
  acc = np.zeros(vol.shape[:3] + (2,))
  norm = np.zeros(vol.shape[:3])
  for o in origins:
    sl = tuple(slice(a, a + crop) for a in o)
    out = predict(vol[sl][None])[0]
    acc[sl] += out * weights[..., None]
    norm[sl] += weights
  return acc / norm[..., None]


def test_window_starts_cover_the_axis_with_the_last_flush():
  assert unetr.window_starts(10, 6, 0.5) == [0, 3, 4]
  assert unetr.window_starts(12, 6, 0.0) == [0, 6]
  assert unetr.window_starts(5, 6, 0.5) == [0]
  assert unetr.window_starts(96, 32, 0.25) == [0, 24, 48, 64]
  with pytest.raises(ConfigError, match="data.overlap"):
    unetr.window_starts(10, 6, 1.0)


@pytest.mark.parametrize("weighting", ["constant", "gaussian"])
def test_sliding_window_matches_a_brute_force_loop(weighting):
  rng = np.random.default_rng(0)
  vol = rng.standard_normal((10, 7, 6, 1)).astype(np.float32)
  calls = []

  def predict(w):  # window-dependent (its mean) plus a voxel-wise part
    calls.append(len(w))
    m = w.mean(axis=(1, 2, 3, 4), keepdims=True)[..., 0]
    return np.stack([w[..., 0] + m, np.broadcast_to(m, w.shape[:4])], axis=-1)

  out = unetr.sliding_window(predict, vol, 6, overlap=0.5, batch=4, weighting=weighting)
  assert calls == [4, 4] and out.shape == (10, 7, 6, 2)  # 6 windows in batches of 4, the last padded
  origins = [(x, y, z) for x in (0, 3, 4) for y in (0, 1) for z in (0,)]
  weights = unetr._gaussian(6) if weighting == "gaussian" else np.ones((6, 6, 6))
  np.testing.assert_allclose(out, _brute_force(predict, vol, 6, origins, weights), rtol=1e-5, atol=1e-6)


def test_sliding_window_of_a_voxelwise_predictor_is_the_whole_volume_prediction():
  """Any overlap and a volume smaller than the crop along one axis (padded, then cut)."""
  vol = np.random.default_rng(1).standard_normal((9, 4, 8)).astype(np.float32)
  f = lambda w: np.concatenate([np.tanh(w), w ** 2], axis=-1)
  for overlap in (0.0, 0.25, 0.5, 0.75):
    out = unetr.sliding_window(f, vol, 5, overlap=overlap, batch=3)
    np.testing.assert_allclose(out, f(vol[..., None]), rtol=1e-6, atol=1e-6)


def test_skips_levels_and_config_errors():
  assert unetr.default_skips(12, 16) == (2, 5, 8)  # blocks 3, 6, 9 (1-based), as in UNETR
  assert unetr.default_skips(4, 8) == (0, 2)
  assert unetr.levels(16) == 4
  with pytest.raises(ConfigError, match="model.patch"):
    unetr.levels(12)
  enc = mae3d.MAE3DConfig.from_config(dict(variant="mu/8", crop=16, depth=2, dec_dim=16, dec_depth=1, dec_heads=2))
  with pytest.raises(ConfigError, match="head.skips"):
    unetr.resolve_skips(unetr.HeadConfig(skips=(0, 5)), enc)
  with pytest.raises(ConfigError, match="head.pool"):
    unetr.HeadConfig.from_config({"pool": "max"}, "classification", 2)
  with pytest.raises(ConfigError, match="head.bogus"):
    unetr.HeadConfig.from_config({"bogus": 1}, "classification", 2)


def test_finetune_encoder_is_the_mae_encoder_and_heads_have_the_right_shapes():
  enc = mae3d.MAE3DConfig.from_config(dict(variant="mu/8", crop=16, depth=2, dec_dim=16, dec_depth=1, dec_heads=2))
  mae = mae3d.MAE3D(enc, rngs=nnx.Rngs(3))
  own = mae3d.Encoder3D(enc, rngs=nnx.Rngs(3))
  _, mp = nnx.split(mae, nnx.Param)
  _, ep = nnx.split(own, nnx.Param)
  assert set(ep.keys()) == set(mae3d.ENCODER_KEYS)
  for k in mae3d.ENCODER_KEYS:  # same seed, same draw order: identical weights under identical names
    for a, b in zip(jax.tree.leaves(mp[k]), jax.tree.leaves(ep[k])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  vol = jnp.asarray(np.random.default_rng(0).standard_normal((1, 16, 16, 24, 1)), jnp.float32)
  ref, (tokens, tapped) = nnx.jit(lambda m, o, v: (m.encode(v), o(v, taps=(1, 0, 1))))(mae, own, vol)
  np.testing.assert_allclose(np.asarray(tokens), np.asarray(ref), rtol=1e-6, atol=1e-6)
  assert tokens.shape == (1, 1 + 2 * 2 * 3, 64) and len(tapped) == 3
  np.testing.assert_allclose(np.asarray(own.norm(tapped[0])), np.asarray(tokens), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(tapped[0]), np.asarray(tapped[2]))
  seg = unetr.FineTune3D(enc, unetr.HeadConfig(task="segmentation", num_classes=5, feature_size=4), rngs=nnx.Rngs(0))
  assert seg.skips == (0, 0) and nnx.jit(lambda m, v: m(v))(seg, vol).shape == (1, 16, 16, 24, 5)
  cls = unetr.FineTune3D(enc, unetr.HeadConfig(task="classification", num_classes=3, hidden=8, pool="cls_mean"),
                         rngs=nnx.Rngs(0))
  assert nnx.jit(lambda m, v: m(v))(cls, vol).shape == (1, 3)


def test_without_the_raw_voxel_path_the_logits_are_a_function_of_the_encoder_tokens_only():
  enc = mae3d.MAE3DConfig.from_config(dict(variant="mu/8", crop=16, depth=2, dec_dim=16, dec_depth=1, dec_heads=2))
  vol = jnp.asarray(np.random.default_rng(0).standard_normal((1, 16, 16, 16, 1)), jnp.float32)
  grid = (2, 2, 2)
  for raw_skip in (True, False):
    seg = unetr.FineTune3D(enc, unetr.HeadConfig(num_classes=3, feature_size=4, raw_skip=raw_skip), rngs=nnx.Rngs(0))
    full, blind = nnx.jit(lambda m, v: (m(v), m.head(jnp.zeros_like(v), *m.encoder(v, m.skips), grid)))(seg, vol)
    assert full.shape == (1, 16, 16, 16, 3)
    _, params = nnx.split(seg, nnx.Param)
    level0 = seg.head.ups[-1].block.conv1.kernel.value.shape  # the level-0 block reads (upsampled, raw?)
    if raw_skip:  # the decoder reads the voxels: zeroing them (encoder tokens fixed) changes the logits
      assert "stem" in params["head"] and level0 == (3, 3, 3, 8, 4)
      assert np.abs(np.asarray(full) - np.asarray(blind)).max() > 1e-3
    else:  # only the encoder reads the voxels
      assert "stem" not in params["head"] and level0 == (3, 3, 3, 4, 4)
      np.testing.assert_array_equal(np.asarray(full), np.asarray(blind))
  with pytest.raises(ConfigError, match="head.raw"):
    unetr.HeadConfig.from_config({"raw": False}, "segmentation", 2)
