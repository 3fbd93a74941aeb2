"""UltraDINO: DINOv2 self-distillation pretraining on unlabelled ultrasound (arXiv 2506.19552).

Commands:
  # full scale, as published (ViT-S/16; variant=B/16 for the base model), 40 epochs x epoch_length at batch 512:
  python -m m2dino_jax.main --config=configs/ultradino.py:variant=S/16 --workdir=runs/ultradino \
      --config.data.sources='folder:/data/fus=1'
  # CPU smoke (simulator + any folder), about 20 s on 2 cores after compilation:
  python -m m2dino_jax.main --config=configs/ultradino.py:smoke --workdir=/tmp/ultradino
  # then start the multi-task model from the teacher (init_from_adopt=True takes its DINOv2-kind architecture:
  # learned position grid, qkv bias, LayerScale; the dense FFNs are upcycled into the MoE blocks; without it a
  # config that differs from the checkpoint is refused naming the keys):
  python -m m2dino_jax.main --config=configs/m2dino.py --workdir=runs/au --config.init_from=runs/ultradino/teacher \
      --config.init_from_adopt=True
  # the paper's evaluations of the frozen teacher (k-NN / linear macro F1, few-shot mDice), next to random init:
  m2dino eval ssl --encoder runs/ultradino/teacher --baseline random --out runs/ultradino/eval_ssl.json
  # released UltraDINO / DINOv2 .pth weights work wherever a checkpoint does (init_from, m2dino eval --encoder)

Published values (UltraDINO's `ssl_default_config.yaml` + `vit{s,b}16_dinus_13m.yaml`, REFERENCE.md 1.2), kept as
the defaults here: ViT-S/16 or B/16, grey input, 4 registers, drop-path 0.3, LayerScale 1e-5; DINO head 3 layers,
hidden 2048, bottleneck 256, 65,536 weight-normalised prototypes, shared with iBOT; losses DINO 1, iBOT 1 (block
masks, probability 0.5, ratio 0.1-0.5), KoLeo 0.1; EMA centring; teacher momentum 0.992 -> 1 (cosine),
temperature 0.04 -> 0.07 over 30 epochs, student 0.1; 2 x 224 px global crops (scale 0.32-1) + 8 x 96 px local
(0.05-0.32); AdamW lr 0.004 x sqrt(batch / 1024), 10 warm-up epochs, cosine to 1e-6, weight decay 0.04 -> 0.4,
clip 3.0, layer decay 0.9, patch embedding lr x 0.2, last layer frozen for epoch 1; 40 epochs at batch 512 (the
paper). A DINOv2 "epoch" is `epoch_length` iterations, not a pass over the data: DINOv2's default is 1250 (the
UltraDINO paper does not state its value; its released 13M-image config uses 100 epochs x 20,000 iterations), so
every schedule above is in units of `epoch_length` steps. Which centring the paper used is not published
(`loss.centering='sinkhorn'` gives DINOv2's Sinkhorn-Knopp).
Position embedding: DINOv2 kind (learned, 14 x 14 grid for 224 px at patch 16), as UltraDINO's released weights.
Expected result (smoke): the loss falls, RankMe stays above monitor.min_rankme, WORKDIR/teacher is written.
Smoke vs random init (tests/test_dino_vs_random.py, 300 steps on simulator + pydicom echo frames, 64 px):
linear-probe macro F1 0.724 vs 0.609 +- 0.009 (random seeds 0-2); k-NN 0.540 vs 0.518 +- 0.027 and few-shot mDice
0.804 vs 0.793 / 0.806 are not better than random at this scale.
"""

import ml_collections

from m2dino_jax.configlib import parse_arg

SIM_TASKS = "fetal_head,fetal_abdomen_multi,cardiac_multi,breast_lesion,thyroid_nodule,lung"


def get_config(arg=None):
  arg = parse_arg(arg, variant="S/16", smoke=False, steps=-1)
  c = ml_collections.ConfigDict()
  c.trainer = "dino"
  c.seed = 0
  # JAX persistent compilation cache: '' = auto ($M2DINO_COMPILE_CACHE, else ~/.cache/m2dino_jax/xla/HOST),
  # 'off', or a folder (train/compile_cache.py)
  c.compile_cache = ""

  c.model = ml_collections.ConfigDict(dict(
      variant=arg.variant, kind="dinov2", pos_grid=14, in_chans=1, num_registers=4, drop_path=0.3,
      layerscale_init=1e-5, norm_eps=1e-6, query_bias=True, key_bias=True, value_bias=True,
      dtype="float32", attention="matmul"))  # dtype bfloat16: bf16 matmul inputs, fp32 accumulation and weights
  c.head = ml_collections.ConfigDict(dict(prototypes=65536, hidden_dim=2048, bottleneck_dim=256, nlayers=3))
  c.loss = ml_collections.ConfigDict(dict(
      dino_weight=1.0, ibot_weight=1.0, koleo_weight=0.1, student_temp=0.1,
      centering="ema",  # 'ema' | 'sinkhorn' | 'none'
      center_momentum=0.9, sinkhorn_iters=3,
      koleo_group=0))  # rows per KoLeo group (0 = the whole global batch of a crop; Meta: the per-GPU batch)
  c.teacher = ml_collections.ConfigDict(dict(momentum=0.992, final_momentum=1.0, temp=0.07, warmup_temp=0.04,
                                             warmup_temp_epochs=30))
  c.optim = ml_collections.ConfigDict(dict(
      base_lr=0.004, scale_lr=True, min_lr=1e-6, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4,
      clip_grad=3.0, layer_decay=0.9, patch_embed_lr_mult=0.2, freeze_last_layer_epochs=1))
  c.epochs = 40
  c.epoch_length = 1250
  c.total_steps = arg.steps  # > 0 overrides epochs * epoch_length

  c.data = ml_collections.ConfigDict(dict(
      sources="synthetic=1",  # ';'-separated spec=weight: synthetic | folder:PATH (PNG / JPG / DICOM, cine)
      synthetic_tasks=SIM_TASKS, synthetic_count=600, synthetic_size=256, synthetic_seed=0,
      batch_size=512, global_size=224, local_size=96, num_local=8,
      global_scale=(0.32, 1.0), local_scale=(0.05, 0.32), mask_probability=0.5, mask_ratio=(0.1, 0.5),
      channels=1, worker_count=0))
  c.data.aug = ml_collections.ConfigDict(dict(jitter_p=0.8, brightness=0.4, contrast=0.4, solarize_p=0.2))

  # collapse monitors on a fixed batch; RankMe every 5 epochs as UltraDINO
  c.monitor = ml_collections.ConfigDict(dict(every=5 * 1250, min_rankme=2.0, min_teacher_entropy=0.05))
  c.log_every = 20
  c.tensorboard = True
  c.checkpoint = ml_collections.ConfigDict(dict(every=2500, keep=2, async_save=True))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  c.mesh_devices = -1
  c.sharding = "dp"  # 'dp' | 'fsdp'
  c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=0, process_id=-1, auto=False))

  if arg.smoke:
    c.model.variant = "mu/16"
    c.model.pos_grid = 4
    c.model.num_registers = 2
    c.model.drop_path = 0.1
    c.model.layerscale_init = None  # LayerScale 1e-5 keeps a 30-step model's CLS constant (RankMe ~1)
    c.head.update(prototypes=256, hidden_dim=128, bottleneck_dim=32)
    c.data.update(synthetic_count=48, synthetic_size=96, batch_size=16, global_size=64, local_size=32,
                  num_local=2)
    c.epochs, c.epoch_length = 6, 5
    c.optim.warmup_epochs = 1
    c.teacher.warmup_temp_epochs = 2
    c.optim.base_lr = 0.004 * 8  # the sqrt rule gives lr 5e-3 at batch 16
    c.monitor.every = 10
    c.monitor.min_rankme = 1.5
    c.log_every = 5
    c.checkpoint.every = 10
    c.tensorboard = False
  c.total_steps = arg.steps
  return c
