"""3D MAE: patchify, position embedding, masking and loss against NumPy loops; encoder blocks = 2D ViT blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2dino_jax.errors import ConfigError
from m2dino_jax.models import mae3d, vit

TINY = dict(variant="mu/4", crop=16, dec_dim=32, dec_depth=1, dec_heads=2)


def _np_patchify(vol, p):
  b, d, h, w, c = vol.shape
  out = np.zeros((b, (d // p) * (h // p) * (w // p), p ** 3 * c), vol.dtype)
  for bi in range(b):
    n = 0
    for i in range(d // p):
      for j in range(h // p):
        for k in range(w // p):
          vec = []
          for a in range(p):
            for bb in range(p):
              for cc in range(p):
                vec.extend(vol[bi, i * p + a, j * p + bb, k * p + cc, :])
          out[bi, n] = vec
          n += 1
  return out


def test_patchify_matches_loop_and_inverts():
  vol = np.random.default_rng(0).standard_normal((2, 8, 12, 4, 2)).astype(np.float32)
  got = np.asarray(mae3d.patchify(jnp.asarray(vol), 4))
  np.testing.assert_array_equal(got, _np_patchify(vol, 4))
  back = mae3d.unpatchify(jnp.asarray(got), 4, (2, 3, 1), 2)
  np.testing.assert_array_equal(np.asarray(back), vol)


def test_sincos_3d_matches_formula():
  dim, grid = 20, (2, 3, 4)
  got = mae3d.sincos_3d(dim, grid)
  per = 2 * (dim // 6)  # 6 channels per axis, 2 zero channels
  ref = np.zeros((24, dim))
  n = 0
  for i in range(2):
    for j in range(3):
      for k in range(4):
        for ax, pos in enumerate((i, j, k)):
          for m in range(per // 2):
            omega = 1.0 / 10000 ** (m / (per / 2))
            ref[n, ax * per + m] = np.sin(pos * omega)
            ref[n, ax * per + per // 2 + m] = np.cos(pos * omega)
        n += 1
  np.testing.assert_allclose(got, ref, atol=1e-6)
  with pytest.raises(ConfigError, match="model.dim"):
    mae3d.sincos_3d(4, grid)


def test_random_masking_keeps_the_lowest_noise_patches():
  key, b, n, ratio = jax.random.key(3), 4, 27, 0.75
  ids_keep, mask, ids_restore = map(np.asarray, mae3d.random_masking(key, b, n, ratio))
  noise = np.asarray(jax.random.uniform(key, (b, n)))
  keep = int(n * (1 - ratio))
  assert ids_keep.shape == (b, keep) and keep == 6
  for i in range(b):
    order = sorted(range(n), key=lambda j: noise[i, j])
    assert list(ids_keep[i]) == order[:keep]
    assert mask[i].sum() == n - keep
    assert all(mask[i, j] == (0 if j in order[:keep] else 1) for j in range(n))
    np.testing.assert_array_equal(np.argsort(np.argsort(noise[i])), ids_restore[i])
  # over many draws every patch is masked about 75% of the time
  _, m, _ = mae3d.random_masking(jax.random.key(0), 4000, 8, 0.75)
  np.testing.assert_allclose(np.asarray(m).mean(0), 0.75, atol=0.03)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_numpy_and_ignores_visible_patches(norm_pix):
  cfg = mae3d.MAE3DConfig.from_config({**TINY, "norm_pix_loss": norm_pix})
  model = mae3d.MAE3D(cfg, rngs=nnx.Rngs(0))
  vol = np.random.default_rng(1).standard_normal((2, 16, 16, 16, 1)).astype(np.float32)
  out = nnx.jit(lambda m, v, k: m(v, k))(model, jnp.asarray(vol), jax.random.key(5))
  pred, mask = np.asarray(out["pred"], np.float64), np.asarray(out["mask"])
  tgt = _np_patchify(vol, 4).astype(np.float64)
  if norm_pix:
    tgt = (tgt - tgt.mean(-1, keepdims=True)) / np.sqrt(tgt.var(-1, keepdims=True) + 1e-6)
  num = den = 0.0
  per_sample = []
  for i in range(2):
    s = d = 0.0
    for j in range(tgt.shape[1]):
      if mask[i, j]:
        s += np.mean((pred[i, j] - tgt[i, j]) ** 2)
        d += 1
    num, den = num + s, den + d
    per_sample.append(s / d)
  assert mask.sum() == 2 * (64 - 16)
  np.testing.assert_allclose(float(out["loss"]), num / den, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["per_sample"]), per_sample, rtol=1e-5)
  grad = np.asarray(jax.grad(lambda p: mae3d.masked_loss(p, out["target"], out["mask"])[0])(out["pred"]))
  assert np.all(grad[mask == 0] == 0) and np.all(np.abs(grad[mask == 1]).sum(-1) > 0)


def test_3d_encoder_on_one_slice_equals_the_2d_encoder():
  """A volume one patch deep through the 3D encoder equals the 2D DINOv2-style encoder on the slice (depth as
  channels), with the same block weights, the 3D patch kernel permuted and the 3D sin-cos as its pos-embed."""
  cfg = mae3d.MAE3DConfig.from_config(TINY)
  model = mae3d.MAE3D(cfg, rngs=nnx.Rngs(0))
  p, g = cfg.patch, 4
  enc_cfg = vit.ViTConfig(**{**cfg.encoder_vit().__dict__, "in_chans": p, "pos_grid": g})
  enc2d = vit.Encoder(enc_cfg, rngs=nnx.Rngs(1))
  assert all(type(b) is vit.Block for b in model.blocks)
  nnx.update(enc2d.blocks, nnx.state(model.blocks))
  nnx.update(enc2d.norm, nnx.state(model.norm))
  k = model.patch_embed.kernel[...].reshape(p, p, p, 1, cfg.dim).transpose(1, 2, 0, 3, 4)
  enc2d.patch_embed.kernel[...] = k.reshape(p * p * p, cfg.dim)
  enc2d.patch_embed.bias[...] = model.patch_embed.bias[...]
  enc2d.cls_token[...] = model.cls_token[...]
  pos = mae3d.sincos_3d(cfg.dim, (1, g, g))
  enc2d.pos_embed[...] = jnp.concatenate([jnp.zeros((1, 1, cfg.dim)), jnp.asarray(pos)[None]], axis=1)
  vol = np.random.default_rng(2).standard_normal((2, p, g * p, g * p, 1)).astype(np.float32)
  got3d = np.asarray(model.encode(jnp.asarray(vol)))
  img = vol[..., 0].transpose(0, 2, 3, 1)  # [B, H, W, D]: depth as channels
  got2d = enc2d(jnp.asarray(img))
  np.testing.assert_allclose(got3d[:, 1:], np.asarray(got2d["patch_tokens"]), atol=1e-5)
  np.testing.assert_allclose(got3d[:, 0], np.asarray(got2d["cls"]), atol=1e-5)


def test_config_errors_name_the_key():
  with pytest.raises(ConfigError, match="model.crop"):
    mae3d.MAE3DConfig.from_config({**TINY, "crop": 18})
  with pytest.raises(ConfigError, match="model.mask_ratio"):
    mae3d.MAE3DConfig.from_config({**TINY, "mask_ratio": 1.0})
  with pytest.raises(ConfigError, match="model.bogus"):
    mae3d.MAE3DConfig.from_config({**TINY, "bogus": 1})


def test_remat_gives_the_same_gradients():
  vol = jax.random.normal(jax.random.key(0), (2, 16, 16, 16, 1))
  grads = []
  for remat in (False, True):
    model = mae3d.MAE3D(mae3d.MAE3DConfig.from_config({**TINY, "remat": remat}), rngs=nnx.Rngs(0))
    grad_fn = nnx.jit(nnx.grad(lambda m: m(vol, jax.random.key(1))["loss"]))
    grads.append(jax.tree.leaves(grad_fn(model)))
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, atol=1e-6)
