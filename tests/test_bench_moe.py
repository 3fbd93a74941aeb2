"""`m2dino bench moe`: the layer's analytic FLOP count (by hand and against XLA) and where the expert-parallel
scaling points run (the host's accelerators, else simulated CPU devices)."""

from __future__ import annotations

import argparse

from m2dino_jax.bench import common, moe

TINY = {"batch": 2, "tokens": 17, "dim": 32, "hidden": 64, "experts": 4, "top_k": 2, "capacity_factor": 1.25,
        "repeats": 1}


def test_layer_flops_by_hand_and_against_xla():
  s = dict(TINY, batch=2, tokens=3, dim=4, hidden=8)
  assert moe.layer_flops(s, moe=False) == 3 * 2 * 6 * (2 * 2 * 4 * 8) == 4608  # 2 experts x (4 -> 8 -> 4) per token
  assert moe.layer_flops(s) == 4608 + 3 * 2 * 6 * 4 * 4                         # + the router 4 -> 4 experts
  # XLA's count of the compiled dense baseline: the matmuls plus GELU (exact, erf), biases and the cotangent
  # product (measured 1.10 at width 128 / 256, 1.03 at ViT-S width). Below 1 the baseline skipped work: with
  # jax.grad alone XLA drops the forward of the second matmul (0.93 here), which the MoE steps do compute.
  s = dict(TINY, dim=128, hidden=256)
  x, _, cot = moe._inputs(s)
  step, compiled = moe._dense_ffn_step(s, x, cot)
  step()
  ratio = common.xla_flops(compiled) / moe.layer_flops(s, moe=False)
  assert 1.0 <= ratio <= 1.15, ratio


def test_scaling_points_use_the_accelerators_when_present():
  points, skipped, where = moe.scaling_plan([1, 2, 4, 8], accelerator=False, available=1)
  assert (points, skipped) == ([1, 2, 4, 8], []) and where.startswith("simulated CPU devices")
  points, skipped, where = moe.scaling_plan([1, 2, 4, 8], accelerator=True, available=4)
  assert (points, skipped, where) == ([1, 2, 4], [8], "accelerators")


def test_rows_get_per_device_rates_and_mfu_from_the_shared_helper():
  """A 2-device accelerator point: per-device TFLOP/s and MFU divide by 2; a simulated point has no MFU."""
  args = argparse.Namespace(_device={"peak_tflops_per_device": 10.0})
  fl = moe.layer_flops(TINY)
  on_gpus = common.throughput(args, images=2, seconds=1e-3, flops=fl, devices=2, peak_applies=True)
  assert on_gpus["tflops_per_device"] == fl / 1e-3 / 2 / 1e12 and on_gpus["mfu"] == on_gpus["tflops_per_device"] / 10
  assert common.throughput(args, images=2, seconds=1e-3, flops=fl, devices=2, peak_applies=False)["mfu"] is None
