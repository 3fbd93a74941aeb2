"""Multi-task train step (images/s): our jitted JAX step vs an equivalent plain PyTorch step, MoE off and on.

JAX: the multi-task trainer's program (train/multitask/steps.py: encoder + one task head + loss + MoE
aux losses + clipping + AdamW), compiled ahead of time so that compilation is timed on its own. PyTorch
(bench/torch_ref.py): the transformers DINOv3ViTModel (eager attention, fp32) with a per-expert-loop MoE
patched into the MoE blocks, the same head and loss, torch.optim.AdamW. Both start from the same weights
(ours are copied from the torch model) and see the same batch; the first losses are compared in the run.
Steps are timed round-robin after a warm-up (a shared machine's load hits both alike), torch with as many
threads as the cores JAX uses.

FLOPs per image are counted analytically (matmuls only, fwd + bwd = 3 x fwd), the MaxText-style
  3 * (2 * N_tok * P_active + 4 * L * N_tok^2 * d) + head,
and also read from XLA's cost analysis of the compiled step (all ops, including MoE dispatch and the
capacity padding of the dense back-end). Achieved TFLOP/s per device and MFU (against the device's peak,
bench/peaks.py) use the analytic count.

On an accelerator: `m2dino bench train --variant B/16 --dtype bfloat16 --impls jax --batch 64` (the torch
reference runs on CPU in fp32 only, so leave it out there).

Threads: by default torch gets as many threads as JAX's cores. On an oversubscribed machine torch's
OpenMP threads wait for each other far more than XLA's pool does (measured on the shared 2-core box:
ViT-S torch step 26 s with 2 threads, 4.7 s with 1), which inflates the ratio; `--torch-threads 1`
(and XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1' for JAX) gives the
single-core comparison.
"""

from __future__ import annotations

import os
import time

import numpy as np

from m2dino_jax.bench import common, compile_count

DEFAULT_TASK = {"cls": "fetal_plane_cls", "seg": "cardiac_multi"}
SMOKE = {"variant": "mu/16", "size": 32, "batch": 2, "repeats": 2, "experts": 4, "moe_layers": "last2",
         "torch_threads": 1}


def add_args(p) -> None:
  p.add_argument("--variant", default="S/16")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--head", choices=("cls", "seg"), default="cls")
  p.add_argument("--task", default="", help="task id (default: fetal_plane_cls / cardiac_multi)")
  p.add_argument("--channels", type=int, default=1, help="input channels (1 = grey, as the M2DINO config)")
  p.add_argument("--registers", type=int, default=4)
  p.add_argument("--out-blocks", default="3,5,7,11", help="encoder blocks feeding the seg head")
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top-k", type=int, default=2)
  p.add_argument("--moe-layers", default="last4")
  p.add_argument("--capacity-factor", type=float, default=1.25, help="training capacity (<= 0: dropless)")
  p.add_argument("--moe-backend", default="dense", choices=("dense", "dropless"))
  p.add_argument("--modes", default="dense,moe", help="which encoders: 'dense' (no MoE), 'moe'")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--torch-threads", type=int, default=0, help="0 = the cores JAX uses (the fair default)")
  p.add_argument("--impls", default="jax,torch", help="which steps to time: 'jax', 'torch'")
  p.add_argument("--dtype", default="float32", help="JAX compute dtype (bfloat16 on accelerators; JAX only)")
  p.add_argument("--compile", action="store_true",
                 help="instead: count and time the compiled programs of a multi-task model (bench/compile_count.py)")
  compile_count.add_args(p)


# ------------------------------------------------------------------------------------------------ FLOPs


def train_flops_per_image(*, dim: int, depth: int, mlp_dim: int, patch: int, image_size: int, channels: int,
                          registers: int, moe_layers=(), num_experts: int = 8, top_k: int = 2,
                          head: str = "cls", num_classes: int = 2, seg_channels: int = 128,
                          seg_inputs: int = 4) -> dict:
  """Matmul FLOPs of one image's forward (encoder, head) and of a train step (3 x forward).

  Encoder: patch embedding on the patches, per block q/k/v/o (4 d^2 per token), attention scores and
  values (2 * 2 * N^2 * d), and the FFN: dense 2 d h per token, MoE router d E plus top_k experts.
  Heads: linear classifier on [CLS || mean]; UperNet-lite laterals, 3x3 convs and classifier.
  Norms, softmax, activations, resizes and the optimiser are not counted.
  """
  grid = image_size // patch
  patches = grid * grid
  tokens = 1 + registers + patches
  moe_layers = set(moe_layers)
  encoder = 2 * patches * patch * patch * channels * dim
  for i in range(depth):
    encoder += 2 * tokens * 4 * dim * dim + 4 * tokens * tokens * dim
    ffn = 2 * dim * mlp_dim
    encoder += 2 * tokens * (dim * num_experts + top_k * ffn) if i in moe_layers else 2 * tokens * ffn
  if head == "cls":
    head_flops = 2 * 2 * dim * num_classes
  else:
    sizes = [max(1, round(grid * 4.0 / 2 ** i)) ** 2 for i in range(seg_inputs)]
    c = seg_channels
    head_flops = seg_inputs * 2 * patches * dim * c                  # laterals (on the patch grid)
    head_flops += sum(2 * 9 * c * c * s for s in sizes)              # 3x3 smoothing per level
    head_flops += 2 * 9 * seg_inputs * c * c * sizes[0]              # 3x3 fuse at the finest level
    head_flops += 2 * c * num_classes * sizes[0]                     # 1x1 classifier
  return {"tokens": tokens, "encoder_fwd": encoder, "head_fwd": head_flops, "train": 3 * (encoder + head_flops)}


# ------------------------------------------------------------------------------------------------ models


def _blocks(spec: str) -> tuple[int, ...]:
  return tuple(int(b) for b in spec.split(",") if b.strip())


def _config(args, moe_on: bool):
  import ml_collections

  from m2dino_jax.models.heads import default_heads_config
  from m2dino_jax.models.moe import default_moe_config
  from m2dino_jax.train.optim import default_optim_config
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      variant=args.variant, kind="dinov3", in_chans=args.channels, num_registers=args.registers,
      out_blocks=_blocks(args.out_blocks) if args.head == "seg" else (), drop_path=0.0, layerscale_init=1.0,
      pos_embed_rescale=None, dtype=getattr(args, "dtype", "float32")))
  c.moe = default_moe_config()
  c.moe.update(dict(enabled=moe_on, layers=args.moe_layers, num_experts=args.experts, top_k=args.top_k,
                    capacity_factor=args.capacity_factor, backend=args.moe_backend))
  c.heads = default_heads_config()
  c.optim = default_optim_config()
  c.optim.warmup_steps = 0  # torch runs a constant lr; our schedule costs a few scalar ops
  c.loss = ml_collections.ConfigDict(dict(dice_weight=1.0, label_smoothing=0.0, box_l1_weight=1.0,
                                          giou_weight=1.0, task_weights=""))
  return c


def _torch_model(args, config, task, vit_cfg, moe_layers):
  import torch
  import transformers

  from m2dino_jax.bench import torch_ref
  hf_cfg = transformers.DINOv3ViTConfig(
      hidden_size=vit_cfg.dim, num_hidden_layers=vit_cfg.depth, num_attention_heads=vit_cfg.heads,
      intermediate_size=vit_cfg.mlp_dim, patch_size=vit_cfg.patch, num_register_tokens=vit_cfg.num_registers,
      num_channels=vit_cfg.in_chans, image_size=args.size, pos_embed_rescale=None, layerscale_value=1.0,
      attn_implementation="eager")
  torch.manual_seed(args.seed)
  hf = transformers.DINOv3ViTModel(hf_cfg)
  if args.head == "cls":
    head = torch_ref.ClsHead(vit_cfg.dim, task.num_classes)
  else:
    head = torch_ref.SegHead(vit_cfg.dim, task.num_classes, len(vit_cfg.out_blocks), config.heads.seg_channels)
  moe = config.moe
  from m2dino_jax.tasks import registry
  model = torch_ref.Reference(
      hf, head, moe_layers=moe_layers, out_blocks=vit_cfg.out_blocks, num_tasks=registry.NUM_TASKS,
      moe_kwargs=dict(num_experts=moe.num_experts, top_k=moe.top_k, capacity_factor=moe.capacity_factor,
                      balance_weight=moe.balance_loss_weight, z_weight=moe.z_loss_weight))
  o = config.optim
  opt = torch_ref.make_optimizer(model, lr=o.lr, head_lr_mult=o.head_lr_mult, weight_decay=o.weight_decay,
                                 betas=(o.b1, o.b2))
  return model.train(), opt


def _batch(args, task, rng):
  b, s, c = args.batch, args.size, args.channels
  image = rng.standard_normal((b, s, s, c)).astype(np.float32)
  batch = {"image": image, "task_id": np.full((b,), task.task_id, np.int32), "valid": np.ones((b,), bool)}
  if args.head == "cls":
    batch["label"] = rng.integers(0, task.num_classes, (b,)).astype(np.int32)
  else:
    batch["mask"] = rng.integers(0, task.num_classes, (b, s, s)).astype(np.int32)
  return batch


def _setup(args, moe_on: bool):
  """Both steps for one encoder kind, built on the same weights. Returns a dict of callables and facts."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from m2dino_jax.models import convert, vit
  from m2dino_jax.tasks import registry
  from m2dino_jax.train import core, optim
  from m2dino_jax.train.multitask import steps, trainer

  config = _config(args, moe_on)
  task = registry.get(args.task or DEFAULT_TASK[args.head])
  encoder, heads = trainer.build_modules(config, [task], moe_on=moe_on, seed=args.seed)
  vit_cfg = vit.ViTConfig.from_config(config.model)
  moe_layers = [i for i, blk in enumerate(encoder.blocks) if blk.is_moe]
  with_torch = "torch" in _impls(args)
  if with_torch:
    if config.model.dtype != "float32":
      raise ValueError("the torch reference step is fp32: use --impls jax with --dtype " + config.model.dtype)
    ref, opt = _torch_model(args, config, task, vit_cfg, moe_layers)
    # our model gets the torch model's weights
    convert.assign(encoder, ref.jax_encoder_params(vit_cfg), "torch reference")
    convert.assign(heads[task.name], ref.head.jax_params(), "torch reference head")
  enc_gdef, enc_params, enc_rest = nnx.split(encoder, nnx.Param, ...)
  head_gdef, head_params = nnx.split(heads[task.name], nnx.Param)
  o = config.optim
  tx = optim.adam_tx(o)
  settings = steps.Settings(
      lr_schedule=optim.lr_schedule(o, 1000), tx=tx, head_lr_mult=float(o.head_lr_mult), clip_norm=float(o.clip_norm),
      loss_cfg=config.loss, enc_scales=jax.tree.map(np.float32, optim.encoder_lr_scales(enc_params, o, vit_cfg.depth)))
  state = core.TrainState(step=jnp.int32(0), params={"encoder": enc_params, "heads": {task.name: head_params}},
                          opt_state={"encoder": tx.init(enc_params), "heads": {task.name: tx.init(head_params)}},
                          rng=jnp.asarray(core.seed_data(args.seed)))
  bound = steps.bound_inputs([task], {}, enc_rest)
  batch = _batch(args, task, np.random.default_rng(args.seed))
  jbatch = jax.tree.map(jnp.asarray, batch)
  program = steps.train_program(enc_gdef, {task.name: head_gdef}, [task], settings)

  t0 = time.perf_counter()
  compiled = jax.jit(program, donate_argnums=(0,)).lower(state, jbatch, bound).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def jax_step():
    holder["state"], metrics = compiled(holder["state"], jbatch, bound)
    return float(jax.block_until_ready(metrics["loss"]))

  steps_ = {"jax": jax_step}
  if with_torch:
    import torch
    pixels = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
    task_ids = torch.from_numpy(batch["task_id"].astype(np.int64))
    target = torch.from_numpy(batch["label" if args.head == "cls" else "mask"].astype(np.int64))

    def torch_step():
      from m2dino_jax.bench import torch_ref
      return torch_ref.train_step(ref, opt, pixels, task_ids, target, head_kind=args.head,
                                  num_classes=task.num_classes, clip_norm=config.optim.clip_norm)
    steps_["torch"] = torch_step

  flops = train_flops_per_image(
      dim=vit_cfg.dim, depth=vit_cfg.depth, mlp_dim=vit_cfg.mlp_dim, patch=vit_cfg.patch, image_size=args.size,
      channels=vit_cfg.in_chans, registers=vit_cfg.num_registers, moe_layers=moe_layers,
      num_experts=config.moe.num_experts, top_k=config.moe.top_k, head=args.head, num_classes=task.num_classes,
      seg_channels=config.heads.seg_channels, seg_inputs=len(vit_cfg.out_blocks))
  params = {"jax": sum(x.size for x in jax.tree.leaves(enc_params)) + sum(x.size for x in jax.tree.leaves(head_params))}
  if with_torch:
    params["torch"] = sum(p.numel() for p in ref.parameters())
  return {**steps_, "compile_s": compile_s, "xla_flops": common.xla_flops(compiled), "flops": flops,
          "task": task.name, "moe_layers": moe_layers, "params": params}


def _impls(args) -> list[str]:
  impls = [i.strip() for i in str(getattr(args, "impls", "jax,torch")).split(",") if i.strip()]
  bad = [i for i in impls if i not in ("jax", "torch")]
  if bad or not impls:
    raise ValueError(f"--impls: use 'jax', 'torch' or both, got {getattr(args, 'impls', '')!r}")
  return impls


def run(args) -> int:
  if args.compile:
    return compile_count.run(args)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import jax

  threads = len(os.sched_getaffinity(0))
  impls = _impls(args)
  torch_threads = None
  if "torch" in impls:
    import torch
    torch.set_num_threads(args.torch_threads or threads)
    torch_threads = torch.get_num_threads()
  rows, extra, ratios, compile_s = [], {}, {}, {}
  for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
    s = _setup(args, mode == "moe")
    if "torch" in impls and s["params"]["jax"] != s["params"]["torch"]:
      raise AssertionError(f"parameter counts differ: {s['params']}")
    first = {impl: s[impl]() for impl in impls}  # warm-up, and the check that both compute the same loss
    times = common.time_interleaved({impl: s[impl] for impl in impls}, args.repeats)
    fl = s["flops"]
    for impl in impls:
      t = times[impl]["median_s"]
      ours = impl == "jax"
      name = f"{args.variant} {'MoE ' + str(s['moe_layers']) if mode == 'moe' else 'dense'}"
      rows.append({
          "name": f"{name} {impl}", "encoder": name, "impl": impl, "head": f"{args.head}:{s['task']}",
          "batch": args.batch, "median_s": t, "min_s": times[impl]["min_s"], "repeats": args.repeats,
          "gflop_per_img": fl["train"] / 1e9,
          "xla_gflop_per_img": s["xla_flops"] / args.batch / 1e9 if ours and s["xla_flops"] else None,
          "first_loss": first[impl],
          **common.throughput(args, images=args.batch, seconds=t, flops=fl["train"] * args.batch,
                              xla=s["xla_flops"] if ours else None)})
    compile_s[f"{mode}_jax_step"] = s["compile_s"]
    if s["xla_flops"]:
      ratios[f"{mode}_xla_over_analytic_flops"] = s["xla_flops"] / (fl["train"] * args.batch)
    extra[mode] = {"params": s["params"]["jax"], "flops": fl}
    if len(impls) == 2:
      ratios[f"{mode}_jax_over_torch_images_per_s"] = times["torch"]["median_s"] / times["jax"]["median_s"]
      extra[mode]["loss_abs_diff"] = abs(first["jax"] - first["torch"])
    del s
  print(f"train step {args.variant} at {args.size}px x{args.channels}ch, batch {args.batch}, head {args.head}; "
        f"MoE E={args.experts} top-{args.top_k} {args.moe_layers} cf {args.capacity_factor} "
        f"(jax backend {args.moe_backend}, torch per-expert loop); {threads} cores, torch threads "
        f"{torch_threads}, jax {jax.default_backend()} {args.dtype}")
  common.print_table(rows, ["name", "batch", "median_s", "min_s", "images_per_s_per_device", "gflop_per_img",
                            "xla_gflop_per_img", "tflops_per_device", "mfu", "first_loss"])
  for mode, e in extra.items():
    diff = f", |first loss jax - torch| {e['loss_abs_diff']:.2e}" if "loss_abs_diff" in e else ""
    print(f"{mode}: {e['params'] / 1e6:.1f} M params{diff}")
  common.write_results(args, "train", rows, ratios=ratios, compile_s=compile_s, modes=extra, threads=threads,
                       torch_threads=torch_threads,
                       shapes={"batch": args.batch, "size": args.size, "channels": args.channels,
                               "variant": args.variant, "dtype": args.dtype,
                               "tokens": extra[next(iter(extra))]["flops"]["tokens"] if extra else None})
  return 0
