"""DINOv2 schedules, as functions of the global step (jit-friendly, exact at chosen steps).

  cosine(base, final, total, warmup, start_warmup)  DINOv2's CosineScheduler: linear start_warmup -> base over
                      `warmup` steps, then final + (base - final) * (1 + cos(pi * i / (total - warmup))) / 2
  linear_warmup_then_constant(start, end, warmup)   the teacher temperature: start -> end over `warmup`, then end
  learning rate       cosine(lr, min_lr, total, warmup)            lr = base_lr * sqrt(batch / 1024)
  weight decay        cosine(0.04, 0.4, total)                      (increases)
  teacher momentum    cosine(0.992, 1.0, total)                     m = 1 - (1 - m0) * (1 + cos(pi t / T)) / 2
  last layer          lr * (step >= freeze_steps)                   frozen for the first epoch
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def cosine(base: float, final: float, total: int, warmup: int = 0, start_warmup: float = 0.0):
  total, warmup = int(total), int(warmup)

  def f(step):
    step = jnp.asarray(step, jnp.float32)
    span = max(total - warmup, 1)
    i = jnp.clip(step - warmup, 0, span)
    cos = final + 0.5 * (base - final) * (1 + jnp.cos(math.pi * i / span))
    if warmup <= 0:
      return cos
    warm = start_warmup + (base - start_warmup) * step / warmup
    return jnp.where(step < warmup, warm, cos)
  return f


def linear_warmup_then_constant(start: float, end: float, warmup: int):
  def f(step):
    step = jnp.asarray(step, jnp.float32)
    if warmup <= 0:
      return jnp.full((), end, jnp.float32)
    return jnp.where(step < warmup, start + (end - start) * step / warmup, end)
  return f


def scaled_lr(base_lr: float, batch_size: int) -> float:
  """DINOv2's square-root scaling rule: lr = base_lr * sqrt(batch / 1024)."""
  return float(base_lr) * math.sqrt(batch_size / 1024.0)
