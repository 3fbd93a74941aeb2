"""`m2dino bench train`: the PyTorch reference computes what our JAX step computes, and the FLOP count.

The benchmark's speed ratio only means something if both sides do the same work: the torch MoE must equal
our MoEFFN on the same weights (with and without capacity drops), and the whole reference train step
(backbone, MoE, head, loss, AdamW) must follow ours step by step on a tiny model.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from m2dino_jax.bench import torch_ref, train
from m2dino_jax.models.moe import MoEFFN, default_moe_config
from tests.util import run_with_devices

DIM, HIDDEN, EXPERTS, TASKS = 8, 12, 4, 3


def _moe_pair(capacity_factor: float):
  """Our MoEFFN (random weights, dense back-end) and a TorchMoE holding the same weights."""
  cfg = default_moe_config()
  cfg.update({"enabled": True, "num_experts": EXPERTS, "top_k": 2, "capacity_factor": capacity_factor})
  ours = MoEFFN(DIM, HIDDEN, cfg, TASKS, rngs=nnx.Rngs(0))
  state = nnx.state(ours, nnx.Param)
  pure = nnx.to_pure_dict(state)
  rng = np.random.default_rng(1)
  pure = jax.tree.map(lambda v: jnp.asarray(0.5 * rng.standard_normal(v.shape), v.dtype), pure)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(ours, state)
  ref = torch_ref.TorchMoE(DIM, HIDDEN, EXPERTS, 2, TASKS, capacity_factor=capacity_factor,
                           balance_weight=cfg.balance_loss_weight, z_weight=cfg.z_loss_weight)
  with torch.no_grad():
    for name, value in pure.items():
      getattr(ref, name).copy_(torch.from_numpy(np.array(value)))
  return ours, ref


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_torch_moe_equals_ours(capacity_factor):
  ours, ref = _moe_pair(capacity_factor)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 9, DIM)).astype(np.float32)
  cot = rng.standard_normal((2, 9, DIM)).astype(np.float32)
  task_ids = np.array([0, 2], np.int32)
  graphdef, params = nnx.split(ours, nnx.Param)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x, task_ids, train=True)
    return jnp.sum(y * cot) + aux["aux_loss"], (y, aux)

  (value, (y, aux)), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)

  xt = torch.from_numpy(x).requires_grad_(True)
  ref.task_ids = torch.from_numpy(task_ids.astype(np.int64))
  yt = ref(xt)
  value_t = (yt * torch.from_numpy(cot)).sum() + ref.aux["aux_loss"]
  value_t.backward()

  drops = float(aux["drop_fraction"])
  assert drops == pytest.approx(float(ref.aux["drop_fraction"]), abs=1e-7)
  assert (drops > 0) == (capacity_factor > 0)  # the capacity case really drops assignments
  np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(aux["aux_loss"], ref.aux["aux_loss"].item(), atol=1e-5, rtol=1e-6)
  np.testing.assert_allclose(value, value_t.item(), atol=1e-5, rtol=1e-6)
  np.testing.assert_allclose(g_x, xt.grad.numpy(), atol=1e-5, rtol=0)
  for name, grad in nnx.to_pure_dict(g_params).items():
    np.testing.assert_allclose(grad, getattr(ref, name).grad.numpy(), atol=1e-5, rtol=1e-5, err_msg=name)


def test_flop_count_by_hand():
  # dim 8, depth 2, mlp 16, patch 4 on 8 px (4 patches) grey, 1 register: 6 tokens; MoE in block 1 (E 4, top 2).
  tiny = dict(dim=8, depth=2, mlp_dim=16, patch=4, image_size=8, channels=1, registers=1, moe_layers=(1,),
              num_experts=4, top_k=2)
  patch_embed = 2 * 4 * 16 * 8                 # 4 patches x (16 -> 8)
  qkvo = 2 * 6 * 4 * 8 * 8                     # per block
  attention = 2 * 2 * 6 * 6 * 8                # q k^T and p v, per block
  ffn = 2 * 6 * (8 * 16 + 16 * 8)              # dense block 0
  moe = 2 * 6 * 8 * 4 + 2 * ffn                # router + two experts per token, block 1
  encoder = patch_embed + 2 * (qkvo + attention) + ffn + moe
  assert encoder == 19072
  cls = train.train_flops_per_image(**tiny, head="cls", num_classes=3)
  assert cls["tokens"] == 6 and cls["encoder_fwd"] == encoder
  assert cls["head_fwd"] == 2 * 16 * 3 and cls["train"] == 3 * (19072 + 96)

  # UperNet-lite, 4 inputs on the 2 x 2 grid at 4 channels: levels 8x8, 4x4, 2x2, 1x1.
  seg = train.train_flops_per_image(**tiny, head="seg", num_classes=2, seg_channels=4, seg_inputs=4)
  lateral = 4 * 2 * 4 * 8 * 4                  # 4 maps of 4 positions, 8 -> 4
  smooth = 2 * 9 * 4 * 4 * (64 + 16 + 4 + 1)
  fuse = 2 * 9 * 16 * 4 * 64
  classify = 2 * 4 * 2 * 64
  assert seg["head_fwd"] == lateral + smooth + fuse + classify == 100256
  assert seg["train"] == 3 * (encoder + 100256)


def test_seg_head_and_loss_equal_ours():
  """UperNet-lite in torch (1x1 / 3x3 convs, antialiased bilinear resizes, GroupNorm) vs heads.SegHead."""
  from m2dino_jax.models import convert, heads
  from m2dino_jax.tasks import losses
  dim, classes, channels, grid, size = 16, 3, 8, 4, 64
  torch.manual_seed(0)
  ref = torch_ref.SegHead(dim, classes, 4, channels)
  with torch.no_grad():
    for p in ref.parameters():  # non-zero biases and norm parameters too
      p.add_(0.1 * torch.randn_like(p))
  ours = heads.SegHead(dim, classes, 4, channels, 16, rngs=nnx.Rngs(0))
  convert.assign(ours, ref.jax_params(), "torch SegHead")
  rng = np.random.default_rng(3)
  feats = [rng.standard_normal((2, grid, grid, dim)).astype(np.float32) for _ in range(4)]
  mask = rng.integers(0, classes, (2, size, size))
  pred = nnx.jit(lambda m, f: m({"features": f, "grid": (grid, grid)}, (size, size)))(ours, tuple(feats))
  pred_t = ref(None, None, [torch.from_numpy(f.transpose(0, 3, 1, 2).copy()) for f in feats], (size, size))
  np.testing.assert_allclose(pred, pred_t.detach().permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)
  loss, _ = losses.segmentation_loss(pred, mask, np.ones(2, bool), classes)
  loss_t = torch_ref.task_loss("seg", pred_t, torch.from_numpy(mask), classes)
  np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-6)


@pytest.fixture
def one_torch_thread():
  """One torch thread: on a shared, busy machine OpenMP threads mostly wait for each other."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


def _tiny_args(*extra):
  p = argparse.ArgumentParser()
  train.add_args(p)
  return p.parse_args(["--variant", "mu/16", "--size", "32", "--batch", "2", "--moe-layers", "last2",
                       "--experts", "4", "--capacity-factor", "1.0", *extra])


def test_reference_step_follows_ours(one_torch_thread):
  """Tiny model, MoE with capacity drops, cls head: equal losses before and after one AdamW update; the
  JAX steps (which donate their state) leave the torch weights alone."""
  s = train._setup(_tiny_args(), moe_on=True)
  assert s["params"]["jax"] == s["params"]["torch"]
  before = {k: v.clone() for k, v in s["torch_model"].state_dict().items()}
  jax_step, torch_step = s["fns"]["jax float32"], s["fns"]["torch float32"]
  j0, j1 = jax_step(), jax_step()
  for k, v in s["torch_model"].state_dict().items():
    assert torch.equal(v, before[k]), k
  t0, t1 = torch_step(), torch_step()
  np.testing.assert_allclose([j0, j1], [t0, t1], rtol=2e-5)
  assert abs(j0 - j1) > 1e-3  # the update changed the model


def test_bf16_variants_track_fp32(one_torch_thread):
  """The mixed-precision JAX step and torch autocast start from the fp32 loss (bf16 rounding only) and take
  the same first update, and the earlier attention formulation computes the same step as the default."""
  s = train._setup(_tiny_args(), moe_on=False, jax_variants=("float32", "float32/xla", "bfloat16"),
                   torch_variants=("float32", "bfloat16"))
  losses = {name: [fn(), fn()] for name, fn in s["fns"].items()}
  np.testing.assert_allclose(losses["jax float32/xla"], losses["jax float32"], rtol=1e-6)
  for impl in ("jax", "torch"):
    np.testing.assert_allclose(losses[f"{impl} bfloat16"], losses[f"{impl} float32"], rtol=5e-3)
  np.testing.assert_allclose(losses["jax bfloat16"], losses["torch bfloat16"], rtol=5e-3)
  assert losses["jax bfloat16"] != losses["jax float32"]  # the bf16 variant really rounds


def _flop_args(*extra):
  return _tiny_args("--size", "64", "--batch", "4", *extra)


# XLA counts every op of the compiled step: besides the matmuls, the norms, softmax, GELU, the loss and AdamW's
# elementwise updates (a few percent at 21 tokens x 4 images), and for the MoE the dense back-end's dispatch and
# combine einsums over the (tokens x experts x capacity) one-hot tensors and the capacity padding of the expert
# matmuls (the analytic count has top_k experts per token, without padding). Measured: 1.05 dense, 1.32 MoE.
XLA_OVER_ANALYTIC = {False: (1.0, 1.15), True: (1.15, 1.5)}


@pytest.mark.parametrize("moe_on", [False, True], ids=["dense", "moe"])
def test_train_step_flops_against_xla(moe_on):
  """The analytic count of the multi-task train step (what MFU uses) against XLA's count of the program the
  benchmark times: within the band above, the MoE step above the dense one."""
  j = train.jax_step(_flop_args(), moe_on, train.data_mesh())
  low, high = XLA_OVER_ANALYTIC[moe_on]
  analytic = j["flops"]["train"] * 4
  assert low <= j["xla_flops"] / analytic <= high, j["xla_flops"] / analytic
  if moe_on:  # the MoE blocks add the router and a second expert per token to the count
    dense = train.train_flops_per_image(dim=64, depth=4, mlp_dim=256, patch=16, image_size=64, channels=1,
                                        registers=4, num_classes=j["task"].num_classes)["train"]
    assert j["moe_layers"] == [2, 3] and j["flops"]["train"] - dense == 3 * 2 * 2 * 21 * (64 * 4 + 2 * 64 * 256)


def test_train_step_runs_data_parallel_over_every_local_device():
  """On a host with 2 devices the benchmark's step runs on a 2-device data mesh (batch split, state replicated),
  XLA's per-device count is scaled to the whole step (the same band as on one device), and the per-device rates
  divide by 2; a batch that does not split is refused."""
  out = run_with_devices("""
    import argparse
    from m2dino_jax.bench import common, train
    from m2dino_jax.errors import ConfigError
    p = argparse.ArgumentParser()
    train.add_args(p)
    base = ["--variant", "mu/16", "--size", "64", "--moe-layers", "last2", "--experts", "4"]
    mesh = train.data_mesh()
    j = train.jax_step(p.parse_args(base + ["--batch", "4"]), False, mesh)
    shard = j["compiled"].input_shardings[0][1]["image"]
    print("DEVICES", mesh.devices.size, len(shard.device_set), shard.spec)
    print("RATIO", j["xla_flops"] / (j["flops"]["train"] * 4))
    print("LOSS", j["step"]() > 0)
    args = argparse.Namespace(_device={"peak_tflops_per_device": 1.0})
    t = common.throughput(args, images=4, seconds=1.0, flops=4e12, devices=mesh.devices.size)
    print("PER_DEVICE", t["images_per_s_per_device"], t["tflops_per_device"], t["mfu"])
    try:
      train.jax_step(p.parse_args(base + ["--batch", "3"]), False, mesh)
    except ConfigError as e:
      print("REFUSED", e)
  """, devices=2)
  vals = dict(line.split(" ", 1) for line in out.splitlines() if line.split(" ", 1)[0].isupper())
  assert vals["DEVICES"] == "2 2 P('data',)"
  low, high = XLA_OVER_ANALYTIC[False]
  assert low <= float(vals["RATIO"]) <= high, vals["RATIO"]
  assert vals["LOSS"] == "True" and vals["PER_DEVICE"] == "2.0 2.0 2.0"
  assert "--batch 3 does not split over the 2 local devices" in vals["REFUSED"]


def test_torch_reference_is_cpu_only_and_gets_no_accelerator_mfu():
  assert train.torch_variants_of("auto", accelerator=False) == ["float32"]
  assert train.torch_variants_of("auto", accelerator=True) == []
  assert train.torch_variants_of("none", accelerator=False) == []
  assert train.torch_variants_of("float32,bfloat16", accelerator=True) == ["float32", "bfloat16"]
  from m2dino_jax.bench import common
  args = argparse.Namespace(_device={"peak_tflops_per_device": 989.0})
  cpu_on_gpu_host = common.throughput(args, images=8, seconds=2.0, flops=2e12, peak_applies=False)
  assert cpu_on_gpu_host == {"images_per_s_per_device": 4.0, "tflops_per_device": 1.0,
                             "xla_tflops_per_device": None, "mfu": None}
