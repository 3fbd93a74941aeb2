"""UltraDINO pretraining step (images/s per device, GFLOP/s): DINOv2 multi-crop at the smoke and the paper's shape.

Shapes (the step of train/dino: teacher forward on the 2 global crops, student forward + backward on the masked
global and the local crops, DINO + iBOT + KoLeo, clipping, AdamW, EMA teacher and centres):
  smoke  configs/ultradino.py:smoke (mu/16, 2 x 64 px + 2 x 32 px, 256 prototypes), batch 16
  paper  ViT-S/16 (or --variant), 4 registers, 2 x 224 px + 8 x 96 px, DINO head 2048 / 256 / 65,536, block masks
         (probability 0.5, ratio 0.1-0.5); the batch is --batch per device (the paper: 512 on 2 H100s)
The batch is one real multi-crop batch of simulator images (data pipeline), reused for every timed step; the step
is compiled ahead of time (compile time reported on its own), then timed after a warm-up.

FLOPs per image are counted analytically (bench/flops.dino_step_flops; matmuls only; backward = 2 x forward): the
encoder (patch embedding, q/k/v/o, attention, FFN) on 2 global crops (student fwd + bwd, teacher fwd) and the local
crops (student fwd + bwd), and the DINO head MLP + prototype layer on the CLS tokens of every crop and on the
iBOT patch tokens (2 x max_masked per image, the static bound the step computes). XLA's cost analysis of the
compiled step (all ops) is reported beside it. MFU is taken against the device's peak (bench/peaks.py: the vendor
table on accelerators, a measured fp32 matmul on CPU, or --peak-tflops). `m2dino bench dino` is an alias.
"""

from __future__ import annotations

import time
from pathlib import Path

from m2dino_jax.bench import common, flops

SMOKE = {"shapes": "smoke", "repeats": 1, "smoke_batch": 4}


def add_args(p) -> None:
  p.add_argument("--shapes", default="smoke,paper", help="comma list of smoke | paper")
  p.add_argument("--variant", default="S/16", help="paper shape: encoder variant (S/16 or B/16)")
  p.add_argument("--batch", type=int, default=2, help="paper shape: images per device")
  p.add_argument("--smoke-batch", type=int, default=16, help="smoke shape: images per device")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype (fp32 master)")
  p.add_argument("--repeats", type=int, default=3, help="timed steps after the warm-up")


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


def step_flops_per_image(config, max_masked: int) -> dict:
  """Analytic matmul FLOPs of one image's share of the DINOv2 step (flops.dino_step_flops; see the docstring)."""
  from m2dino_jax.models import vit
  v, d, h = vit.ViTConfig.from_config(config.model), config.data, config.head
  f = flops.dino_step_flops(dim=v.dim, depth=v.depth, mlp_dim=v.mlp_dim, patch=v.patch, channels=v.in_chans,
                            registers=v.num_registers, global_size=d.global_size, local_size=d.local_size,
                            num_local=int(d.num_local), max_masked=max_masked, hidden=h.hidden_dim,
                            bottleneck=h.bottleneck_dim, prototypes=h.prototypes, nlayers=h.nlayers)
  encoder = lambda size: flops.vit_forward_flops(dim=v.dim, depth=v.depth, mlp_dim=v.mlp_dim, patch=v.patch,
                                                 image_size=size, channels=v.in_chans, prefix=1 + v.num_registers)
  return {"student": 3 * f["student_fwd"], "teacher": f["teacher_fwd"], "total": f["train"],
          "encoder_global_fwd": encoder(d.global_size), "encoder_local_fwd": encoder(d.local_size),
          "head_per_token": flops.dino_head_flops(v.dim, h.hidden_dim, h.bottleneck_dim, h.prototypes, h.nlayers)}


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
  xla = common.xla_flops(compiled)  # the whole step, all devices
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
      "xla_gflop_per_img": xla / b / 1e9 if xla else None,
      "compile_s": compile_s, "init_s": init_s, "first_loss": first_loss, "max_masked": run.settings.max_masked,
      "flops": fl, **common.throughput(args, images=b, seconds=t["median_s"], flops=fl["total"] * b,
                                       xla=xla, devices=devices)}


def run(args) -> int:
  import jax
  rows = [bench_shape(s.strip(), args) for s in args.shapes.split(",") if s.strip()]
  dev = common.device_of(args)
  print(f"UltraDINO step on {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{args.dtype}; peak {dev['peak_tflops_per_device']} TFLOP/s per device ({dev['peak_source']})")
  common.print_table(rows, ["shape", "encoder", "crops", "prototypes", "batch", "s_per_step", "images_per_s_per_device",
                            "gflop_per_img", "xla_gflop_per_img", "tflops_per_device", "mfu", "compile_s"])
  rows = [{"name": r["shape"], "median_s": r["s_per_step"], **r} for r in rows]
  common.write_results(args, "ssl", rows, compile_s={r["name"]: r["compile_s"] for r in rows})
  return 0
