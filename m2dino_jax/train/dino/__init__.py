"""UltraDINO: DINOv2 self-distillation pretraining (DINO + iBOT + KoLeo, multi-crop, EMA teacher).

  losses     the loss terms, centring (EMA / Sinkhorn-Knopp) and collapse monitors
  schedules  DINOv2's lr / weight-decay / momentum / teacher-temperature schedules
  data       the multi-crop + block-mask Grain stream over unlabelled sources
  step       the pure train step on the shared TrainState
  trainer    state, monitors, checkpoints and the teacher export (`train_and_evaluate`)
  (DINOv2-format `.pth` import / export: models/dinov2_pth.py)
"""

from m2dino_jax.train.dino.trainer import train_and_evaluate

__all__ = ["train_and_evaluate"]
