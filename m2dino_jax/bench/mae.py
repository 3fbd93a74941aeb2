"""3D MAE train step: volumes/s, TFLOP/s and MFU per device, compile time apart.

The step is the trainer's own (train/mae.py Program: random masking, encoder on the kept patches, decoder on
all, masked MSE on per-patch normalised targets, clipping, AdamW), compiled ahead of time on all local devices
under the config's sharding (fsdp by default) and fed one fixed random batch of crops. FLOPs per volume:
bench/flops.mae3d_step_flops (analytic), next to XLA's cost analysis of the compiled step.
"""

from __future__ import annotations

import time

import numpy as np

from m2dino_jax.bench import common, flops

SMOKE = {"variant": "mu/8", "crop": 16, "batch": 4, "dec_dim": 32, "dec_depth": 1, "dec_heads": 2, "repeats": 2}


def add_args(p) -> None:
  p.add_argument("--variant", default="B/16", help="3D encoder variant, e.g. B/16")
  p.add_argument("--crop", type=int, default=96, help="cubic crop side in voxels")
  p.add_argument("--batch", type=int, default=16, help="volumes per step (global)")
  p.add_argument("--mask-ratio", type=float, default=0.75, help="share of patches masked")
  p.add_argument("--dec-dim", type=int, default=384, help="decoder width")
  p.add_argument("--dec-depth", type=int, default=4, help="decoder blocks")
  p.add_argument("--dec-heads", type=int, default=12, help="decoder attention heads")
  p.add_argument("--sharding", default="fsdp", choices=("dp", "fsdp"), help="mesh preset")
  p.add_argument("--remat", action="store_true", help="rematerialise blocks (memory for compute)")
  p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on accelerators)")
  p.add_argument("--repeats", type=int, default=5, help="timed steps after the warm-up")


def run(args) -> int:
  import jax

  from m2dino_jax import configlib
  from m2dino_jax import mesh as mesh_lib
  from m2dino_jax.train import core, mae

  config = configlib.load_config(common.config_path("mae3d.py"), [
      f"model.variant={args.variant}", f"model.crop={args.crop}", f"data.crop={args.crop}",
      f"data.batch_size={args.batch}", f"model.mask_ratio={args.mask_ratio}", f"model.dec_dim={args.dec_dim}",
      f"model.dec_depth={args.dec_depth}", f"model.dec_heads={args.dec_heads}", f"model.remat={args.remat}",
      f"model.dtype={args.dtype}", f"sharding={args.sharding}"])
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  rules = mesh_lib.get_rules(config.sharding)
  prog = mae.Program(config, mesh, rules, total_steps=1000)
  rng = np.random.default_rng(0)
  host = {"image": rng.standard_normal((args.batch, args.crop, args.crop, args.crop, 1)).astype(np.float32),
          "domain": np.zeros((args.batch,), np.int32)}
  batch = mesh_lib.shard_batch(host, mesh, rules)
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = core.compile_step(prog._train_fn, prog.state_shardings, core.shardings_of(batch)).lower(
        prog.state, batch).compile()
    compile_s = time.perf_counter() - t0
  holder = {"state": prog.state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch)
    return float(jax.block_until_ready(metrics["loss"]))

  loss = step()
  t = common.time_fn(step, warmup=1, repeats=args.repeats)
  m = prog.model_cfg
  fl = flops.mae3d_step_flops(dim=m.dim, depth=m.depth, mlp_dim=m.mlp_dim, patch=m.patch, crop=m.crop,
                              in_chans=m.in_chans, mask_ratio=m.mask_ratio, dec_dim=m.dec_dim,
                              dec_depth=m.dec_depth, dec_mlp_dim=m.dec_dim * m.dec_mlp_ratio)
  xla = common.xla_flops(compiled)
  devices = mesh.size
  row = {"name": f"3D MAE {args.variant} step", "batch": args.batch, "median_s": t["median_s"], "min_s": t["min_s"],
         "repeats": args.repeats, "gflop_per_volume": fl["train"] / 1e9,
         "xla_gflop_per_volume": xla / args.batch / 1e9 if xla else None, "first_loss": loss,
         **common.throughput(args, images=args.batch, seconds=t["median_s"], flops=fl["train"] * args.batch,
                             xla=xla, devices=devices)}
  row["volumes_per_s_per_device"] = row.pop("images_per_s_per_device")
  print(f"3D MAE step {args.variant}: batch {args.batch} x {args.crop}^3, {fl['patches']} patches "
        f"({fl['kept']} kept), decoder {args.dec_depth} x {args.dec_dim}, {args.sharding}, {args.dtype}, "
        f"{devices} device(s)")
  common.print_table([row], ["name", "batch", "median_s", "min_s", "volumes_per_s_per_device", "gflop_per_volume",
                             "xla_gflop_per_volume", "tflops_per_device", "mfu"])
  common.write_results(
      args, "mae", [row], compile_s={"mae_step": compile_s},
      ratios={"xla_over_analytic_flops": xla / (fl["train"] * args.batch) if xla else None},
      shapes={"batch": args.batch, "crop": args.crop, "patch": m.patch, "patches": fl["patches"],
              "kept": fl["kept"], "devices": devices}, flops=fl)
  return 0
