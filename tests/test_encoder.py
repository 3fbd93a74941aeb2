"""Encoder behaviour beyond parity: jit/grad, drop-path, variants, and sharded equality on 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2dino_jax.errors import ConfigError
from m2dino_jax.models import vit
from tests.util import run_with_devices


def _tiny(**kw):
  return vit.ViTConfig.from_config(dict(variant="mu/16", out_blocks=(1, 3), **kw))


def test_variants_follow_table():
  assert vit.decode_variant("S/16") == dict(dim=384, depth=12, heads=6, mlp_dim=1536, patch=16)
  assert vit.decode_variant("B/14")["patch"] == 14
  with pytest.raises(ConfigError, match="model.variant"):
    vit.decode_variant("XL/16")
  with pytest.raises(ConfigError, match="model.bogus"):
    vit.ViTConfig.from_config({"variant": "mu/16", "bogus": 1})


def test_jit_and_grad_match_eager():
  model = vit.Encoder(_tiny(), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 32, 48, 3))
  graphdef, params = nnx.split(model)

  def loss(p, x):
    out = nnx.merge(graphdef, p)(x)
    return jnp.sum(out["cls"] ** 2) + jnp.sum(out["features"][0] ** 2)

  eager = loss(params, x)
  value, grads = jax.jit(jax.value_and_grad(loss))(params, x)
  np.testing.assert_allclose(value, eager, rtol=1e-5)
  flat = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in flat)
  # every parameter except the (unused-in-eval) mask token receives gradient
  nonzero = {".".join(map(str, p)) for p, v in nnx.to_flat_state(grads) if np.abs(np.asarray(v[...])).sum() > 0}
  assert "mask_token" not in nonzero and "blocks.3.mlp.down.kernel" in nonzero and "cls_token" in nonzero


def test_feature_maps_and_output_layout():
  model = vit.Encoder(_tiny(), rngs=nnx.Rngs(0))
  out = model(jnp.ones((3, 32, 64, 3)))
  assert out["grid"] == (2, 4)
  assert out["cls"].shape == (3, 64) and out["registers"].shape == (3, 4, 64)
  assert out["patch_tokens"].shape == (3, 8, 64)
  assert [f.shape for f in out["features"]] == [(3, 2, 4, 64)] * 2
  # the last requested block is the final block: its feature map equals the final patch tokens
  np.testing.assert_allclose(out["features"][1].reshape(3, 8, 64), out["patch_tokens"], atol=1e-6)


def test_drop_path_is_random_in_training_only():
  model = vit.Encoder(_tiny(drop_path=0.5), rngs=nnx.Rngs(0))
  x = jnp.ones((4, 32, 32, 3))
  a = model(x, train=True, key=jax.random.key(0))["cls"]
  b = model(x, train=True, key=jax.random.key(1))["cls"]
  c = model(x, train=True, key=jax.random.key(0))["cls"]
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, c)
  np.testing.assert_array_equal(model(x)["cls"], model(x)["cls"])


def test_fsdp_sharded_forward_equals_single_device():
  out = run_with_devices("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from m2dino_jax.models import vit
    from m2dino_jax import mesh as mesh_lib
    cfg = vit.ViTConfig.from_config(dict(variant="mu/16", out_blocks=(2,)))
    model = vit.Encoder(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    gdef, state = nnx.split(model)
    fwd = lambda s, x: nnx.merge(gdef, s)(x)["patch_tokens"]
    ref = np.asarray(jax.jit(fwd)(state, x))
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
    rules = mesh_lib.get_rules("fsdp")
    sh_state = mesh_lib.shard_state(state, mesh, rules)
    kernel = sh_state["blocks"][0]["mlp"]["up"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp"), kernel.sharding.spec  # tensor axis has size 1
    assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (16, 256)
    xs = mesh_lib.shard_batch(np.asarray(x), mesh, rules)
    with jax.set_mesh(mesh):
      got = jax.jit(fwd)(sh_state, xs)
    print("MAXDIFF", float(np.abs(np.asarray(got) - ref).max()))
  """)
  diff = float(out.split("MAXDIFF")[1])
  assert diff <= 1e-5, diff


def test_every_encoder_parameter_has_logical_axes():
  model = vit.Encoder(_tiny(), rngs=nnx.Rngs(0))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim, (path, names)
