"""Few-shot segmentation on a frozen encoder: a light UperNet head (or a linear one), N training images, several
random splits.

Protocol (UltraDINO's, adapted to a frozen encoder): a fixed test split; for each of `splits` random draws of
`shots` training images (seeded, without replacement), the multi-task trainer's UperNet-lite head
(models/heads.SegHead over the encoder's `out_blocks`, [3, 5, 7, 11] at depth 12) is trained from scratch on the
frozen features with CE + soft Dice (1 : 1, tasks/losses.segmentation_loss) by AdamW with cosine decay; the
whole run of one split is one compiled program (features of the shots stay on the device, batches drawn in it).
The paper fine-tunes the whole encoder with mmseg's UperNet (20k iterations, augmentation); here the encoder is
frozen and no augmentation is used, which makes the number a property of the features.

Heads (`head=`):
  upernet    (default) the UperNet-lite above, lr 1e-3. Its convolutions over four blocks, the first of them
             close to the pixels, can segment intensity-defined structures (the simulator's) from a random
             projection of the pixels too: on a smoke teacher it ties with random-init encoders.
  linear     DINOv2's linear protocol (its Table "linear"): the LAST block's patch tokens, standardised per
             channel with the shots' statistics (BNHead's BatchNorm), a linear layer (1x1 conv) to class logits on
             the patch grid, bilinear upsampling to the image; lr 1e-1 (HEAD_LR). Only the features decide.
  linear+ms  the same on the concatenation of the last len(out_blocks) maps (DINOv2's "+ms" boosted variant uses
             the last four blocks: the default out_blocks at depth 4; its multi-scale test-time augmentation is
             not done here).
All heads share the loss (CE + soft Dice) and the optimiser; only the head and its learning rate differ.

Scores, on the test split in ORIGINAL pixels (canvas predictions mapped back as in the multi-task evaluation):
  dice_pooled[c]  the paper's convention (its released code): 2 sum_i |P_i & T_i| / (sum_i |P_i| + sum_i |T_i|)
                  per class c, pooled over the whole test set;
  mDice           mean of dice_pooled over all classes, background included; mfDice over the foreground;
  dice            ours (tasks/metrics): per image and foreground class (both empty = 1), mean over images,
                  then over classes.
Reported per split and as mean and sample standard deviation over the splits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from m2dino_jax.data import pipeline, transforms
from m2dino_jax.evals import frozen
from m2dino_jax.models.heads import default_heads_config
from m2dino_jax.tasks import metrics, registry, types


def pooled_dice(preds, targets, num_classes: int) -> dict:
  """The paper's Dice: per class, intersections and sizes summed over all images first. Returns dice_pooled
  (list, NaN for a class absent from both), mDice (all classes) and mfDice (foreground)."""
  inter, sizes = np.zeros(num_classes), np.zeros(num_classes)
  for p, t in zip(preds, targets):
    p, t = np.asarray(p).ravel(), np.asarray(t).ravel()
    inter += np.bincount(t[p == t], minlength=num_classes)[:num_classes]
    sizes += np.bincount(p, minlength=num_classes)[:num_classes] + np.bincount(t, minlength=num_classes)[:num_classes]
  with np.errstate(invalid="ignore", divide="ignore"):
    d = np.where(sizes > 0, 2 * inter / sizes, np.nan)
  return {"dice_pooled": d.tolist(), "mDice": float(np.nanmean(d)), "mfDice": float(np.nanmean(d[1:]))}


def per_image_dice(preds, targets, num_classes: int) -> float:
  """Our convention: per image and foreground class (both empty = 1), mean over images, then over classes."""
  per_class = [np.mean([metrics.dice(p == c, t == c) for p, t in zip(preds, targets)])
               for c in range(1, num_classes)]
  return float(np.mean(per_class))


HEADS = ("upernet", "linear", "linear+ms")
# default learning rate per head (AdamW, cosine): the linear head on standardised tokens is a (nearly) convex
# problem that lr 1e-3 leaves far from its optimum in a few hundred steps (smoke teacher, 200 steps: mDice 0.39
# at 1e-3, 0.54 at 1e-2, 0.60 at 1e-1 = 0.59 at 1e-2 x 1000 steps, i.e. converged)
HEAD_LR = {"upernet": 1e-3, "linear": 1e-1, "linear+ms": 1e-1}


class LinearSegHead(nnx.Module):
  """DINOv2's linear segmentation head (mmseg BNHead, `linear` / `+ms` rows): the patch tokens of the last
  `num_inputs` feature maps, concatenated along channels, a linear layer (a 1x1 convolution) to class logits on
  the patch grid, bilinear upsampling (half-pixel centres, align_corners=False) to the image. BNHead's BatchNorm
  is the standardisation of the inputs with the training shots' per-channel statistics (`standardiser`)."""

  def __init__(self, dim: int, num_classes: int, num_inputs: int, *, rngs):
    self.num_inputs = num_inputs
    self.classify = nnx.Linear(dim * num_inputs, num_classes, rngs=rngs)

  def __call__(self, enc_out: dict, image_hw: tuple[int, int]) -> jax.Array:
    x = jnp.concatenate(enc_out["features"][-self.num_inputs:], axis=-1)
    logits = self.classify(x)
    return jax.image.resize(logits, (x.shape[0], *image_hw, logits.shape[-1]), "bilinear")


def standardiser(maps):
  """Per-channel (mean, std) of each feature map over the training shots' patches (BNHead's BatchNorm
  statistics): (maps - mean) / std is what the linear head sees, for the shots and the test images alike."""
  return tuple((m.mean(axis=(0, 1, 2)), m.std(axis=(0, 1, 2)) + 1e-6) for m in maps)


def _head(kind, task, dim, patch, num_features, channels, seed):
  if kind == "upernet":
    cfg = default_heads_config()
    cfg.seg_channels = int(channels)
    return types.build_head(task, dim, patch, num_features, cfg, rngs=nnx.Rngs(seed))
  return LinearSegHead(dim, task.num_classes, num_features if kind == "linear+ms" else 1, rngs=nnx.Rngs(seed))


@functools.lru_cache(maxsize=16)
def make_trainer(task: registry.Task, grid, image_hw, head_gdef, *, steps: int, batch_size: int, lr: float,
                 weight_decay: float):
  """A jitted (head params, shot maps, shot masks, key) -> trained head params: the whole run in one program.
  Cached: encoders of one architecture (the teacher, its random-init baselines) share the compiled program."""
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)

  def loss_fn(params, maps, masks):
    logits = nnx.merge(head_gdef, params)({"features": maps, "grid": grid}, image_hw)
    batch = {"mask": masks, "valid": jnp.ones(masks.shape[0], bool)}
    return types.task_loss(task, logits, batch)[0]

  @jax.jit
  def train(params, maps, masks, key):
    n = masks.shape[0]

    def body(i, carry):
      params, opt = carry
      idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, n)
      grads = jax.grad(loss_fn)(params, tuple(m[idx] for m in maps), masks[idx])
      updates, opt = tx.update(grads, opt, params)
      return optax.apply_updates(params, updates), opt

    params, _ = jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))
    return params

  return train


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _predict(head_gdef, params, grid, image_hw, maps):
  return jnp.argmax(nnx.merge(head_gdef, params)({"features": maps, "grid": grid}, image_hw), axis=-1)


def evaluate(encoder, data_cfg, task: registry.Task | str, *, train_split: str = "train", test_split: str = "test",
             shots: int = 20, splits: int = 5, steps: int = 500, batch_size: int = 8, lr: float | None = None,
             weight_decay: float = 1e-2, seg_channels: int = 128, seed: int = 0, test: frozen.Features | None = None,
             predict_batch: int = 32, head: str = "upernet") -> dict:
  """Few-shot segmentation of `task` on the frozen `encoder`: {"splits": [...], "mDice", "mfDice", "dice" (mean),
  "*_std", "shots", ...}. `head`: one of HEADS (module docstring); `lr` None: HEAD_LR[head]. `test` reuses
  features already extracted (with maps)."""
  task = registry.get(task) if isinstance(task, str) else task
  if head not in HEADS:
    raise ValueError(f"unknown few-shot head '{head}'; known: {', '.join(HEADS)}")
  lr = HEAD_LR[head] if lr is None else float(lr)
  if task.type != registry.SEGMENTATION:
    raise ValueError(f"few-shot segmentation needs a segmentation task, got {task.name} ({task.type})")
  pool = pipeline.load_sources(data_cfg, [task], train_split)[task.name]
  if shots > len(pool):
    raise ValueError(f"{shots} shots but the '{train_split}' split of {task.name} has {len(pool)} images")
  draws = [np.random.default_rng([seed, s]).choice(len(pool), shots, replace=False) for s in range(splits)]
  test = test or frozen.extract(encoder, data_cfg, task, test_split, maps=True)
  size = int(data_cfg.image_size)
  mode = "resize" if str(data_cfg.transforms.eval[0]).strip().startswith("resize") else "letterbox"
  cfg = encoder.cfg
  grid = tuple(test.maps[0].shape[1:3])
  head_gdef, _ = nnx.split(_head(head, task, cfg.dim, cfg.patch, len(test.maps), seg_channels, seed), nnx.Param)
  train = make_trainer(task, grid, (size, size), head_gdef, steps=steps, batch_size=batch_size, lr=lr,
                       weight_decay=weight_decay)
  targets = [np.asarray(r.mask) for r in test.records]
  rows = []
  for s, idx in enumerate(draws):
    shot = frozen.extract(encoder, data_cfg, task, train_split, maps=True,
                          sources={task.name: [pool[int(i)] for i in idx]})
    _, params = nnx.split(_head(head, task, cfg.dim, cfg.patch, len(test.maps), seg_channels, seed + 1000 * s),
                          nnx.Param)
    shot_maps, test_maps = shot.maps, test.maps
    if head != "upernet":
      stats = standardiser(shot_maps)
      shot_maps, test_maps = (tuple((m - mu) / sd for m, (mu, sd) in zip(ms, stats)) for ms in (shot_maps, test_maps))
    params = train(params, tuple(jnp.asarray(m) for m in shot_maps), jnp.asarray(shot.masks.astype(np.int32)),
                   jax.random.key(seed + s))
    preds = []
    n = len(targets)
    for start in range(0, n, predict_batch):
      chunk = [m[start:start + predict_batch] for m in test_maps]
      pad = predict_batch - len(chunk[0])
      chunk = [np.concatenate([m, np.zeros((pad,) + m.shape[1:], m.dtype)]) if pad else m for m in chunk]
      out = np.asarray(_predict(head_gdef, params, grid, (size, size), tuple(chunk)))
      preds += [transforms.mask_to_original(p, t.shape[:2], mode) for p, t in
                zip(out[:predict_batch - pad], targets[start:start + predict_batch])]
    row = pooled_dice(preds, targets, task.num_classes)
    row["dice"] = per_image_dice(preds, targets, task.num_classes)
    row["train_images"] = [int(i) for i in idx]
    rows.append(row)
  out = {"task": task.name, "head": head, "lr": lr, "shots": shots, "splits": rows, "test_images": len(targets),
         "steps": steps}
  for key in ("mDice", "mfDice", "dice"):
    vals = np.array([r[key] for r in rows])
    out[key], out[key + "_std"] = float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
  return out
