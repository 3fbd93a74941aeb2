"""Mixed precision (models/precision.py, model.dtype='bfloat16') and the fast forms of the encoder's
attention and RoPE against the plain ones: NumPy float64 references, the earlier formulation, fp32."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2dino_jax.errors import ConfigError
from m2dino_jax.models import precision, rope, vit


def _bf16_np(x):
  """x rounded to bf16, as float64 NumPy."""
  return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("spec,shape_a,shape_b", [
    ("ntk,kc->ntc", (2, 5, 8), (8, 6)),          # a linear layer: the weight gradient contracts n and t
    ("bhqd,bhkd->bhqk", (2, 3, 5, 4), (2, 3, 7, 4)),  # attention logits: batch dims in all three terms
    ("bhqk,bhkd->bhqd", (2, 3, 5, 7), (2, 3, 7, 4)),
])
def test_mixed_einsum_and_its_gradients_against_float64(spec, shape_a, shape_b):
  """bf16 operands, fp32 accumulation: result and both gradients equal float64 math on the bf16-rounded
  operands (the cotangent rounded too), up to fp32 rounding."""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal(shape_a).astype(np.float32), rng.standard_normal(shape_b).astype(np.float32)
  out, vjp = jax.vjp(lambda a, b: precision.einsum(spec, a, b, "bfloat16"), a, b)
  g = rng.standard_normal(out.shape).astype(np.float32)
  da, db = vjp(g)
  assert out.dtype == da.dtype == db.dtype == jnp.float32
  a64, b64, g64 = _bf16_np(a), _bf16_np(b), _bf16_np(g)
  spec_a, spec_b = precision._grad_specs(spec)
  np.testing.assert_allclose(out, np.einsum(spec, a64, b64), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(da, np.einsum(spec_a, g64, b64), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(db, np.einsum(spec_b, a64, g64), rtol=1e-5, atol=1e-5)
  # and it really rounds: the fp32 product differs at bf16's resolution
  assert np.max(np.abs(np.asarray(out) - np.einsum(spec, a.astype(np.float64), b.astype(np.float64)))) > 1e-4


def test_linear_float32_is_the_nnx_layer_and_bfloat16_rounds_inputs():
  layer = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
  layer.bias[...] = jnp.arange(6, dtype=jnp.float32) / 7
  x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
  np.testing.assert_array_equal(precision.linear(layer, x, "float32"), layer(x))
  ref = _bf16_np(x) @ _bf16_np(layer.kernel[...]) + np.asarray(layer.bias[...], np.float64)
  for xs in (x, x.reshape(10, 8)):  # rank 3 ('ntk,kc') and rank 2 ('mk,kc')
    got = precision.linear(layer, xs, "bfloat16")
    np.testing.assert_allclose(np.asarray(got).reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)


def test_grad_specs_and_dtype_checks():
  assert precision._grad_specs("ab,bc->ac") == ("ac,bc->ab", "ab,ac->bc")
  with pytest.raises(ValueError, match="matmul-like"):
    precision.einsum("ab,cd->ac", jnp.ones((2, 3)), jnp.ones((4, 5)), "bfloat16")  # b and d summed alone
  with pytest.raises(ConfigError, match="model.dtype"):
    vit.ViTConfig.from_config({"variant": "mu/16", "dtype": "float16"})
  with pytest.raises(ConfigError, match="model.attention"):
    vit.ViTConfig.from_config({"variant": "mu/16", "attention": "flash"})


def test_token_rope_equals_patch_rope_bit_for_bit():
  """Full-length tables (identity prefix rows, sign in the sine) == slicing, rotating and concatenating."""
  cos, sin = rope.rope_tables(3, 4, 16, 100.0)
  x = jax.random.normal(jax.random.key(0), (2, 5 + 12, 3, 16))  # [B, T, heads, head_dim], 5 prefix tokens
  ref = rope.apply_rope(x, cos, sin, 5)
  got = rope.apply_token_rope(x.transpose(0, 2, 1, 3), *rope.token_tables(cos, sin, 5)).transpose(0, 2, 1, 3)
  np.testing.assert_array_equal(got, ref)


def _encoder_loss(cfg, seed=0):
  """A jitted (loss, grads) of a random projection of the encoder outputs, and the params."""
  enc = vit.Encoder(cfg, rngs=nnx.Rngs(seed))
  gdef, params = nnx.split(enc)
  key_x, key_r = jax.random.split(jax.random.key(seed + 1))
  x = jax.random.normal(key_x, (2, 32, 48, cfg.in_chans))

  def loss(p):
    out = nnx.merge(gdef, p)(x)
    proj = jax.random.normal(key_r, out["patch_tokens"].shape)
    return jnp.sum(out["patch_tokens"] * proj) + jnp.sum(out["cls"])

  return jax.jit(jax.value_and_grad(loss)), params


def _max_rel(a, b):
  return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(x))) for x, y in zip(jax.tree.leaves(a),
                                                                                   jax.tree.leaves(b)))


@pytest.mark.parametrize("kind", ["dinov3", "dinov2"])
def test_matmul_attention_equals_dot_product_attention(kind):
  """The default attention (batched matmuls, RoPE tables once, deferred normalisation) computes what the
  earlier jax.nn.dot_product_attention form does: loss and every gradient within 1e-5."""
  cfg = vit.ViTConfig.from_config({"variant": "mu/16", "kind": kind, "num_registers": 2, "layerscale_init": 1.0,
                                   "pos_grid": 4})
  results = {}
  for impl in ("xla", "matmul"):
    fn, params = _encoder_loss(dataclasses.replace(cfg, attention=impl))
    results[impl] = fn(params)
  (l_ref, g_ref), (l_new, g_new) = results["xla"], results["matmul"]
  np.testing.assert_allclose(l_new, l_ref, rtol=1e-5)
  assert _max_rel(g_ref, g_new) < 1e-5


def test_bfloat16_encoder_is_close_to_float32():
  cfg = vit.ViTConfig.from_config({"variant": "mu/16", "num_registers": 2, "layerscale_init": 1.0})
  (l32, g32), params = (lambda f, p: (f(p), p))(*_encoder_loss(cfg))
  fn16, _ = _encoder_loss(dataclasses.replace(cfg, dtype="bfloat16"))
  l16, g16 = fn16(params)
  assert jax.tree.leaves(g16)[0].dtype == jnp.float32  # fp32 master weights, fp32 gradients
  assert 0 < abs(float(l16 - l32)) < 2e-2 * abs(float(l32))
  assert 1e-4 < _max_rel(g32, g16) < 5e-2


@pytest.mark.slow
def test_bfloat16_training_follows_float32():
  """A few AdamW steps of a tiny multi-task model (seg and cls heads, 4 steps each): the mixed-precision loss
  curve stays within bf16 noise of fp32's and learns as much."""
  from m2dino_jax import configlib
  from m2dino_jax.tasks import registry
  from m2dino_jax.train import core, optim
  from m2dino_jax.train.multitask import steps, trainer

  tasks = [registry.get("fetal_head"), registry.get("breast_2cls")]
  rng = np.random.default_rng(0)
  image = rng.standard_normal((4, 32, 32, 1)).astype(np.float32)
  batches = [{"image": image, "task_id": np.full((4,), tasks[0].task_id, np.int32), "valid": np.ones(4, bool),
              "mask": (image[..., 0] > 0.3).astype(np.int32)},
             {"image": image, "task_id": np.full((4,), tasks[1].task_id, np.int32), "valid": np.ones(4, bool),
              "label": (image.mean(axis=(1, 2, 3)) > 0).astype(np.int32)}]
  curves = {}
  for dtype in ("float32", "bfloat16"):
    c = configlib.load_config("configs/m2dino.py:paradigm=ts,smoke", [f"model.dtype={dtype}", "heads.seg_channels=16"])
    encoder, heads = trainer.build_modules(c, tasks, moe_on=False, seed=0)
    enc_gdef, enc_params, enc_rest, head_gdefs, head_params = trainer.split_model(encoder, heads)
    tx = optim.adam_tx(c.optim)
    settings = steps.Settings(lr_schedule=optim.lr_schedule(c.optim, 100), tx=tx, head_lr_mult=1.0, clip_norm=1.0,
                              loss_cfg=c.loss, enc_scales=jax.tree.map(lambda _: np.float32(1), enc_params))
    state = core.TrainState(step=jnp.int32(0), params={"encoder": enc_params, "heads": head_params},
                            opt_state={"encoder": tx.init(enc_params),
                                       "heads": {n: tx.init(p) for n, p in head_params.items()}},
                            rng=jnp.asarray(core.seed_data(0)))
    losses = []
    for t, batch in zip(tasks, batches):
      program = jax.jit(steps.train_program(enc_gdef, {t.name: head_gdefs[t.name]}, [t], settings))
      bound = steps.bound_inputs([t], {}, enc_rest)
      for _ in range(4):
        state, m = program(state, batch, bound)
        losses.append(float(m["loss"]))
    assert state.params["encoder"]["norm"]["scale"][...].dtype == jnp.float32
    curves[dtype] = np.array(losses)
  np.testing.assert_allclose(curves["bfloat16"], curves["float32"], rtol=2e-2)
  assert not np.array_equal(curves["bfloat16"], curves["float32"])
  for c in curves.values():  # both learn: each task's loss falls over its 4 steps
    assert c[3] < c[0] and c[7] < c[4]
