"""Fine-tuning models on the 3D MAE encoder: UNETR segmentation and an MLP classifier on pooled tokens, and
sliding-window inference over whole volumes.

UNETR (Hatamizadeh et al. 2022; MONAI's layout): the encoder (`mae3d.Encoder3D`, the MAE's weights) sees all
p^3 patches of a crop. With p = 2^k the decoder has k + 1 resolution levels, level l at 1 / 2^l of the input
(level k = the token grid):
  level 0      a residual conv block on the input voxels (fs channels); `raw_skip=False` drops it (the level-0
               block then refines the upsampled features alone), so every voxel's logit is a function of the
               encoder's tokens only: the diagnostic of what the encoder contributes (with the raw-voxel path a
               conv net on the voxels can learn intensity-defined classes whatever the encoder holds)
  level l      the output of encoder block skips[l - 1] (1 <= l < k), brought up from the token grid by
               k - l transposed convolutions (fs * 2^l channels)
  bottleneck   the final normed tokens on the token grid
and from the bottleneck up: transposed conv x2, concatenate that level's skip, residual conv block; a 1x1x1
conv gives the class logits. For p = 16 and 12 blocks the skips are blocks 3, 6, 9 (1-based), as in the paper.
Convolutions use instance normalisation and leaky ReLU (MONAI's defaults).

MLP classifier: LayerNorm -> Linear -> GELU -> Linear on the pooled normed tokens ('mean' of the patch
tokens, 'cls', or 'cls_mean' = both concatenated).

`FineTune3D` = encoder + one head; its parameters are {'encoder': the MAE encoder's names, 'head': ...}, so a
MAE checkpoint's encoder (mae3d.ENCODER_KEYS) maps onto params['encoder'] name for name.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2dino_jax.errors import ConfigError
from m2dino_jax.models import mae3d, vit

TASKS = ("segmentation", "classification")
POOLS = ("mean", "cls", "cls_mean")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """The fine-tuning head. `skips` (0-based encoder block indices) default to evenly spaced blocks."""
  task: str = "segmentation"
  num_classes: int = 2
  feature_size: int = 16  # UNETR: channels at full resolution (level l has feature_size * 2^l)
  skips: tuple[int, ...] = ()
  hidden: int = 256  # classifier hidden width
  pool: str = "mean"
  raw_skip: bool = True  # UNETR: the full-resolution conv path on the input voxels (False: tokens only)

  @classmethod
  def from_config(cls, cfg, task: str, num_classes: int) -> HeadConfig:
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    for k in cfg:
      if k not in fields:
        raise ConfigError(f"head.{k}", "unknown head setting")
    cfg.update(task=task, num_classes=num_classes, skips=tuple(cfg.get("skips") or ()))
    c = cls(**cfg)
    if c.task not in TASKS:
      raise ConfigError("task", f"'{c.task}' is not one of {TASKS}")
    if c.pool not in POOLS:
      raise ConfigError("head.pool", f"'{c.pool}' is not one of {POOLS}")
    if c.num_classes < 2:
      raise ConfigError("head.num_classes", f"need at least 2 classes, got {c.num_classes}")
    return c


def levels(patch: int) -> int:
  """k with patch = 2^k (the number of x2 upsamplings from the token grid to the voxels)."""
  k = int(round(math.log2(patch))) if patch > 0 else 0
  if k < 1 or 2 ** k != patch:
    raise ConfigError("model.patch", f"UNETR needs a power-of-two patch >= 2, got {patch}")
  return k


def default_skips(depth: int, patch: int) -> tuple[int, ...]:
  """Evenly spaced block indices for the k - 1 skip levels (12 blocks, p 16: (2, 5, 8) = blocks 3, 6, 9)."""
  k = levels(patch)
  return tuple(max(0, round(depth * (t + 1) / k) - 1) for t in range(k - 1))


def resolve_skips(head: HeadConfig, enc: mae3d.MAE3DConfig) -> tuple[int, ...]:
  k = levels(enc.patch)
  skips = head.skips or default_skips(enc.depth, enc.patch)
  if len(skips) != k - 1 or any(not 0 <= s < enc.depth for s in skips):
    raise ConfigError("head.skips", f"need {k - 1} block indices in 0..{enc.depth - 1} for patch {enc.patch}, "
                      f"got {tuple(skips)}")
  return tuple(skips)


# ---------------------------------------------------------------------------------------------- layers

def _kernel_names(embed_in: bool) -> tuple:
  # conv kernels (k, k, k, in, out); the input channels of a layer reading tokens follow the encoder's 'embed'
  return (None, None, None, "embed" if embed_in else None, None)


def _conv(cin, cout, k, rngs, embed_in=False):
  init = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
  return nnx.Conv(cin, cout, (k, k, k), padding="SAME", rngs=rngs,
                  kernel_init=nnx.with_partitioning(init, _kernel_names(embed_in)),
                  bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)))


def _deconv(cin, cout, rngs, embed_in=False):
  init = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
  return nnx.ConvTranspose(cin, cout, (2, 2, 2), strides=(2, 2, 2), padding="VALID", rngs=rngs,
                           kernel_init=nnx.with_partitioning(init, _kernel_names(embed_in)),
                           bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)))


def _instance_norm(c, rngs):
  return nnx.GroupNorm(c, num_groups=c, epsilon=1e-5, rngs=rngs,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)))


def _act(x):
  return jax.nn.leaky_relu(x, 0.01)


class ResBlock(nnx.Module):
  """conv3 - IN - lrelu - conv3 - IN (+ 1x1 conv - IN shortcut when the width changes) - lrelu."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
    self.conv1, self.norm1 = _conv(cin, cout, 3, rngs), _instance_norm(cout, rngs)
    self.conv2, self.norm2 = _conv(cout, cout, 3, rngs), _instance_norm(cout, rngs)
    self.proj = _conv(cin, cout, 1, rngs) if cin != cout else None
    self.proj_norm = _instance_norm(cout, rngs) if cin != cout else None

  def __call__(self, x):
    h = self.norm2(self.conv2(_act(self.norm1(self.conv1(x)))))
    short = self.proj_norm(self.proj(x)) if self.proj is not None else x
    return mae3d.constrain(_act(h + short))


class SkipPath(nnx.Module):
  """Tokens on the grid -> level l: a transposed conv, then (transposed conv, res block) n_up - 1 times."""

  def __init__(self, dim: int, cout: int, n_up: int, *, rngs: nnx.Rngs):
    self.first = _deconv(dim, cout, rngs, embed_in=True)
    self.ups = nnx.List([_deconv(cout, cout, rngs) for _ in range(n_up - 1)])
    self.blocks = nnx.List([ResBlock(cout, cout, rngs=rngs) for _ in range(n_up - 1)])

  def __call__(self, x):
    x = self.first(x)
    for up, block in zip(self.ups, self.blocks):
      x = block(up(x))
    return x


class UpBlock(nnx.Module):
  """x2 transposed conv, concatenate the skip (if any), res block."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, embed_in: bool = False, skip: bool = True):
    self.up = _deconv(cin, cout, rngs, embed_in=embed_in)
    self.block = ResBlock(2 * cout if skip else cout, cout, rngs=rngs)

  def __call__(self, x, skip=None):
    x = self.up(x)
    return self.block(x if skip is None else jnp.concatenate([x, skip], axis=-1))


class UNETRDecoder(nnx.Module):
  """The UNETR decoder over (input voxels, tapped block outputs, final tokens)."""

  def __init__(self, enc: mae3d.MAE3DConfig, head: HeadConfig, *, rngs: nnx.Rngs):
    k, fs = levels(enc.patch), head.feature_size
    self.k, self.skips = k, resolve_skips(head, enc)
    ch = [fs] + [fs * 2 ** level for level in range(1, k)]
    self.stem = ResBlock(enc.in_chans, fs, rngs=rngs) if head.raw_skip else None
    self.skip_paths = nnx.List([SkipPath(enc.dim, ch[level], k - level, rngs=rngs) for level in range(1, k)])
    self.ups = nnx.List([UpBlock(enc.dim if level == k - 1 else ch[level + 1], ch[level], rngs=rngs,
                                 embed_in=level == k - 1, skip=level > 0 or head.raw_skip)
                         for level in range(k - 1, -1, -1)])
    self.out = _conv(fs, head.num_classes, 1, rngs)

  def __call__(self, vol, tokens, tapped, grid):
    b = vol.shape[0]
    to_grid = lambda t: t[:, 1:].reshape(b, *grid, t.shape[-1])  # drop CLS; patches are row-major (d, h, w)
    raw = self.stem(vol.astype(tokens.dtype)) if self.stem is not None else None
    skips = [raw] + [p(to_grid(t)) for p, t in zip(self.skip_paths, tapped)]
    x = to_grid(tokens)
    for up, level in zip(self.ups, range(self.k - 1, -1, -1)):
      x = up(x, skips[level])
    return self.out(x)


class MLPHead(nnx.Module):
  """LayerNorm -> Linear -> GELU -> Linear on pooled tokens."""

  def __init__(self, dim: int, head: HeadConfig, *, rngs: nnx.Rngs):
    self.pool = head.pool
    din = 2 * dim if head.pool == "cls_mean" else dim
    self.norm = vit._norm(din, 1e-6, rngs)
    self.fc1 = mae3d._dense(din, head.hidden, ("embed", "mlp"), rngs)
    self.fc2 = mae3d._dense(head.hidden, head.num_classes, ("mlp", None), rngs)

  def __call__(self, tokens):
    if self.pool == "cls":
      x = tokens[:, 0]
    elif self.pool == "mean":
      x = tokens[:, 1:].mean(axis=1)
    else:
      x = jnp.concatenate([tokens[:, 0], tokens[:, 1:].mean(axis=1)], axis=-1)
    return self.fc2(jax.nn.gelu(self.fc1(self.norm(x)), approximate=False))


class FineTune3D(nnx.Module):
  """MAE encoder + a UNETR decoder (logits [B, D, H, W, K]) or an MLP classifier (logits [B, K])."""

  def __init__(self, enc: mae3d.MAE3DConfig, head: HeadConfig, *, rngs: nnx.Rngs):
    self.enc_cfg, self.head_cfg = enc, head
    self.encoder = mae3d.Encoder3D(enc, rngs=rngs)
    if head.task == "segmentation":
      self.skips = resolve_skips(head, enc)
      self.head = UNETRDecoder(enc, head, rngs=rngs)
    else:
      self.skips = ()
      self.head = MLPHead(enc.dim, head, rngs=rngs)

  def __call__(self, vol):
    tokens, tapped = self.encoder(vol, self.skips)
    if self.head_cfg.task == "classification":
      return self.head(tokens)
    p = self.enc_cfg.patch
    return self.head(vol, tokens, tapped, (vol.shape[1] // p, vol.shape[2] // p, vol.shape[3] // p))


# ---------------------------------------------------------------------------------- sliding windows

def window_starts(size: int, crop: int, overlap: float) -> list[int]:
  """Window origins along one axis covering [0, size): stride crop * (1 - overlap), the last flush with the end."""
  if not 0.0 <= overlap < 1.0:
    raise ConfigError("data.overlap", f"must be in [0, 1), got {overlap}")
  if size <= crop:
    return [0]
  stride = max(1, int(round(crop * (1.0 - overlap))))
  starts = list(range(0, size - crop + 1, stride))
  if starts[-1] != size - crop:
    starts.append(size - crop)
  return starts


def _gaussian(crop: int, sigma_scale: float = 0.125) -> np.ndarray:
  c = np.arange(crop) - (crop - 1) / 2.0
  g = np.exp(-0.5 * (c / (sigma_scale * crop)) ** 2)
  w = g[:, None, None] * g[None, :, None] * g[None, None, :]
  return (w / w.max()).astype(np.float32)


def sliding_window(predict, volume: np.ndarray, crop: int, *, overlap: float = 0.5, batch: int = 4,
                   weighting: str = "constant") -> np.ndarray:
  """Whole-volume prediction [X, Y, Z, K] of a volume [X, Y, Z(, C)] by a window predictor
  `predict(windows [n, c, c, c, C]) -> [n, c, c, c, K]` (n = `batch`, the last batch padded): windows every
  crop * (1 - overlap) voxels, their outputs averaged where they overlap ('constant') or weighted by a centred
  Gaussian ('gaussian', nnU-Net). A volume smaller than the crop is zero-padded at the end and the padding cut
  off."""
  if weighting not in ("constant", "gaussian"):
    raise ConfigError("data.weighting", f"'{weighting}' is not 'constant' or 'gaussian'")
  vol = np.asarray(volume, np.float32)
  vol = vol[..., None] if vol.ndim == 3 else vol
  shape = vol.shape[:3]
  pad = [(0, max(0, crop - s)) for s in shape] + [(0, 0)]
  vol = np.pad(vol, pad)
  starts = [window_starts(s, crop, overlap) for s in vol.shape[:3]]
  origins = [(x, y, z) for x in starts[0] for y in starts[1] for z in starts[2]]
  w = _gaussian(crop) if weighting == "gaussian" else np.ones((crop,) * 3, np.float32)
  acc, norm = None, np.zeros(vol.shape[:3], np.float32)
  for i in range(0, len(origins), batch):
    chunk = origins[i:i + batch]
    wins = np.stack([vol[x:x + crop, y:y + crop, z:z + crop] for x, y, z in chunk])
    if len(chunk) < batch:
      wins = np.concatenate([wins, np.zeros((batch - len(chunk),) + wins.shape[1:], wins.dtype)])
    out = np.asarray(predict(wins))[:len(chunk)]
    if acc is None:
      acc = np.zeros(vol.shape[:3] + out.shape[-1:], np.float32)
    for (x, y, z), o in zip(chunk, out):
      acc[x:x + crop, y:y + crop, z:z + crop] += o * w[..., None]
      norm[x:x + crop, y:y + crop, z:z + crop] += w
  out = acc / norm[..., None]
  return out[:shape[0], :shape[1], :shape[2]]
