"""Encoder forward throughput (images/s): our JAX DINOv3 vs the transformers PyTorch model, same weights.

Both models are built from one random transformers DINOv3ViTModel (eval mode, fp32, eager
attention); ours imports its weights, so both compute the same function (checked in the run).
Timings exclude compilation (reported apart) and are taken round-robin, so the ratio is measured in one
run, side by side. FLOPs per image: the analytic encoder count (bench/flops.py), cross-checked with XLA's
cost analysis of the compiled forward; MFU against the device's peak (bench/peaks.py). JAX runs on the default
device; torch on the CPU, so on an accelerator host its row says so and has no MFU (the peak is the accelerator's).
"""

from __future__ import annotations

import os
import time

import numpy as np

from m2dino_jax.bench import common, flops

SMOKE = {"variant": "mu/16", "size": 32, "batch": 2, "repeats": 2, "torch_threads": 1}


def add_args(p) -> None:
  p.add_argument("--variant", default="S/16", help="encoder variant, e.g. S/16, B/16, mu/16")
  p.add_argument("--size", type=int, default=224, help="image side in pixels")
  p.add_argument("--batch", type=int, default=8, help="images per forward call")
  p.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up")
  p.add_argument("--registers", type=int, default=4, help="register tokens of the encoder")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="PyTorch intra-op threads (0 = torch's default); on a busy machine 1 thread can be faster")


def run(args) -> int:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import jax
  import jax.numpy as jnp
  import torch
  import transformers
  from flax import nnx

  from m2dino_jax.models import convert, vit

  if args.torch_threads > 0:
    torch.set_num_threads(args.torch_threads)
  spec = vit.decode_variant(args.variant)
  hf_cfg = transformers.DINOv3ViTConfig(hidden_size=spec["dim"], num_hidden_layers=spec["depth"],
                                        num_attention_heads=spec["heads"], intermediate_size=spec["mlp_dim"],
                                        patch_size=spec.get("patch", 16), num_register_tokens=args.registers,
                                        image_size=args.size, attn_implementation="eager")
  torch.manual_seed(0)
  hf = transformers.DINOv3ViTModel(hf_cfg).eval()
  ours = convert.encoder_from_hf(hf.state_dict(), hf_cfg.to_dict())
  x = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
  xt = torch.from_numpy(x)
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  gdef, state = nnx.split(ours)
  t0 = time.perf_counter()
  fwd = jax.jit(lambda s, x: nnx.merge(gdef, s)(x)["patch_tokens"]).lower(state, xj).compile()
  compile_s = time.perf_counter() - t0

  def run_jax():
    return jax.block_until_ready(fwd(state, xj))

  def run_torch():
    with torch.inference_mode():
      return hf(pixel_values=xt).last_hidden_state

  diff = float(np.abs(np.asarray(run_jax()) - run_torch()[:, 1 + args.registers:].numpy()).max())
  fwd_flops = flops.vit_forward_flops(dim=spec["dim"], depth=spec["depth"], mlp_dim=spec["mlp_dim"],
                                      patch=spec.get("patch", 16), image_size=args.size, channels=3,
                                      prefix=1 + args.registers) * args.batch
  xla = common.xla_flops(fwd)
  times = common.time_interleaved({"jax (ours)": run_jax, "torch (transformers)": run_torch}, args.repeats)
  rows = []
  accelerator = common.on_accelerator()
  for name, t in times.items():
    ours = name.startswith("jax")
    rows.append({"name": name if ours or not accelerator else f"{name} on the CPU", "batch": args.batch,
                 "size": args.size, "median_s": t["median_s"], "min_s": t["min_s"], "repeats": args.repeats,
                 "gflop_per_img": fwd_flops / args.batch / 1e9,
                 **common.throughput(args, images=args.batch, seconds=t["median_s"], flops=fwd_flops,
                                     xla=xla if ours else None, peak_applies=ours or not accelerator)})
  ratio = rows[0]["images_per_s_per_device"] / rows[1]["images_per_s_per_device"]
  print(f"encoder {args.variant} at {args.size}px, batch {args.batch}, torch threads {torch.get_num_threads()}, "
        f"max |diff| {diff:.2e}")
  common.print_table(rows, ["name", "batch", "size", "median_s", "min_s", "images_per_s_per_device",
                            "gflop_per_img", "tflops_per_device", "xla_tflops_per_device", "mfu"])
  common.write_results(args, "encoder", rows, compile_s={"jax_forward": compile_s},
                       ratios={"jax_over_torch_images_per_s": ratio,
                               "xla_over_analytic_flops": xla / fwd_flops if xla else None},
                       shapes={"batch": args.batch, "size": args.size, "variant": args.variant,
                               "tokens": 1 + args.registers + (args.size // spec.get("patch", 16)) ** 2},
                       max_abs_diff=diff, torch_threads=torch.get_num_threads())
  return 0
