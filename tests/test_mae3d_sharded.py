"""Two 3D MAE train steps on 8 simulated CPU devices equals one device under data / fsdp / tensor meshes."""

import pytest

from tests.util import run_with_devices


@pytest.mark.slow
def test_sharded_step_equals_single_device_and_shards_params():
  """Adam divides by sqrt(v) + eps, which turns reassociation noise in near-zero gradients into lr-sized
  updates; eps = 1e-6 keeps the comparison about the sharded computation (as in test_multitask)."""
  out = run_with_devices("""
    import jax, numpy as np
    from m2dino_jax import configlib, mesh as mesh_lib
    from m2dino_jax.train import mae
    def run(axes, preset, n):
      c = configlib.load_config("configs/mae3d.py:smoke", ["optim.eps=1e-6", "optim.warmup_steps=0",
                                "data.per_domain=3", "data.heldout=1", "sharding=" + preset])
      c.unlock()
      c.model.depth = 1
      mesh = mesh_lib.make_mesh(axes, jax.devices()[:n])
      data = mae.load_domains(c)
      prog = mae.Program(c, mesh, mesh_lib.get_rules(preset), 10)
      batch = mae._Batches(c, data, mae.mixture_weights(c, data))(0)
      state, m = prog.step(prog.state, batch)
      state, m = prog.step(state, batch)
      shapes = {k: state.params[k]["kernel"][...].addressable_shards[0].data.shape
                for k in ("patch_embed", "decoder_pred")}
      up = state.params["blocks"][0]["mlp"]["up"]["kernel"][...]
      shapes["up"] = up.addressable_shards[0].data.shape
      held = prog.heldout_loss(state.params, mae.heldout_crops(c, data["abd_ct"].heldout)) if n == 1 or \
          axes.get("tensor") else ref_held
      return float(m["loss"]), held, jax.device_get(state.params), shapes
    ref_held = None
    ref_loss, ref_held, ref, ref_shapes = run({"data": 1}, "dp", 1)
    print("SHAPES ref", ref_shapes)
    for axes, preset in [({"data": 8}, "dp"), ({"data": 2, "fsdp": 4}, "fsdp"),
                         ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp")]:
      loss, held, got, shapes = run(axes, preset, 8)
      diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                 for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)))
      print("CASE", "x".join(f"{k}={v}" for k, v in axes.items()), "LOSSDIFF", abs(loss - ref_loss),
            "HELDDIFF", abs(held - ref_held), "PARAMDIFF", diff, "SHAPES", shapes)
  """, timeout=400)
  print(out)
  cases = [ln for ln in out.splitlines() if ln.startswith("CASE")]
  assert len(cases) == 3, out
  for ln in cases:
    parts = ln.split()
    for tag in ("LOSSDIFF", "HELDDIFF", "PARAMDIFF"):
      assert float(parts[parts.index(tag) + 1]) <= 1e-5, out
  # ref: patch_embed (512, 64), decoder_pred (32, 512), mlp up (64, 256); each device holds its shard only
  assert "'patch_embed': (512, 64), 'decoder_pred': (32, 512), 'up': (64, 256)" in cases[0], out
  assert "'patch_embed': (512, 16), 'decoder_pred': (8, 512), 'up': (16, 256)" in cases[1], out
  assert "'patch_embed': (512, 32), 'decoder_pred': (16, 512), 'up': (32, 128)" in cases[2], out
