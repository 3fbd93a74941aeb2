"""Frozen encoders and their features over a labelled split.

`load_encoder` builds the encoder a checkpoint describes (our teacher export or encoder folder, a HF folder, a
DINOv2 / UltraDINO `.pth`) and loads its weights, or, with `random_init`, the same architecture with random
weights (the baseline the paper's "from scratch" row stands for); `random:VARIANT` is a random DINOv3 encoder
of a named size. `extract` runs it over one split of a task with the data pipeline's eval transforms
(letterbox + UltraDINO normalisation) and returns CLS, mean patch token and, for dense heads, the feature maps
of `out_blocks`, in source order with the labels, canvas masks and the untouched records.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2dino_jax.data import pipeline
from m2dino_jax.models import convert, vit
from m2dino_jax.tasks import registry

PAPER_BLOCKS = (3, 5, 7, 11)  # UltraDINO's UperNet inputs (ViT-S/B, depth 12)


def default_blocks(depth: int) -> tuple[int, ...]:
  """Blocks [3, 5, 7, 11] at depth 12 (the paper), else four evenly spaced blocks ending at the last."""
  if depth == 12:
    return PAPER_BLOCKS
  return tuple(sorted({int(round(b)) for b in np.linspace(-1, depth - 1, 5)[1:]} - {-1}))


def encoder_config(spec: str, *, in_chans: int = 1, out_blocks=None) -> vit.ViTConfig:
  """The architecture of `spec` (checkpoint path or 'random:VARIANT') for frozen evaluation (no drop-path)."""
  if spec.startswith("random:"):
    cfg = vit.ViTConfig.from_config({"variant": spec.split(":", 1)[1]})
  else:
    cfg = convert.checkpoint_config(spec)
  blocks = tuple(out_blocks) if out_blocks else default_blocks(cfg.depth)
  return dataclasses.replace(cfg, in_chans=in_chans, out_blocks=blocks, drop_path=0.0, dtype="float32")


def load_encoder(spec: str, *, in_chans: int = 1, out_blocks=None, random_init: bool = False,
                 seed: int = 0) -> vit.Encoder:
  """The frozen encoder of `spec` with its weights (grey from RGB allowed), or random weights."""
  cfg = encoder_config(spec, in_chans=in_chans, out_blocks=out_blocks)
  model = vit.Encoder(cfg, rngs=nnx.Rngs(seed))
  if not random_init and not spec.startswith("random:"):
    convert.init_encoder_from(model, spec)
  return model


@dataclasses.dataclass
class Features:
  """One split's frozen features, in source order (padding removed)."""
  cls: np.ndarray  # [N, D]
  avg: np.ndarray  # [N, D] mean patch token
  maps: tuple[np.ndarray, ...]  # out_blocks feature maps [N, h, w, D] (empty unless asked for)
  labels: np.ndarray  # [N] class ids (-1 for non-classification tasks)
  masks: np.ndarray | None  # [N, S, S] canvas masks (segmentation), else None
  records: list  # the source records (original masks and sizes)

  @property
  def pooled(self) -> np.ndarray:
    """[CLS || mean patch token], what the classification head and the probes see."""
    return np.concatenate([self.cls, self.avg], axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(gdef, maps: bool, state, images):
  out = nnx.merge(gdef, state)(images)
  res = {"cls": out["cls"], "avg": out["patch_tokens"].mean(axis=1)}
  if maps:
    res["maps"] = out["features"]
  return res


def forward_fn(encoder: vit.Encoder, maps: bool):
  """A jitted images [B, S, S, C] -> {cls, avg, maps} of the frozen encoder. One compiled program per
  architecture (the graph definition is the static argument): encoders of the same architecture (a teacher
  and its random-init baselines) and every split share it."""
  gdef, state = nnx.split(encoder)
  return lambda images: _forward(gdef, maps, state, jnp.asarray(images))


def extract(encoder: vit.Encoder, data_cfg, task: registry.Task | str, split: str, *, maps: bool = False,
            sources=None) -> Features:
  """Features of every example of `split` (data_cfg: the pipeline's data section, eval transforms)."""
  task = registry.get(task) if isinstance(task, str) else task
  source = sources[task.name] if sources is not None else pipeline.load_sources(data_cfg, [task], split)[task.name]
  fwd = forward_fn(encoder, maps)
  parts: dict[str, list] = {"cls": [], "avg": [], "label": [], "mask": [], "maps": []}
  for batch in pipeline.make_eval_batches(data_cfg, task, split, sources={task.name: source}):
    keep = np.asarray(batch["valid"], bool)
    out = jax.device_get(fwd(batch["image"]))
    parts["cls"].append(out["cls"][keep])
    parts["avg"].append(out["avg"][keep])
    parts["label"].append(np.asarray(batch["label"])[keep])
    parts["mask"].append(np.asarray(batch["mask"])[keep])
    if maps:
      parts["maps"].append(tuple(m[keep] for m in out["maps"]))
  n_maps = len(parts["maps"][0]) if parts["maps"] else 0
  return Features(
      cls=np.concatenate(parts["cls"]), avg=np.concatenate(parts["avg"]),
      maps=tuple(np.concatenate([p[i] for p in parts["maps"]]) for i in range(n_maps)),
      labels=np.concatenate(parts["label"]).astype(np.int64),
      masks=np.concatenate(parts["mask"]) if task.type == registry.SEGMENTATION else None,
      records=[pipeline.as_record(source[i]) for i in range(len(source))])
