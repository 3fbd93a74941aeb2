"""UltraDINO (DINOv2) train step: images/s, TFLOP/s and MFU per device, compile time apart.

The step is the trainer's own (train/dino/step.py via dino.trainer.Run: teacher forward, student forward and
backward on 2 global + L local crops, DINO + iBOT + KoLeo, clipping, AdamW, EMA teacher), compiled ahead of
time on all local devices (data parallel) and fed one fixed random batch of the configured crop shapes, with
block-shaped iBOT masks of `max_masked` tokens. FLOPs per image: bench/flops.dino_step_flops (analytic),
next to XLA's cost analysis of the compiled step.
"""

from __future__ import annotations

import time

import numpy as np

from m2dino_jax.bench import common, flops

SMOKE = {"variant": "mu/16", "batch": 4, "global_size": 32, "local_size": 16, "num_local": 2, "prototypes": 256,
         "hidden": 64, "bottleneck": 32, "repeats": 2}


def add_args(p) -> None:
  p.add_argument("--variant", default="S/16", help="encoder variant, e.g. S/16, B/16")
  p.add_argument("--batch", type=int, default=8, help="global batch (images; each has 2 global + L local crops; "
                 "at 65,536 prototypes batch 32 needs ~15 GB on CPU)")
  p.add_argument("--global-size", type=int, default=224, help="global crop side")
  p.add_argument("--local-size", type=int, default=96, help="local crop side")
  p.add_argument("--num-local", type=int, default=8, help="local crops per image")
  p.add_argument("--prototypes", type=int, default=65536, help="DINO / iBOT head prototypes")
  p.add_argument("--hidden", type=int, default=2048, help="projection head hidden width")
  p.add_argument("--bottleneck", type=int, default=256, help="projection head bottleneck width")
  p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on accelerators)")
  p.add_argument("--repeats", type=int, default=5, help="timed steps after the warm-up")


def _config(args):
  from m2dino_jax import configlib
  patch = int(args.variant.split("/")[1])
  return configlib.load_config(common.config_path("ultradino.py"), [
      f"model.variant={args.variant}", f"model.dtype={args.dtype}", f"data.batch_size={args.batch}",
      f"data.global_size={args.global_size}", f"data.local_size={args.local_size}",
      f"data.num_local={args.num_local}", f"head.prototypes={args.prototypes}", f"head.hidden_dim={args.hidden}",
      f"head.bottleneck_dim={args.bottleneck}", f"model.pos_grid={max(1, args.global_size // patch)}",
      "total_steps=1000"])


def _batch(config, patch: int, max_masked: int, rng) -> dict:
  d = config.data
  b, n = d.batch_size, (d.global_size // patch) ** 2
  masks = np.zeros((b, 2, n), bool)
  for i in range(b):
    for j in range(2):
      m = rng.integers(0, max_masked + 1)
      masks[i, j, rng.permutation(n)[:m]] = True
  return {"global": rng.standard_normal((b, 2, d.global_size, d.global_size, d.channels)).astype(np.float32),
          "local": rng.standard_normal((b, d.num_local, d.local_size, d.local_size, d.channels)).astype(np.float32),
          "masks": masks}


def run(args) -> int:
  import jax

  from m2dino_jax import mesh as mesh_lib
  from m2dino_jax.train.dino import trainer

  config = _config(args)
  run_ = trainer.Run(config, None)
  cfg, k = run_.vit_cfg, run_.settings.max_masked
  batch = mesh_lib.shard_batch(_batch(config, cfg.patch, k, np.random.default_rng(0)), run_.mesh, run_.rules)
  with jax.set_mesh(run_.mesh):
    t0 = time.perf_counter()
    compiled = run_.compiled_step(batch).lower(run_.state, batch).compile()
    compile_s = time.perf_counter() - t0
  holder = {"state": run_.state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch)
    return float(jax.block_until_ready(metrics["loss"]))

  loss = step()
  t = common.time_fn(step, warmup=1, repeats=args.repeats)
  fl = flops.dino_step_flops(dim=cfg.dim, depth=cfg.depth, mlp_dim=cfg.mlp_dim, patch=cfg.patch,
                             channels=cfg.in_chans, registers=cfg.num_registers, global_size=args.global_size,
                             local_size=args.local_size, num_local=args.num_local, max_masked=k,
                             hidden=args.hidden, bottleneck=args.bottleneck, prototypes=args.prototypes,
                             nlayers=int(config.head.nlayers))
  xla = common.xla_flops(compiled)
  devices = run_.mesh.size
  row = {"name": f"UltraDINO {args.variant} step", "batch": args.batch, "median_s": t["median_s"],
         "min_s": t["min_s"], "repeats": args.repeats, "gflop_per_img": fl["train"] / 1e9,
         "xla_gflop_per_img": xla / args.batch / 1e9 if xla else None, "first_loss": loss,
         **common.throughput(args, images=args.batch, seconds=t["median_s"], flops=fl["train"] * args.batch,
                             xla=xla, devices=devices)}
  print(f"UltraDINO step {args.variant}: batch {args.batch} x (2 x {args.global_size} px + {args.num_local} x "
        f"{args.local_size} px), K={args.prototypes}, iBOT max masked {k}, {args.dtype}, {devices} device(s)")
  common.print_table([row], ["name", "batch", "median_s", "min_s", "images_per_s_per_device", "gflop_per_img",
                             "xla_gflop_per_img", "tflops_per_device", "mfu"])
  common.write_results(
      args, "dino", [row], compile_s={"dino_step": compile_s},
      ratios={"xla_over_analytic_flops": xla / (fl["train"] * args.batch) if xla else None},
      shapes={"batch": args.batch, "global_size": args.global_size, "local_size": args.local_size,
              "num_local": args.num_local, "prototypes": args.prototypes, "max_masked": k, "devices": devices},
      flops=fl)
  return 0
