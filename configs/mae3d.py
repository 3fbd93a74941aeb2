"""3D MAE pretraining over CT / MRI / PET domains (scaling-law producer).

Commands:
  python -m m2dino_jax.main --config=configs/mae3d.py --workdir=runs/mae3d
  python -m m2dino_jax.main --config=configs/mae3d.py:smoke --workdir=/tmp/mae3d   # ~30 s on 2 CPU cores
  m2dino scaling fit --measurements runs/mae3d/measurements.jsonl ...

Defaults: ViT-B encoder, 16^3 patches on 96^3 crops, mask ratio 0.75, 4-block 384-wide decoder,
per-patch normalised targets, AdamW 1.5e-4 with cosine decay, six embedded phantom domains (or files:
--config.data.source=files --config.data.files='abd_ct=/data/amos/ct/*.nii.gz,...'; or both, e.g. the phantoms
plus the real MNI152 T1 template of the nilearn wheel: --config.data.source=phantoms+files
--config.data.files=brain_t1=mni152).
Each eval writes WORKDIR/eval/STEP.json and appends a row (per-domain held-out loss) to
WORKDIR/measurements.jsonl (or --config.measurements=PATH shared by a sweep).
Expected result (smoke): the held-out loss of every domain drops below its step-0 value.
"""

import ml_collections

from m2dino_jax.configlib import parse_arg
from m2dino_jax.train import mae
from m2dino_jax.train.optim import default_optim_config


def get_config(arg=None):
  arg = parse_arg(arg, variant="B/16", smoke=False, steps=-1, domains="abd_ct,abd_mri,brain_t1,brain_t2,head_ct,hn_pet")
  c = ml_collections.ConfigDict()
  c.trainer = "mae"
  c.seed = 0
  # JAX persistent compilation cache: '' = auto ($M2DINO_COMPILE_CACHE, else ~/.cache/m2dino_jax/xla/HOST),
  # 'off', or a folder (train/compile_cache.py)
  c.compile_cache = ""
  c.run_id = ""  # default: the workdir's name
  c.measurements = ""  # default: WORKDIR/measurements.jsonl

  c.model = ml_collections.ConfigDict(dict(
      variant=arg.variant, crop=96, in_chans=1, mask_ratio=0.75, dec_dim=384, dec_depth=4, dec_heads=12,
      dec_mlp_ratio=4, norm_pix_loss=True, remat=False, dtype="float32"))

  c.data = ml_collections.ConfigDict(dict(
      source="phantoms",  # 'phantoms' | 'files' | 'phantoms+files' (a domain's files, then its phantoms)
      # 'domain=GLOB,domain=GLOB' (NIfTI / MHA / NRRD) for sources with files; a shipped volume's name in place
      # of a GLOB: 'mni152' = the MNI152 T1 template inside the nilearn wheel (data/volumes.py SHIPPED)
      files="",
      domains=arg.domains,
      modalities="",  # extra 'domain=ct|mri|pet' for user-defined domains
      budget="",  # 'domain=N,...': train on the first N volumes of a domain (default: all)
      per_domain=24, heldout=4, phantom_size=128, phantom_seed=0,
      phantom_counts="",  # 'domain=N,...': phantoms of a domain (default per_domain), so availability differs
      target_spacing=(), crop=96, batch_size=16, eval_crops=2,
      mixture="uniform",  # 'uniform' | 'size' | 'temperature' | 'json' (weights_file, e.g. allocation.json)
      temperature=1.0, weights_file="",
      foreground_bias=0.5, flip=True, intensity_aug=0.1))

  c.optim = default_optim_config()
  c.optim.lr = 1.5e-4
  c.optim.min_lr = 1e-6
  c.optim.warmup_steps = 200
  c.optim.weight_decay = 0.05
  c.optim.b2 = 0.95

  mae.run_settings(c, total_steps=arg.steps if arg.steps > 0 else 5000, eval_at_start=True)

  if arg.smoke:
    c.model.update(variant="mu/8", crop=32, dec_dim=32, dec_depth=1, dec_heads=2)
    c.data.update(per_domain=6, heldout=2, phantom_size=40, crop=32, batch_size=8, eval_crops=2)
    c.optim.update(lr=2e-3, warmup_steps=5, clip_norm=1.0)
    c.total_steps = arg.steps if arg.steps > 0 else 60
    c.eval_every = 0
    c.tensorboard = False
    c.checkpoint.update(every=0, async_save=False)
  return c
