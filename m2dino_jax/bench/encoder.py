"""Encoder forward throughput (images/s): our JAX DINOv3 vs the transformers PyTorch model, same weights.

Both models are built from one random transformers DINOv3ViTModel (eval mode, fp32, eager
attention); ours imports its weights, so both compute the same function (checked in the run).
Timings exclude compilation; the ratio is taken in one run, side by side.
"""

from __future__ import annotations

import os

import numpy as np

from m2dino_jax.bench import common


def add_args(p) -> None:
  p.add_argument("--variant", default="S/16")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--registers", type=int, default=4)
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
  fwd = jax.jit(lambda s, x: nnx.merge(gdef, s)(x)["patch_tokens"])

  def run_jax():
    return jax.block_until_ready(fwd(state, xj))

  def run_torch():
    with torch.inference_mode():
      return hf(pixel_values=xt).last_hidden_state

  diff = float(np.abs(np.asarray(run_jax()) - run_torch()[:, 1 + args.registers:].numpy()).max())
  rows = []
  for name, fn in (("jax (ours)", run_jax), ("torch (transformers)", run_torch)):
    t = common.time_fn(fn, warmup=1, repeats=args.repeats)
    rows.append({"impl": name, "batch": args.batch, "size": args.size, "s_per_batch": t["median_s"],
                 "images_per_s": args.batch / t["median_s"], "first_call_s": t["warmup_s"]})
  ratio = rows[0]["images_per_s"] / rows[1]["images_per_s"]
  print(f"encoder {args.variant} at {args.size}px, batch {args.batch}, torch threads {torch.get_num_threads()}, "
        f"max |diff| {diff:.2e}")
  common.print_table(rows, ["impl", "batch", "size", "s_per_batch", "images_per_s", "first_call_s"])
  print(f"speed-up jax/torch: {ratio:.2f}x")
  common.write_results(args.out, "encoder", rows, variant=args.variant, speedup=ratio, max_abs_diff=diff)
  return 0
