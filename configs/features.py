"""Encoder feature extraction on real ultrasound DICOM frames (or a folder of images).

Command:
  python -m m2dino_jax.main --config=configs/features.py:variant=S/16 --workdir=/tmp/feat
Smoke (CPU, ~20 s): --config=configs/features.py:smoke
Expected result: WORKDIR/features.npz with CLS [N, D] and patch tokens, and a printed table of
feature shapes and images/s. With `init_from` set, the encoder starts from those weights.
"""

import ml_collections

from m2dino_jax.configlib import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, variant="S/16", size=224, smoke=False)
  c = ml_collections.ConfigDict()
  c.trainer = "features"
  c.seed = 0
  # JAX persistent compilation cache: '' = auto ($M2DINO_COMPILE_CACHE, else ~/.cache/m2dino_jax/xla/HOST),
  # 'off', or a folder (train/compile_cache.py)
  c.compile_cache = ""
  c.model = ml_collections.ConfigDict(dict(variant=arg.variant, kind="dinov3", in_chans=1, num_registers=4,
                                           out_blocks=(3, 5, 7, 11)))
  c.init_from = ""  # HF folder / our encoder checkpoint; empty = random init
  c.init_from_adopt = False  # True: build the encoder with the checkpoint's architecture (else it must match)
  c.input = ""  # folder of PNG/JPG/DICOM; empty = pydicom's bundled ultrasound files
  c.image_size = arg.size
  c.batch_size = 4
  if arg.smoke:
    c.model.variant = "mu/16"
    c.model.out_blocks = (1, 3)
    c.image_size = 64
  return c
