"""3D MAE train step: voxels/s and volumes/s per device, and memory per device under data vs fsdp meshes.

Throughput: the pretraining program of train/mae.py (masking, encoder on the kept patches, decoder, masked
loss, clipping, AdamW) for each shape in --shapes ('smoke' = configs/mae3d.py:smoke, mu/8 on 32^3; 'default' =
ViT-B/16 on 96^3 crops), on the local devices with the batch split over 'data'. Compilation is timed on its
own (ahead of time); the step is timed after a warm-up (--repeats; the default shape on a CPU may want 1).
Per device: voxels/s = batch * crop^3 / step time / devices. FLOPs per volume are counted analytically
(bench/flops.mae3d_step_flops: matmuls, fwd + bwd = 3 x fwd; the encoder sees 1 + (1 - mask) N tokens, the decoder
1 + N) and read from XLA's cost analysis; MFU is taken against the device's peak (bench/peaks.py: the vendor table
on accelerators, a measured fp32 matmul on CPU, or --peak-tflops). `m2dino bench mae` is an alias.

Memory: in a subprocess with --devices simulated CPU devices (XLA_FLAGS), the same step compiled under
  data   data=D (parameters and optimiser state replicated)
  fsdp   data=2 x fsdp=D/2 (weights split along width)
  fsdp+tensor  data=2 x fsdp=D/4 x tensor=2
and XLA's memory analysis of the compiled SPMD program gives, per device, the argument bytes (the state and
the batch shard), temporaries and outputs; 'state' is the bytes of the train state each device holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from m2dino_jax.bench import common, flops

MESHES = {"data": ({"data": -1}, "dp"), "fsdp": ({"data": 2, "fsdp": -1}, "fsdp"),
          "fsdp+tensor": ({"data": 2, "fsdp": -1, "tensor": 2}, "fsdp")}


SMOKE = {"shapes": "smoke", "repeats": 1, "devices": 0}


def add_args(p) -> None:
  p.add_argument("--shapes", default="smoke,default", help="'smoke' (mu/8, 32^3) and / or 'default' (B/16, 96^3)")
  p.add_argument("--batch", type=int, default=0, help="global batch (0: 8 for smoke, 2 per device for default)")
  p.add_argument("--repeats", type=int, default=3, help="timed steps after the warm-up step")
  p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on accelerators)")
  p.add_argument("--remat", action="store_true", help="rematerialise each block in the backward pass")
  p.add_argument("--devices", type=int, default=8, help="simulated CPU devices for the memory table (0 = skip)")
  p.add_argument("--memory-shapes", default="smoke,default", help="shapes for the memory table")
  p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)


def _config(shape: str, args, batch: int):
  from m2dino_jax import configlib
  overrides = [f"model.dtype={args.dtype}", f"model.remat={args.remat}", f"data.batch_size={batch}",
               "optim.warmup_steps=0"]
  path = Path(__file__).resolve().parents[2] / "configs" / "mae3d.py"
  return configlib.load_config(f"{path}:smoke" if shape == "smoke" else str(path), overrides)


def mae_flops_per_volume(cfg) -> dict:
  """flops.mae3d_step_flops of a mae3d.MAE3DConfig: one volume's forward and train step (3 x forward)."""
  f = flops.mae3d_step_flops(dim=cfg.dim, depth=cfg.depth, mlp_dim=cfg.mlp_dim, patch=cfg.patch, crop=cfg.crop,
                             in_chans=cfg.in_chans, mask_ratio=cfg.mask_ratio, dec_dim=cfg.dec_dim,
                             dec_depth=cfg.dec_depth, dec_mlp_dim=cfg.dec_dim * cfg.dec_mlp_ratio)
  return {**f, "tokens_encoder": 1 + f["kept"], "tokens_decoder": 1 + f["patches"]}


def _batch(config, rng):
  c = config.data.crop
  return {"image": rng.random((config.data.batch_size, c, c, c, 1), np.float32),
          "domain": np.zeros((config.data.batch_size,), np.int32)}


def _compile(prog, batch):
  import jax

  from m2dino_jax import mesh as mesh_lib
  from m2dino_jax.train import core
  gbatch = mesh_lib.shard_batch(batch, prog.mesh, prog.rules)
  with jax.set_mesh(prog.mesh):
    fn = core.compile_step(prog._train_fn, prog.state_shardings, core.shardings_of(gbatch))
    t0 = time.perf_counter()
    compiled = fn.lower(prog.state, gbatch).compile()
  return compiled, gbatch, time.perf_counter() - t0


def _program(config, axes, preset):
  import jax

  from m2dino_jax import mesh as mesh_lib
  from m2dino_jax.train import mae
  mesh = mesh_lib.make_mesh(axes, jax.devices())
  return mae.Program(config, mesh, mesh_lib.get_rules(preset), 1000)


def throughput(shape: str, args) -> dict:
  import jax

  from m2dino_jax.models import mae3d
  ndev = jax.device_count()
  batch = args.batch or (8 if shape == "smoke" else 2 * ndev)
  config = _config(shape, args, batch)
  model_cfg = mae3d.MAE3DConfig.from_config(config.model)
  prog = _program(config, {"data": -1}, "dp")
  compiled, gbatch, compile_s = _compile(prog, _batch(config, np.random.default_rng(0)))
  holder = {"state": prog.state}

  def step():
    holder["state"], m = compiled(holder["state"], gbatch)
    jax.block_until_ready(m["loss"])

  t = common.time_fn(step, warmup=1, repeats=args.repeats)
  fl = mae_flops_per_volume(model_cfg)
  vox = batch * config.data.crop ** 3
  sec = t["median_s"]
  xla = common.xla_flops(compiled)
  rates = common.throughput(args, images=batch, seconds=sec, flops=fl["train"] * batch, xla=xla, devices=ndev)
  return {"shape": shape, "variant": config.model.variant, "crop": config.data.crop, "batch": batch,
          "devices": ndev, "device_kind": jax.devices()[0].device_kind, "dtype": args.dtype, "remat": args.remat,
          "compile_s": compile_s, "step_s": sec, "warmup_s": t["warmup_s"],
          "volumes_per_s_per_device": rates["images_per_s_per_device"], "voxels_per_s_per_device": vox / sec / ndev,
          "train_gflop_per_volume": fl["train"] / 1e9, "xla_gflop_per_step": None if xla is None else xla / 1e9,
          "tflops_per_device": rates["tflops_per_device"], "xla_tflops_per_device": rates["xla_tflops_per_device"],
          "mfu": rates["mfu"],
          "tokens_encoder": fl["tokens_encoder"], "tokens_decoder": fl["tokens_decoder"]}


def memory_rows(shape: str, args) -> list[dict]:
  """In this process (which must see the simulated devices): one row per mesh."""
  import jax
  ndev = jax.device_count()
  batch = args.batch or (8 if shape == "smoke" else 2 * ndev)
  rows = []
  for name, (axes, preset) in MESHES.items():
    config = _config(shape, args, batch)
    prog = _program(config, axes, preset)
    compiled, _, compile_s = _compile(prog, _batch(config, np.random.default_rng(0)))
    mem = compiled.memory_analysis()
    state_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(prog.state))
    total_state = sum(x.nbytes for x in jax.tree.leaves(prog.state))
    rows.append({"shape": shape, "mesh": name, "axes": "x".join(f"{a}={s}" for a, s in prog.mesh.shape.items()
                                                                if s > 1), "batch": batch,
                 "state_mib_per_device": state_bytes / 2 ** 20, "state_mib_total": total_state / 2 ** 20,
                 "argument_mib": mem.argument_size_in_bytes / 2 ** 20, "temp_mib": mem.temp_size_in_bytes / 2 ** 20,
                 "output_mib": mem.output_size_in_bytes / 2 ** 20,
                 "peak_mib_per_device": (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                                         + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2 ** 20,
                 "compile_s": compile_s})
    del prog, compiled
  return rows


def _memory_subprocess(args) -> list[dict]:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "m2dino_jax.cli", "bench", "mae3d", "--memory-worker", "--memory-shapes",
         args.memory_shapes, "--batch", str(args.batch), "--dtype", args.dtype, "--out", os.devnull]
  if args.remat:
    cmd.append("--remat")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"memory worker failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> int:
  shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
  if args.memory_worker:
    rows = [r for s in args.memory_shapes.split(",") if s.strip() for r in memory_rows(s.strip(), args)]
    print(json.dumps(rows))
    return 0
  rows = [throughput(s, args) for s in shapes]
  common.print_table(rows, ["shape", "variant", "crop", "batch", "devices", "compile_s", "step_s",
                            "volumes_per_s_per_device", "voxels_per_s_per_device", "train_gflop_per_volume",
                            "tflops_per_device", "mfu"])
  memory = []
  if args.devices > 0:
    memory = _memory_subprocess(args)
    print()
    common.print_table(memory, ["shape", "mesh", "axes", "batch", "state_mib_per_device", "state_mib_total",
                                "argument_mib", "temp_mib", "peak_mib_per_device", "compile_s"])
  rows = [{"name": r["shape"], "median_s": r["step_s"], **r} for r in rows]
  common.write_results(args, "mae3d", rows, compile_s={r["name"]: r["compile_s"] for r in rows}, memory=memory)
  return 0
