"""M2DINO: multi-task ultrasound training under three task-aggregation paradigms.

Commands (paradigm = ts | cg | au; add `,smoke` for a CPU-sized run):
  python -m m2dino_jax.main --config=configs/m2dino.py:paradigm=au --workdir=runs/au
  python -m m2dino_jax.main --config=configs/m2dino.py:paradigm=au,smoke --workdir=/tmp/au   # ~5 min on 2 CPU cores
  m2dino report --runs ts=runs/ts cg=runs/cg au=runs/au --out runs/report
Data-scale sweep (TS / CG / AU at train fractions 0.1, 0.3, 1.0 in one command; `sweep.fractions`,
`sweep.paradigms` override):
  python -m m2dino_jax.main --config=configs/m2dino.py:scale,smoke --workdir=runs/scale
  m2dino report --sweep runs/scale --out runs/scale/report
Study knobs: data.train_fraction / max_train_per_task / train_per_task (per task data scale, the same subset
for every paradigm and seed); groups ('' = the paper-style preset with Abd and MO, 'organ', 'type',
'name:task+task;...' or a JSON file); optim.freeze ('none' | 'backbone' = frozen DINOv3 backbone with
trainable MoE blocks and heads | 'all_but_heads' | path patterns); moe.routing_loss ('balance' per batch |
'window' over batches | 'task' DAMEX-style task-to-expert assignment).

Same architecture, preprocessing, optimiser and budget rule for all three paradigms; only the
aggregation differs (TS also turns MoE off, as in the paper):
  budget rule: a model with T tasks trains steps_per_task * T steps (one task per batch), so every
  paradigm spends the same number of batches in total.
Defaults: DINOv3 ViT-S/16 with 4 registers, grey input, 224 px; MoE in the last 4 blocks, E=8, top-2;
UperNet-lite on blocks 3, 5, 7, 11; AdamW 1e-4 (heads x10) with cosine decay to 1e-6.
Data: the embedded simulator (sonosynth) unless data.source points at the FMC_UIA bundle
(--config.data.source.kind=folder --config.data.source.root=PATH).
Expected result (smoke, simulator): every task type beats its trivial baseline (Dice above the
all-background mask, AUC > 0.6, IoU / MRE better than the mean box / mean points).
"""

import ml_collections

from m2dino_jax.advise import adviceio
from m2dino_jax.configlib import parse_arg
from m2dino_jax.data.pipeline import default_data_config
from m2dino_jax.errors import ConfigError
from m2dino_jax.models.heads import default_heads_config
from m2dino_jax.models.moe import default_moe_config
from m2dino_jax.train.optim import default_optim_config


def get_config(arg=None):
  arg = parse_arg(arg, paradigm="au", variant="S/16", smoke=False, tasks="all", steps=-1, scale=False, advice="")
  c = ml_collections.ConfigDict()
  c.trainer = "multitask"
  # 'advised' trains the groups and per-group sampling weights of an advice.json (`m2dino advise fit`): CG
  # with groups = weights_file = the advice file (eval files record paradigm 'cg'; report it as advised=DIR)
  advised = arg.paradigm == "advised"
  if advised and not arg.advice:
    raise ConfigError("advice", "paradigm=advised needs advice=PATH (advice.json from `m2dino advise fit`)")
  c.paradigm = "cg" if advised else arg.paradigm
  c.advice = arg.advice
  c.tasks = arg.tasks  # 'all' or a comma list of task ids
  # CG groups: '' = the 'paper' preset (Fetal, Abd, MO, Breast, Lung, Thyroid, Cardiac, Gyn), a preset name
  # ('paper' | 'organ' | 'type'), 'name:task+task;name:task', or a JSON file {name: [tasks]} (tasks/registry.py)
  c.groups = ""
  c.seed = 0
  # JAX persistent compilation cache: '' = auto ($M2DINO_COMPILE_CACHE, else ~/.cache/m2dino_jax/xla/HOST),
  # 'off', or a folder (train/compile_cache.py)
  c.compile_cache = ""

  c.model = ml_collections.ConfigDict(dict(
      variant=arg.variant, kind="dinov3", in_chans=1, num_registers=4, out_blocks=(3, 5, 7, 11), drop_path=0.1,
      layerscale_init=1e-5, pos_embed_rescale=None,
      # 'bfloat16': bf16 matmul inputs with fp32 accumulation, fp32 weights and AdamW state (models/precision.py)
      dtype="float32", attention="matmul"))
  c.init_from = ""  # HF DINOv3/DINOv2 folder, UltraDINO / our encoder checkpoint
  # init_from policy: False = the model.* architecture must equal the checkpoint's (a difference is refused naming
  # the keys); True = the checkpoint's architecture is taken into model.* (the UltraDINO teacher hand-off)
  c.init_from_adopt = False

  c.moe = default_moe_config()
  c.moe.enabled = arg.paradigm != "ts" or arg.scale  # TS turns it off in any case
  c.heads = default_heads_config()
  c.loss = ml_collections.ConfigDict(dict(dice_weight=1.0, label_smoothing=0.0, box_l1_weight=1.0,
                                          giou_weight=1.0, task_weights=""))
  c.optim = default_optim_config()
  c.optim.warmup_steps = 50

  c.data = default_data_config()
  c.data.channels = 1
  c.data.mixture = "uniform"
  # simulator: sonosynth's long-tailed per-task sizes (15x between the smallest and largest task, as in the
  # challenge); the smoke variant uses equal sizes
  c.data.source.synthetic_count = 0
  if advised:
    adviceio.apply(c, arg.advice)

  # `m2dino advise probe` (m2dino_jax/advise/probe.py): budget = program calls (steps + forward losses)
  c.advise = ml_collections.ConfigDict(dict(
      budget=20000, repeats=3, warmup_steps=0, checkpoint="", probe_step=100,
      scale_fractions="", scale_steps=10))

  # data-scale sweep: '0.1,0.3,1.0' trains every paradigm of `paradigms` at each fraction (train/multitask/sweep.py)
  c.sweep = ml_collections.ConfigDict(dict(fractions="0.1,0.3,1.0" if arg.scale else "", paradigms="ts,cg,au"))

  c.steps_per_task = arg.steps if arg.steps > 0 else 400
  c.total_steps = -1  # > 0 overrides the budget rule
  c.log_every = 10
  c.eval_every = 0  # 0 = only at the end
  c.tensorboard = True
  # the final per-task table also shows each task's trivial baseline (tasks/baselines.py; fitted on the train split)
  c.report_baselines = False
  c.checkpoint = ml_collections.ConfigDict(dict(every=200, keep=2, async_save=True))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  c.mesh_devices = -1  # use the first N devices (-1 = all)
  c.sharding = "dp"  # 'dp' | 'fsdp' | 'ep'
  # multi-process: empty / 0 / -1 = read M2DINO_* from the environment (launch/local.py sets them);
  # auto = let JAX discover the cluster (SLURM, TPU pods)
  c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=0, process_id=-1, auto=False))

  if arg.smoke:
    c.model.variant = "mu/16"
    c.model.out_blocks = (0, 1, 2, 3)
    c.model.drop_path = 0.0
    c.model.num_registers = 2
    c.heads.seg_channels = 32
    c.heads.mlp_hidden = 64
    c.moe.num_experts = 4
    c.moe.layers = "last2"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.data.image_size = 64
    c.data.batch_size = 16
    c.data.eval_batch_size = 16
    c.data.source.synthetic_count = 0 if arg.scale else 48  # the sweep keeps the long tail
    c.data.source.synthetic_size = 96
    c.steps_per_task = arg.steps if arg.steps > 0 else 40
    c.log_every = 5
    c.checkpoint.every = 20
    c.advise.warmup_steps = 0
    c.advise.probe_step = 20
  return c
