"""Multi-task train step (images/s and TFLOP/s per device, MFU): our jitted JAX step vs an equivalent PyTorch step.

JAX: the multi-task trainer's program (train/multitask/steps.py: encoder + one task head + loss + MoE
aux losses + clipping + AdamW), compiled ahead of time so that compilation is timed on its own, and run
data-parallel over a mesh of every local device (the dp preset: state replicated, the --batch images split
over 'data'; on a GPU / TPU host that is the accelerators, on a CPU host the CPU). PyTorch
(bench/torch_ref.py, CPU only): the transformers DINOv3ViTModel (eager attention, fp32) with a per-expert-loop
MoE patched into the MoE blocks, the same head and loss, torch.optim.AdamW. Both start from the same weights
(ours are copied from the torch model) and see the same batch; the first losses are compared in the run.
Steps are timed round-robin after a warm-up (a shared machine's load hits both alike), torch with as many
threads as the cores JAX uses. On an accelerator host the torch reference is skipped by default (`--torch auto`);
asked for explicitly it runs on the CPU, its rows say so and get no MFU (the peak is the accelerator's).

FLOPs per image are counted analytically (matmuls only, fwd + bwd = 3 x fwd; bench/flops.py), the
MaxText-style
  3 * (2 * N_tok * P_active + 4 * L * N_tok^2 * d) + head,
and also read from XLA's cost analysis of the compiled step (all ops, including MoE dispatch and the
capacity padding of the dense back-end; all devices together); their ratio is reported per mode.
Per device: images/s, TFLOP/s (analytic) and XLA TFLOP/s, and MFU = analytic TFLOP/s / the device's peak
(bench/peaks.py: the bf16 vendor table on accelerators, a measured fp32 matmul on CPU, or --peak-tflops).

Variants (`--jax`, `--torch`, all timed in the same round-robin): JAX `float32` / `bfloat16` (model.dtype:
bf16 matmul inputs, fp32 accumulation, fp32 parameters and AdamW state), optionally `/xla` for the earlier
attention formulation (model.attention='xla'); torch `float32` / `bfloat16` (torch.autocast bf16, fp32
parameters). Every variant starts from the same weights; ratios pair each JAX variant with the torch
variant of its precision. The accelerator run of the issue (ViT-B/16, bf16, MFU):
  m2dino bench train --variant B/16 --jax bfloat16 --modes dense,moe --batch 64

Times: wall seconds per step (median and min) and CPU seconds per step (median of the process's CPU time
over the step, all threads). On a shared, oversubscribed machine the wall time mostly measures the other
jobs; on one pinned core the CPU time is the work done, so the `cpu` ratio is the stable one there.
The matmul rate of this CPU (one [tokens, dim] x [dim, mlp_dim] matmul, the step's largest shape, in JAX
and torch, each precision; wall GFLOP/s and per CPU second) is measured in the same run, so the achieved
GFLOP/s can be read against it.

Threads: by default torch gets as many threads as JAX's cores. On an oversubscribed machine torch's
OpenMP threads wait for each other far more than XLA's pool does (measured on the shared 2-core box:
ViT-S torch step 26 s with 2 threads, 4.7 s with 1), which inflates the ratio. The single-core
comparison pins the whole process to one core (issue 17 measured the XLA_FLAGS thread settings alone
leaving JAX on ~1.9 cores):
  taskset -c 0 m2dino bench train --torch-threads 1 --modes dense --jax float32,bfloat16 --torch float32,bfloat16
"""

from __future__ import annotations

import os
import time

import numpy as np

from m2dino_jax.bench import common, compile_count, flops

DEFAULT_TASK = {"cls": "fetal_plane_cls", "seg": "cardiac_multi"}
SMOKE = {"variant": "mu/16", "size": 32, "batch": 2, "repeats": 2, "experts": 4, "moe_layers": "last2",
         "torch_threads": 1, "matmul_repeats": 1}


def add_args(p) -> None:
  p.add_argument("--variant", default="S/16", help="encoder variant, e.g. S/16, B/16, mu/16")
  p.add_argument("--size", type=int, default=224, help="image side in pixels")
  p.add_argument("--batch", type=int, default=8, help="images per train step")
  p.add_argument("--head", choices=("cls", "seg"), default="cls", help="task head")
  p.add_argument("--task", default="", help="task id (default: fetal_plane_cls / cardiac_multi)")
  p.add_argument("--channels", type=int, default=1, help="input channels (1 = grey, as the M2DINO config)")
  p.add_argument("--registers", type=int, default=4, help="register tokens of the encoder")
  p.add_argument("--out-blocks", default="3,5,7,11", help="encoder blocks feeding the seg head")
  p.add_argument("--experts", type=int, default=8, help="MoE experts per MoE block")
  p.add_argument("--top-k", type=int, default=2, help="experts per token")
  p.add_argument("--moe-layers", default="last4", help="which blocks are MoE: lastN, all or a comma list")
  p.add_argument("--capacity-factor", type=float, default=1.25, help="training capacity (<= 0: dropless)")
  p.add_argument("--moe-backend", default="dense", choices=("dense", "dropless"), help="MoE dispatch")
  p.add_argument("--modes", default="dense,moe", help="which encoders: 'dense' (no MoE), 'moe'")
  p.add_argument("--repeats", type=int, default=5, help="timed steps after the warm-up")
  p.add_argument("--seed", type=int, default=0, help="random seed of the weights and batches")
  p.add_argument("--torch-threads", type=int, default=0, help="0 = the cores JAX uses (the fair default)")
  p.add_argument("--jax", default="float32",
                 help="JAX variants: model.dtype (float32 | bfloat16), optionally /xla for the earlier attention")
  p.add_argument("--torch", default="auto",
                 help="torch variants on the CPU: float32 | bfloat16 (autocast) | none; auto = float32 on a CPU "
                      "host, none on an accelerator host")
  p.add_argument("--matmul-repeats", type=int, default=5, help="timed calls of the matmul-rate probe (0: skip)")
  p.add_argument("--compile", action="store_true",
                 help="instead: count and time the compiled programs of a multi-task model (bench/compile_count.py)")
  compile_count.add_args(p)


# ------------------------------------------------------------------------------------------------ FLOPs


def train_flops_per_image(*, dim: int, depth: int, mlp_dim: int, patch: int, image_size: int, channels: int,
                          registers: int, moe_layers=(), num_experts: int = 8, top_k: int = 2,
                          head: str = "cls", num_classes: int = 2, seg_channels: int = 128,
                          seg_inputs: int = 4) -> dict:
  """Matmul FLOPs of one image's forward (encoder, head) and of a train step (3 x forward).

  Encoder (bench/flops.vit_forward_flops): patch embedding on the patches, per block q/k/v/o (4 d^2 per token),
  attention scores and values (2 * 2 * N^2 * d), and the FFN: dense 2 d h per token, MoE router d E plus top_k
  experts.
  Heads: linear classifier on [CLS || mean]; UperNet-lite laterals, 3x3 convs and classifier.
  Norms, softmax, activations, resizes and the optimiser are not counted.
  """
  grid = image_size // patch
  patches = grid * grid
  tokens = 1 + registers + patches
  encoder = flops.vit_forward_flops(dim=dim, depth=depth, mlp_dim=mlp_dim, patch=patch, image_size=image_size,
                                    channels=channels, prefix=1 + registers, moe_layers=moe_layers,
                                    experts=num_experts, top_k=top_k)
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


def _config(args, moe_on: bool, dtype: str = "float32", attention: str = "matmul"):
  import ml_collections

  from m2dino_jax.models.heads import default_heads_config
  from m2dino_jax.models.moe import default_moe_config
  from m2dino_jax.train.optim import default_optim_config
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      variant=args.variant, kind="dinov3", in_chans=args.channels, num_registers=args.registers,
      out_blocks=_blocks(args.out_blocks) if args.head == "seg" else (), drop_path=0.0, layerscale_init=1.0,
      pos_embed_rescale=None, dtype=dtype, attention=attention))
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


def _variants(spec: str, allowed=("float32", "bfloat16"), suffixes=("", "/xla")) -> list[str]:
  out = [v.strip() for v in spec.split(",") if v.strip()]
  for v in out:
    dtype, _, impl = v.partition("/")
    if dtype not in allowed or ("/" + impl if impl else "") not in suffixes:
      raise ValueError(f"unknown variant '{v}': use {allowed} (JAX: optionally /xla)")
  return out


def data_mesh():
  """A data-parallel mesh over every local device (the accelerators on a GPU / TPU host, the CPU otherwise)."""
  import jax

  from m2dino_jax import mesh as mesh_lib
  return mesh_lib.make_mesh({"data": -1}, jax.local_devices())


def jax_step(args, moe_on: bool, mesh, variant: str = "float32", weights=None) -> dict:
  """The multi-task train program of one JAX variant, compiled ahead of time for a data-parallel `mesh` (state
  and bound inputs replicated, the batch split over 'data'): {'step' (one step, returns its loss), 'compiled',
  'compile_s', 'xla_flops' (the whole step, all devices), 'flops' (analytic, per image), 'params', 'moe_layers',
  'task', 'batch' (host arrays)}. `weights` = (encoder, head) flat dicts to load (else the modules' own init)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from m2dino_jax import mesh as mesh_lib
  from m2dino_jax.errors import ConfigError
  from m2dino_jax.models import convert, vit
  from m2dino_jax.tasks import registry
  from m2dino_jax.train import core, optim
  from m2dino_jax.train.multitask import steps, trainer

  ndev = mesh.devices.size
  if args.batch % ndev:
    raise ConfigError("bench.train.batch", f"--batch {args.batch} does not split over the {ndev} local devices "
                      "of the data-parallel mesh: use a multiple")
  dtype, _, impl = variant.partition("/")
  config = _config(args, moe_on, dtype, impl or "matmul")
  task = registry.get(args.task or DEFAULT_TASK[args.head])
  vit_cfg = vit.ViTConfig.from_config(config.model)
  encoder, heads = trainer.build_modules(config, [task], moe_on=moe_on, seed=args.seed)
  if weights is not None:
    convert.assign(encoder, weights[0], "torch reference")
    convert.assign(heads[task.name], weights[1], "torch reference head")
  moe_layers = [i for i, blk in enumerate(encoder.blocks) if blk.is_moe]
  enc_gdef, enc_params, enc_rest = nnx.split(encoder, nnx.Param, ...)
  head_gdef, head_params = nnx.split(heads[task.name], nnx.Param)
  o = config.optim
  tx = optim.adam_tx(o)
  settings = steps.Settings(
      lr_schedule=optim.lr_schedule(o, 1000), tx=tx, head_lr_mult=float(o.head_lr_mult),
      clip_norm=float(o.clip_norm), loss_cfg=config.loss,
      enc_scales=jax.tree.map(np.float32, optim.encoder_lr_scales(enc_params, o, vit_cfg.depth)))
  rep = mesh_lib.replicated(mesh)
  state = core.TrainState(step=jnp.int32(0), params={"encoder": enc_params, "heads": {task.name: head_params}},
                          opt_state={"encoder": tx.init(enc_params), "heads": {task.name: tx.init(head_params)}},
                          rng=jnp.asarray(core.seed_data(args.seed)))
  state = jax.device_put(state, rep)  # the dp preset: every parameter and optimiser state replicated
  bound = jax.device_put(steps.bound_inputs([task], {}, enc_rest), rep)
  batch = _batch(args, task, np.random.default_rng(args.seed))
  gbatch = mesh_lib.shard_batch(batch, mesh, mesh_lib.get_rules("dp"))
  program = steps.train_program(enc_gdef, {task.name: head_gdef}, [task], settings)
  state_sh = core.shardings_of(state)
  fn = jax.jit(program, in_shardings=(state_sh, core.shardings_of(gbatch), core.shardings_of(bound)),
               out_shardings=(state_sh, None), donate_argnums=(0,))
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = fn.lower(state, gbatch, bound).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def step():
    with jax.set_mesh(mesh):
      holder["state"], metrics = compiled(holder["state"], gbatch, bound)
    return float(jax.block_until_ready(metrics["loss"]))

  fl = train_flops_per_image(
      dim=vit_cfg.dim, depth=vit_cfg.depth, mlp_dim=vit_cfg.mlp_dim, patch=vit_cfg.patch, image_size=args.size,
      channels=vit_cfg.in_chans, registers=vit_cfg.num_registers, moe_layers=moe_layers,
      num_experts=config.moe.num_experts, top_k=config.moe.top_k, head=args.head, num_classes=task.num_classes,
      seg_channels=config.heads.seg_channels, seg_inputs=len(vit_cfg.out_blocks))
  params = sum(x.size for x in jax.tree.leaves(enc_params)) + sum(x.size for x in jax.tree.leaves(head_params))
  return {"step": step, "compiled": compiled, "compile_s": compile_s, "xla_flops": common.xla_flops(compiled),
          "flops": fl, "params": params, "moe_layers": moe_layers, "task": task, "batch": batch,
          "config": config, "vit_cfg": vit_cfg}


def _moe_layer_ids(config, task, moe_on: bool, seed: int) -> list[int]:
  """The MoE blocks of the model the trainer builds (from its abstract shape: nothing is initialised)."""
  from flax import nnx

  from m2dino_jax.train.multitask import trainer
  encoder, _ = nnx.eval_shape(lambda: trainer.build_modules(config, [task], moe_on=moe_on, seed=seed))
  return [i for i, blk in enumerate(encoder.blocks) if blk.is_moe]


def _setup(args, moe_on: bool, jax_variants=("float32",), torch_variants=("float32",), mesh=None):
  """Steps for one encoder kind, all on the same weights: {name: step()} (each returns the loss before its
  update) and the facts of the model. The JAX steps run data-parallel over `mesh` (default: every local device);
  the torch steps run on this host's CPU. Without torch variants the JAX modules keep their own init."""
  mesh = mesh if mesh is not None else data_mesh()
  weights, ref, torch_state = None, None, None
  fns, compile_s, xla_flops, first = {}, {}, None, None
  if torch_variants:
    import torch

    from m2dino_jax.bench import torch_ref
    from m2dino_jax.models import vit
    from m2dino_jax.tasks import registry
    config = _config(args, moe_on)
    task = registry.get(args.task or DEFAULT_TASK[args.head])
    vit_cfg = vit.ViTConfig.from_config(config.model)
    moe_layers = _moe_layer_ids(config, task, moe_on, args.seed)
    ref, _ = _torch_model(args, config, task, vit_cfg, moe_layers)
    # the exported weights are copies: the JAX step donates its state, so arrays sharing memory with torch's
    # tensors would let each side write into the other's weights
    weights = ({k: np.array(v, copy=True) for k, v in ref.jax_encoder_params(vit_cfg).items()},
               {k: np.array(v, copy=True) for k, v in ref.head.jax_params().items()})
    torch_state = {k: v.clone() for k, v in ref.state_dict().items()}

  for variant in jax_variants:
    j = jax_step(args, moe_on, mesh, variant, weights)
    first = first or j
    fns[f"jax {variant}"], compile_s[f"jax {variant}"] = j["step"], j["compile_s"]
    xla_flops = xla_flops or j["xla_flops"]

  config, task = first["config"], first["task"]
  batch = first["batch"]
  if torch_variants:
    pixels = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
    task_ids = torch.from_numpy(batch["task_id"].astype(np.int64))
    target = torch.from_numpy(batch["label" if args.head == "cls" else "mask"].astype(np.int64))
    for variant in torch_variants:
      model = ref if variant == torch_variants[0] else _torch_model(args, config, task, first["vit_cfg"],
                                                                    first["moe_layers"])[0]
      model.load_state_dict(torch_state)
      opt = torch_ref.make_optimizer(model, lr=config.optim.lr, head_lr_mult=config.optim.head_lr_mult,
                                     weight_decay=config.optim.weight_decay,
                                     betas=(config.optim.b1, config.optim.b2))

      def torch_step(model=model, opt=opt, autocast=variant == "bfloat16"):
        return torch_ref.train_step(model, opt, pixels, task_ids, target, head_kind=args.head,
                                    num_classes=task.num_classes, clip_norm=config.optim.clip_norm,
                                    autocast=autocast)
      fns[f"torch {variant}"] = torch_step

  params = {"jax": first["params"]}
  if ref is not None:
    params["torch"] = sum(p.numel() for p in ref.parameters())
  return {"fns": fns, "compile_s": compile_s, "xla_flops": xla_flops, "flops": first["flops"], "task": task.name,
          "moe_layers": first["moe_layers"], "params": params, "torch_model": ref, "devices": mesh.devices.size}


def matmul_rates(m: int, k: int, n: int, repeats: int) -> dict:
  """GFLOP/s of one [m, k] x [k, n] matmul in JAX and torch, fp32 and bf16 inputs (fp32 accumulation), by wall
  time (median) and per CPU second: {name: {'wall', 'cpu'}}. Compare the libraries by the wall rate: with
  several threads the CPU time also counts each pool's waiting threads, which XLA and torch account for
  differently (at 2 threads bf16 read 231 vs 845 GFLOP/s per CPU second while the wall rates were equal)."""
  import jax
  import jax.numpy as jnp
  import torch

  from m2dino_jax.bench import common
  a = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
  b = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)
  fns = {}
  for dtype in ("float32", "bfloat16"):
    f = jax.jit(lambda x, y, dt=dtype: jnp.dot(x.astype(dt), y.astype(dt), preferred_element_type=jnp.float32))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    fns[f"jax {dtype}"] = lambda f=f, ja=ja, jb=jb: jax.block_until_ready(f(ja, jb))
    tdt = getattr(torch, dtype)
    ta, tb = torch.from_numpy(a).to(tdt), torch.from_numpy(b).to(tdt)
    fns[f"torch {dtype}"] = lambda ta=ta, tb=tb: torch.mm(ta, tb)
  times = common.time_round_robin(fns, repeats)
  flop = 2 * m * k * n / 1e9
  return {name: {"wall": flop / t["median_s"], "cpu": flop / t["cpu_s"]} for name, t in times.items()}


def torch_variants_of(spec: str, accelerator: bool) -> list[str]:
  """The torch variants to run: 'auto' = float32 on a CPU host and none on an accelerator host (the reference
  runs on the CPU only, so there it measures another device); 'none' or '' = none."""
  spec = spec.strip()
  if spec == "auto":
    return [] if accelerator else ["float32"]
  if spec in ("", "none"):
    return []
  return _variants(spec, suffixes=("",))


def run(args) -> int:
  if args.compile:
    return compile_count.run(args)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import jax

  accelerator = common.on_accelerator()
  threads = len(os.sched_getaffinity(0))
  jax_variants = _variants(args.jax)
  torch_variants = torch_variants_of(args.torch, accelerator)
  if torch_variants:
    import torch
    torch.set_num_threads(args.torch_threads or threads)
  mesh = data_mesh()
  ndev = mesh.devices.size
  dev = common.device_of(args)
  jax_where = f"{ndev} x {dev['kind']} ({jax.default_backend()}, data-parallel mesh)"
  torch_where = "CPU" + (" (not the accelerator: no MFU)" if accelerator else "")
  rows, extra = [], {}
  for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
    s = _setup(args, mode == "moe", jax_variants, torch_variants, mesh=mesh)
    if len(set(s["params"].values())) != 1:
      raise AssertionError(f"parameter counts differ: {s['params']}")
    first = {name: fn() for name, fn in s["fns"].items()}  # warm-up, and the check that all compute one loss
    times = common.time_round_robin(s["fns"], args.repeats)
    fl = s["flops"]
    step_flops = fl["train"] * args.batch
    encoder = f"{args.variant} {'MoE ' + str(s['moe_layers']) if mode == 'moe' else 'dense'}"
    for name, t in times.items():
      ours = name.startswith("jax")
      rows.append({
          "name": f"{encoder} {name}", "median_s": t["median_s"], "encoder": encoder, "impl": name,
          "runs_on": jax_where if ours else torch_where, "devices": ndev if ours else 1,
          "head": f"{args.head}:{s['task']}", "batch": args.batch,
          "s_per_step": t["median_s"], "min_s": t["min_s"], "cpu_s": t["cpu_s"],
          "images_per_s": args.batch / t["median_s"],
          **common.throughput(args, images=args.batch, seconds=t["median_s"], flops=step_flops,
                              xla=s["xla_flops"] if ours else None, devices=ndev if ours else 1,
                              peak_applies=ours or not accelerator),
          "gflop_per_img": fl["train"] / 1e9, "gflop_per_s": step_flops / t["median_s"] / 1e9,
          "gflop_per_cpu_s": step_flops / t["cpu_s"] / 1e9,
          "xla_gflop_per_img": s["xla_flops"] / args.batch / 1e9 if ours and s["xla_flops"] else None,
          "compile_s": s["compile_s"].get(name), "first_loss": first[name]})
    ratios = {}
    for name in (n for n in times if n.startswith("jax")):
      ref = f"torch {name.split()[1].split('/')[0]}"
      if ref in times:
        ratios[f"{name} / {ref}" + (" (accelerator vs CPU)" if accelerator else "")] = {
            "wall_median": times[ref]["median_s"] / times[name]["median_s"],
            "wall_min": times[ref]["min_s"] / times[name]["min_s"],
            "cpu": times[ref]["cpu_s"] / times[name]["cpu_s"],
            "first_loss_abs_diff": abs(first[name] - first[ref])}
    xla_ratio = s["xla_flops"] / step_flops if s["xla_flops"] else None
    extra[mode] = {"ratios": ratios, "params": s["params"]["jax"], "flops": fl, "xla_flops_per_step": s["xla_flops"],
                   "xla_over_analytic_flops": xla_ratio}
    del s
  rates = {}
  if args.matmul_repeats > 0 and torch_variants and not accelerator:
    c = _config(args, False)
    from m2dino_jax.models import vit
    v = vit.ViTConfig.from_config(c.model)
    tokens = args.batch * (1 + v.num_registers + (args.size // v.patch) ** 2)
    rates = matmul_rates(tokens, v.dim, v.mlp_dim, args.matmul_repeats)
  print(f"train step {args.variant} at {args.size}px x{args.channels}ch, batch {args.batch} "
        f"({args.batch // ndev} per device), head {args.head}; MoE E={args.experts} top-{args.top_k} "
        f"{args.moe_layers} cf {args.capacity_factor} (jax backend {args.moe_backend}, torch per-expert loop); "
        f"jax on {jax_where}; torch {', '.join(torch_variants) or 'skipped'}"
        + (f" on {torch_where}, {torch.get_num_threads()} threads" if torch_variants else "")
        + f"; {threads} cores")
  common.print_table(rows, ["encoder", "impl", "devices", "batch", "s_per_step", "min_s", "cpu_s",
                            "images_per_s_per_device", "tflops_per_device", "xla_tflops_per_device", "mfu",
                            "compile_s", "first_loss"])
  for mode, e in extra.items():
    if e["xla_over_analytic_flops"]:
      print(f"{mode}: XLA / analytic FLOPs per step {e['xla_over_analytic_flops']:.3f} "
            f"({e['xla_flops_per_step'] / 1e9:.4g} / {e['flops']['train'] * args.batch / 1e9:.4g} GFLOP)")
    for pair, r in e["ratios"].items():
      print(f"{mode}: {pair}: speed-up {r['wall_median']:.2f}x (wall median), {r['wall_min']:.2f}x (wall min), "
            f"{r['cpu']:.2f}x (cpu); |first loss diff| {r['first_loss_abs_diff']:.2e}")
  if rates:
    print("matmul rate of this CPU (the step's largest matmul; GFLOP/s wall, per CPU second): "
          + ", ".join(f"{k} {v['wall']:.0f} / {v['cpu']:.0f}" for k, v in rates.items()))
  flat = {f"{mode} {pair} {k}": v for mode, e in extra.items() for pair, r in e["ratios"].items()
          for k, v in r.items() if k != "first_loss_abs_diff"}
  flat.update({f"{mode} xla_over_analytic_flops": e["xla_over_analytic_flops"] for mode, e in extra.items()})
  from m2dino_jax.models import vit
  v = vit.ViTConfig.from_config(_config(args, False).model)
  shapes = {"variant": args.variant, "size": args.size, "channels": args.channels, "batch": args.batch,
            "batch_per_device": args.batch // ndev, "devices": ndev, "head": args.head,
            "tokens": 1 + v.num_registers + (args.size // v.patch) ** 2}
  common.write_results(args, "train", rows, ratios=flat, compile_s={r["name"]: r["compile_s"] for r in rows},
                       shapes=shapes, modes=extra, matmul_gflop_per_s=rates, threads=threads,
                       torch_variants=torch_variants)
  return 0
