"""Fine-tuning a 3D MAE encoder: UNETR segmentation or an MLP classifier on pooled tokens.

Commands:
  python -m m2dino_jax.main --config=configs/mae3d_finetune.py --workdir=runs/unetr \
      --config.init_from=runs/mae3d                       # UNETR on abd_ct phantoms from a MAE run
  python -m m2dino_jax.main --config=configs/mae3d_finetune.py:task=classification,domain=brain_t1 ...
  python -m m2dino_jax.main --config=configs/mae3d_finetune.py:smoke --workdir=/tmp/unetr \
      --config.init_from=/tmp/mae3d                       # ~1 min on 2 CPU cores (pairs with mae3d.py:smoke)

`init_from` is a MAE workdir (final/params + config.json) or a params folder; the encoder settings (model.*)
must be the pretraining's (a clear error names any difference or missing weight); empty = random init.
Defaults: ViT-B/16 encoder on 96^3 crops, UNETR feature size 16 (skips from blocks 3, 6, 9), Dice + CE,
AdamW 1e-4 with the head at 10x, layer decay 0.75; sliding-window eval with 50% overlap.
Expected result: WORKDIR/done.json with per-class Dice and their mean (segmentation) or AUC / accuracy / F1 /
MCC (classification) on held-out volumes, written also per eval to WORKDIR/eval/STEP.json.
"""

import ml_collections

from m2dino_jax.configlib import parse_arg
from m2dino_jax.train import mae
from m2dino_jax.train.optim import default_optim_config


def get_config(arg=None):
  arg = parse_arg(arg, variant="B/16", smoke=False, steps=-1, task="segmentation", domain="abd_ct")
  c = ml_collections.ConfigDict()
  c.trainer = "mae_finetune"
  c.seed = 0
  c.task = arg.task  # 'segmentation' (UNETR) | 'classification' (MLP on pooled tokens)
  c.init_from = ""  # MAE workdir or params folder; '' = random init
  c.dice_weight = 1.0  # segmentation loss = CE + dice_weight * soft Dice
  c.save_params = True  # write WORKDIR/final/params

  # encoder settings: must match the MAE checkpoint (decoder / masking settings are unused here)
  c.model = ml_collections.ConfigDict(dict(
      variant=arg.variant, crop=96, in_chans=1, mask_ratio=0.75, dec_dim=384, dec_depth=4, dec_heads=12,
      dec_mlp_ratio=4, norm_pix_loss=True, remat=False, dtype="float32"))
  # raw_skip=False: UNETR without its conv path on the input voxels (tokens only; the encoder's contribution)
  c.head = ml_collections.ConfigDict(dict(feature_size=16, skips=(), hidden=256, pool="mean", raw_skip=True))

  c.data = ml_collections.ConfigDict(dict(
      source="phantoms",  # 'phantoms' | 'files' (segmentation: files + label_files, sorted into pairs)
      domain=arg.domain, files="", label_files="", num_classes=0, modalities="",
      per_domain=24, heldout=6, train_volumes=0,  # > 0: the first N training volumes (labelled-data budget)
      phantom_size=128, phantom_seed=1,  # seed 1: other volumes than the pretraining's (seed 0)
      target_spacing=(), crop=96, batch_size=4, foreground_bias=0.5, flip=True, intensity_aug=0.1,
      overlap=0.5, weighting="constant", eval_batch=4))

  c.optim = default_optim_config()
  c.optim.update(lr=1e-4, warmup_steps=100, layer_decay=0.75, head_lr_mult=10.0)

  mae.run_settings(c, total_steps=arg.steps if arg.steps > 0 else 2000, eval_at_start=False)

  if arg.smoke:  # the encoder of configs/mae3d.py:smoke
    c.model.update(variant="mu/8", crop=32, dec_dim=32, dec_depth=1, dec_heads=2)
    c.head.update(feature_size=8, hidden=64)
    c.data.update(per_domain=10, heldout=4, phantom_size=40, crop=32, batch_size=4, eval_batch=4)
    c.optim.update(lr=1e-3, warmup_steps=5, layer_decay=1.0, head_lr_mult=1.0)
    c.total_steps = arg.steps if arg.steps > 0 else 40
    c.eval_every = 0
    c.tensorboard = False
    c.checkpoint.update(every=0, async_save=False)
  return c
