"""UltraDINO pretraining step (images/s per device, GFLOP/s): DINOv2 multi-crop at the smoke and the paper's shape.

Shapes (the step of train/dino: teacher forward on the 2 global crops, student forward + backward on the masked
global and the local crops, DINO + iBOT + KoLeo, clipping, AdamW, EMA teacher and centres):
  smoke  configs/ultradino.py:smoke (mu/16, 2 x 64 px + 2 x 32 px, 256 prototypes), batch 16
  paper  ViT-S/16 (or --variant), 4 registers, 2 x 224 px + 8 x 96 px, DINO head 2048 / 256 / 65,536, block masks
         (probability 0.5, ratio 0.1-0.5); the batch is --batch per device (the paper: 512 on 2 H100s)
The batch is one real multi-crop batch of simulator images (data pipeline), reused for every timed step; the step
is compiled ahead of time (compile time reported on its own), then timed after a warm-up.

FLOPs per image are counted analytically (matmuls only; backward = 2 x forward): the encoder (bench/train.py's
count: patch embedding, q/k/v/o, attention, FFN) on 2 global crops (student fwd + bwd, teacher fwd) and the local
crops (student fwd + bwd), and the DINO head MLP + prototype layer on the CLS tokens of every crop and on the
iBOT patch tokens (2 x max_masked per image, the static bound the step computes). XLA's cost analysis of the
compiled step (all ops) is reported beside it. The machine's matmul rate (a square f32 / bf16 matmul, timed in the
same run) gives the fraction of it the step achieves.
"""

from __future__ import annotations

import time
from pathlib import Path

from m2dino_jax.bench import common

SMOKE = {"shapes": "smoke", "repeats": 1, "smoke_batch": 4, "matmul_size": 256}


def add_args(p) -> None:
  p.add_argument("--shapes", default="smoke,paper", help="comma list of smoke | paper")
  p.add_argument("--variant", default="S/16", help="paper shape: encoder variant (S/16 or B/16)")
  p.add_argument("--batch", type=int, default=2, help="paper shape: images per device")
  p.add_argument("--smoke-batch", type=int, default=16, help="smoke shape: images per device")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype (fp32 master)")
  p.add_argument("--repeats", type=int, default=3, help="timed steps after the warm-up")
  p.add_argument("--matmul-size", type=int, default=0, help="side of the matmul timed for the peak (0: auto)")


CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ultradino.py"


def _config(shape: str, args, devices: int):
  from m2dino_jax import configlib
  c = configlib.load_module(str(CONFIG)).get_config("smoke" if shape == "smoke" else f"variant={args.variant}")
  c.model.dtype = args.dtype
  c.data.batch_size = (args.smoke_batch if shape == "smoke" else args.batch) * devices
  c.data.synthetic_count = max(c.data.batch_size, 24)
  c.data.synthetic_size = 96 if shape == "smoke" else 256
  c.total_steps = 1000
  return c


def head_flops(dim: int, hidden: int, bottleneck: int, prototypes: int, nlayers: int = 3) -> int:
  """Forward matmul FLOPs of the DINO head per token."""
  dims = [dim] + [hidden] * (nlayers - 1) + [bottleneck, prototypes]
  return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))


def step_flops_per_image(config, max_masked: int) -> dict:
  """Analytic matmul FLOPs of one image's share of the DINOv2 step (see the module docstring)."""
  from m2dino_jax.bench.train import train_flops_per_image
  from m2dino_jax.models import vit
  v = vit.ViTConfig.from_config(config.model)
  d = config.data

  def encoder(size: int) -> int:
    return train_flops_per_image(dim=v.dim, depth=v.depth, mlp_dim=v.mlp_dim, patch=v.patch, image_size=size,
                                 channels=v.in_chans, registers=v.num_registers, num_classes=0)["encoder_fwd"]

  h = config.head
  per_token = head_flops(v.dim, h.hidden_dim, h.bottleneck_dim, h.prototypes, h.nlayers)
  glob, loc, n_loc = encoder(d.global_size), encoder(d.local_size), int(d.num_local)
  student = 3 * (2 * glob + n_loc * loc + per_token * (2 + n_loc + 2 * max_masked))
  teacher = 2 * glob + per_token * (2 + 2 * max_masked)
  return {"student": student, "teacher": teacher, "total": student + teacher,
          "encoder_global_fwd": glob, "encoder_local_fwd": loc, "head_per_token": per_token}


def matmul_rate(dtype: str, size: int) -> float:
  """GFLOP/s of a jitted square matmul on the default device (median of 5 after a warm-up)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: a @ b)
  t = common.time_fn(lambda: jax.block_until_ready(f(a, b)), warmup=1, repeats=5)
  return 2 * size ** 3 / t["median_s"] / 1e9


def bench_shape(shape: str, args) -> dict:
  import jax

  from m2dino_jax import mesh as mesh_lib
  from m2dino_jax.train.dino import data as dino_data
  from m2dino_jax.train.dino import trainer
  devices = jax.device_count()
  config = _config(shape, args, devices)
  t0 = time.perf_counter()
  run = trainer.Run(config, None)
  init_s = time.perf_counter() - t0
  batch = next(dino_data.make_iterator(config.data, patch=run.vit_cfg.patch, seed=0))
  gbatch = mesh_lib.shard_batch(batch, run.mesh, run.rules)
  t0 = time.perf_counter()
  with jax.set_mesh(run.mesh):
    compiled = run.compiled_step(gbatch).lower(run.state, gbatch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  holder = {"state": run.state}

  def step():
    with jax.set_mesh(run.mesh):
      holder["state"], m = compiled(holder["state"], gbatch)
    return float(jax.block_until_ready(m["loss"]))

  first_loss = step()
  t = common.time_fn(step, warmup=1, repeats=args.repeats)
  b = config.data.batch_size
  fl = step_flops_per_image(config, run.settings.max_masked)
  v = run.vit_cfg
  return {
      "shape": shape, "encoder": f"{config.model.variant} {v.kind}", "dtype": args.dtype,
      "crops": f"2x{config.data.global_size}+{config.data.num_local}x{config.data.local_size}",
      "prototypes": int(config.head.prototypes), "batch": b, "devices": devices, "s_per_step": t["median_s"],
      "min_s": t["min_s"], "images_per_s": b / t["median_s"], "images_per_s_per_device": b / t["median_s"] / devices,
      "gflop_per_img": fl["total"] / 1e9, "gflop_per_s": fl["total"] * b / t["median_s"] / 1e9,
      "xla_gflop_per_img": float(cost.get("flops", 0.0)) / b / 1e9 if cost else None,
      "compile_s": compile_s, "init_s": init_s, "first_loss": first_loss, "max_masked": run.settings.max_masked,
      "flops": fl}


def run(args) -> int:
  import jax
  rows = [bench_shape(s.strip(), args) for s in args.shapes.split(",") if s.strip()]
  size = args.matmul_size or (8192 if jax.default_backend() == "gpu" else 2048)
  peak = matmul_rate(args.dtype, size)
  for r in rows:
    r["matmul_gflop_per_s"] = peak
    r["fraction_of_matmul"] = r["gflop_per_s"] / peak / r["devices"]
  print(f"UltraDINO step on {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{args.dtype}; {size}^2 matmul: {peak:.1f} GFLOP/s per device")
  common.print_table(rows, ["shape", "encoder", "crops", "prototypes", "batch", "s_per_step", "images_per_s_per_device",
                            "gflop_per_img", "xla_gflop_per_img", "gflop_per_s", "fraction_of_matmul", "compile_s"])
  rows = [{"name": r["shape"], "median_s": r["s_per_step"], **r} for r in rows]
  common.write_results(args, "ssl", rows, compile_s={r["name"]: r["compile_s"] for r in rows},
                       matmul_gflop_per_s=peak, matmul_size=size)
  return 0
