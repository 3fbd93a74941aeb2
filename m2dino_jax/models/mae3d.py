"""3D masked autoencoder (MAE) over CT / MRI / PET volumes, in Flax NNX.

Volumes [B, D, H, W, C] are cut into p^3 patches (row-major over the patch grid, voxels flattened in
(pd, ph, pw, C) order), embedded linearly, given a fixed 3D sin-cos position embedding, and 75% of the
patches are dropped at random (per sample, MAE's argsort-of-noise). The encoder runs the kept patches
plus a CLS token through the **same** `vit.Block`s as the 2D encoder (no second transformer); a light
decoder (narrower, shallower `vit.Block`s) sees the encoded tokens plus mask tokens at the dropped
positions and predicts every patch's voxels. The loss is the mean squared error on the masked patches
only, against per-patch normalised targets (`norm_pix_loss`, MAE's default) or raw voxels.

Sizes: `variant` names an encoder size from `vit.VARIANTS` ('mu' is tiny, for tests) plus the patch,
e.g. 'B/16'; the decoder is set by `dec_dim` / `dec_depth` / `dec_heads`.
Sharding: every parameter carries logical axes (mesh.py); activations are constrained to the batch axes
of the current mesh (`jax.set_mesh`), and `remat` rematerialises each block in the backward pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from m2dino_jax import mesh as mesh_lib
from m2dino_jax.errors import ConfigError
from m2dino_jax.models import vit


@dataclasses.dataclass(frozen=True)
class MAE3DConfig:
  """Architecture and masking of one 3D MAE. Defaults: ViT-B encoder, 16^3 patches, 96^3 crops."""
  dim: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  patch: int = 16
  crop: int = 96  # input side (voxels); any multiple of `patch`
  in_chans: int = 1
  mask_ratio: float = 0.75
  dec_dim: int = 384
  dec_depth: int = 4
  dec_heads: int = 12
  dec_mlp_ratio: int = 4
  norm_pix_loss: bool = True
  remat: bool = False
  norm_eps: float = 1e-6
  dtype: str = "float32"

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict | dict) -> MAE3DConfig:
    cfg = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    out = vit.decode_variant(cfg.pop("variant")) if cfg.get("variant") else {}
    for k, v in cfg.items():
      if k not in fields:
        raise ConfigError(f"model.{k}", "unknown 3D MAE setting")
      if v is not None:
        out[k] = v
    c = cls(**out)
    if c.crop % c.patch:
      raise ConfigError("model.crop", f"crop {c.crop} is not divisible by the patch {c.patch}")
    if not 0.0 <= c.mask_ratio < 1.0:
      raise ConfigError("model.mask_ratio", f"must be in [0, 1), got {c.mask_ratio}")
    if c.dim % c.heads or c.dec_dim % c.dec_heads:
      raise ConfigError("model.heads", "dim / dec_dim must be divisible by heads / dec_heads")
    return c

  @property
  def grid(self) -> tuple[int, int, int]:
    g = self.crop // self.patch
    return (g, g, g)

  @property
  def num_patches(self) -> int:
    return int(np.prod(self.grid))

  @property
  def patch_dim(self) -> int:
    return self.patch ** 3 * self.in_chans

  def encoder_vit(self) -> vit.ViTConfig:
    """The 2D encoder settings whose blocks the 3D encoder uses (MAE: qkv bias, no LayerScale)."""
    return vit.ViTConfig(kind="dinov2", dim=self.dim, depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim,
                         patch=self.patch, num_registers=0, in_chans=self.in_chans, key_bias=True,
                         layerscale_init=None, norm_eps=self.norm_eps, dtype=self.dtype)

  def decoder_vit(self) -> vit.ViTConfig:
    return dataclasses.replace(self.encoder_vit(), dim=self.dec_dim, depth=self.dec_depth, heads=self.dec_heads,
                               mlp_dim=self.dec_dim * self.dec_mlp_ratio)


# ----------------------------------------------------------------------------------------------------------
# Pure helpers (tested against NumPy loops)

def patchify(vol: jax.Array, p: int) -> jax.Array:
  """[B, D, H, W, C] -> [B, N, p^3 C]; patches row-major over (d, h, w), voxels in (pd, ph, pw, C) order."""
  b, d, h, w, c = vol.shape
  if d % p or h % p or w % p:
    raise ValueError(f"volume {d}x{h}x{w} is not divisible by the patch {p}")
  x = vol.reshape(b, d // p, p, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (d // p) * (h // p) * (w // p), p ** 3 * c)


def unpatchify(x: jax.Array, p: int, grid: tuple[int, int, int], c: int = 1) -> jax.Array:
  """Inverse of `patchify`."""
  b = x.shape[0]
  gd, gh, gw = grid
  x = x.reshape(b, gd, gh, gw, p, p, p, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, gd * p, gh * p, gw * p, c)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_3d(dim: int, grid: tuple[int, int, int]) -> np.ndarray:
  """[N, dim] fixed 3D sin-cos embedding: each axis gets 2*(dim // 6) channels (d, h, w order), the
  remainder (dim % 6) is zero. MAE's 2D recipe extended to three axes."""
  per = 2 * (dim // 6)
  if per == 0:
    raise ConfigError("model.dim", f"dim {dim} is too small for a 3D sin-cos embedding (needs >= 6)")
  gd, gh, gw = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), np.arange(grid[2]), indexing="ij")
  emb = np.concatenate([_sincos_1d(per, g) for g in (gd, gh, gw)], axis=1)
  pad = np.zeros((emb.shape[0], dim - 3 * per))
  return np.concatenate([emb, pad], axis=1).astype(np.float32)


def random_masking(key: jax.Array, batch: int, n: int, ratio: float):
  """MAE masking: per sample, keep the int(n * (1 - ratio)) patches with the smallest uniform noise.

  Returns (ids_keep [B, K] in noise order, mask [B, N] with 1 = masked, ids_restore [B, N])."""
  keep = int(n * (1 - ratio))
  noise = jax.random.uniform(key, (batch, n))
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  mask = jnp.ones((batch, n), jnp.float32).at[:, :keep].set(0.0)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return ids_shuffle[:, :keep], mask, ids_restore


def patch_targets(vol: jax.Array, p: int, norm_pix: bool, eps: float = 1e-6) -> jax.Array:
  """Reconstruction targets [B, N, p^3 C]: per-patch (mean 0, var 1) when `norm_pix` (MAE's unbiased-free
  variance: mean of squares about the mean)."""
  t = patchify(vol.astype(jnp.float32), p)
  if norm_pix:
    mean = t.mean(axis=-1, keepdims=True)
    var = t.var(axis=-1, keepdims=True)
    t = (t - mean) / jnp.sqrt(var + eps)
  return t


def masked_loss(pred: jax.Array, target: jax.Array, mask: jax.Array):
  """(mean loss over masked patches of the batch, per-sample loss [B]); visible patches do not count."""
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  per_sample = jnp.sum(per_patch * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0), per_sample


def constrain(x: jax.Array) -> jax.Array:
  """Constrains an activation's leading (batch) dim to the batch axes of the mesh set by `jax.set_mesh`."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or getattr(mesh, "empty", True):
    return x
  axes = tuple(a for a in mesh_lib.batch_axes(mesh) if mesh_lib.axis_size(mesh, a) > 1)
  size = int(np.prod([mesh_lib.axis_size(mesh, a) for a in axes])) if axes else 1
  if not axes or x.shape[0] % size:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes))


# ----------------------------------------------------------------------------------------------------------

def _dense(din, dout, names, rngs):
  init = nnx.initializers.xavier_uniform()
  return nnx.Linear(din, dout, kernel_init=nnx.with_partitioning(init, names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]), rngs=rngs)


def _run_blocks(blocks, x, remat: bool, taps=()):
  """Runs `blocks`; returns the output and the outputs of blocks taps[0], taps[1], ... (in that order)."""
  seen = {}
  for i, block in enumerate(blocks):
    if remat:
      x = nnx.remat(lambda blk, h: blk(h, None, 1)[0])(block, x)
    else:
      x = block(x, None, 1)[0]
    x = constrain(x)
    if i in taps:
      seen[i] = x
  return x, [seen[t] for t in taps]


# The encoder's parameters (the same names in MAE3D and Encoder3D, so a MAE checkpoint's encoder is a subtree).
ENCODER_KEYS = ("patch_embed", "cls_token", "blocks", "norm")
# The settings that make two encoders' weights interchangeable (checked when fine-tuning from a checkpoint).
ENCODER_SETTINGS = ("dim", "depth", "heads", "mlp_dim", "patch", "in_chans", "norm_eps")


def _init_encoder(m: nnx.Module, cfg: MAE3DConfig, rngs: nnx.Rngs) -> None:
  enc = cfg.encoder_vit()
  m.patch_embed = _dense(cfg.patch_dim, cfg.dim, ("patch", "embed"), rngs)
  m.cls_token = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, 1, cfg.dim)),
                          sharding_names=(None, None, "embed"))
  m.blocks = nnx.List([vit.Block(enc, 0.0, rngs=rngs) for _ in range(cfg.depth)])
  m.norm = vit._norm(cfg.dim, cfg.norm_eps, rngs)


def _encode(m: nnx.Module, cfg: MAE3DConfig, vol: jax.Array, ids_keep=None, taps=()):
  """Shared by MAE3D and Encoder3D: (normed tokens [B, 1 + K, dim], raw outputs of the `taps` blocks)."""
  if vol.shape[-1] != cfg.in_chans:
    raise ValueError(f"expected {cfg.in_chans} channels, got {vol.shape[-1]}")
  p = cfg.patch
  grid = (vol.shape[1] // p, vol.shape[2] // p, vol.shape[3] // p)
  x = m.patch_embed(patchify(vol.astype(cfg.dtype), p))
  x = x + jnp.asarray(sincos_3d(cfg.dim, grid))[None].astype(x.dtype)
  if ids_keep is not None:
    x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
  cls = jnp.broadcast_to(m.cls_token[...], (x.shape[0], 1, cfg.dim)).astype(x.dtype)
  x = constrain(jnp.concatenate([cls, x], axis=1))
  x, tapped = _run_blocks(m.blocks, x, cfg.remat, taps)
  return m.norm(x), tapped


class Encoder3D(nnx.Module):
  """The MAE's encoder alone (all patches, no masking), for fine-tuning: parameters named as in MAE3D."""

  def __init__(self, cfg: MAE3DConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    _init_encoder(self, cfg, rngs)

  def __call__(self, vol: jax.Array, taps=()) -> tuple[jax.Array, list[jax.Array]]:
    """vol [B, D, H, W, C] -> (normed tokens [B, 1 + N, dim], CLS first; outputs of blocks `taps`)."""
    return _encode(self, self.cfg, vol, None, tuple(taps))


class MAE3D(nnx.Module):
  """Encoder (patch embed, sin-cos position, CLS, vit.Blocks, norm) and a light decoder."""

  def __init__(self, cfg: MAE3DConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dec = cfg.decoder_vit()
    _init_encoder(self, cfg, rngs)
    self.decoder_embed = _dense(cfg.dim, cfg.dec_dim, ("embed", "embed"), rngs)
    self.mask_token = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, 1, cfg.dec_dim)),
                                sharding_names=(None, None, "embed"))
    self.decoder_blocks = nnx.List([vit.Block(dec, 0.0, rngs=rngs) for _ in range(cfg.dec_depth)])
    self.decoder_norm = vit._norm(cfg.dec_dim, cfg.norm_eps, rngs)
    self.decoder_pred = _dense(cfg.dec_dim, cfg.patch_dim, ("embed", "patch"), rngs)

  def _pos(self, dim: int, grid) -> jax.Array:
    return jnp.asarray(sincos_3d(dim, grid))[None]

  def _grid(self, vol) -> tuple[int, int, int]:
    p = self.cfg.patch
    return (vol.shape[1] // p, vol.shape[2] // p, vol.shape[3] // p)

  def encode(self, vol: jax.Array, ids_keep: jax.Array | None = None) -> jax.Array:
    """vol [B, D, H, W, C] -> normed tokens [B, 1 + K, dim] (CLS first); all patches when ids_keep is None."""
    return _encode(self, self.cfg, vol, ids_keep)[0]

  def decode(self, latent: jax.Array, ids_restore: jax.Array, grid) -> jax.Array:
    """Encoded tokens [B, 1 + K, dim] -> predicted patches [B, N, p^3 C] in patch order."""
    cfg = self.cfg
    x = self.decoder_embed(latent)
    b, n = ids_restore.shape
    masks = jnp.broadcast_to(self.mask_token[...], (b, n - (x.shape[1] - 1), cfg.dec_dim)).astype(x.dtype)
    seq = jnp.concatenate([x[:, 1:], masks], axis=1)
    seq = jnp.take_along_axis(seq, ids_restore[..., None], axis=1)
    seq = seq + self._pos(cfg.dec_dim, grid).astype(x.dtype)
    x = constrain(jnp.concatenate([x[:, :1], seq], axis=1))
    x = self.decoder_norm(_run_blocks(self.decoder_blocks, x, cfg.remat)[0])
    return self.decoder_pred(x)[:, 1:]

  def __call__(self, vol: jax.Array, key: jax.Array, mask_ratio: float | None = None) -> dict:
    """Masks, encodes, decodes. Returns loss, per-sample loss, pred, target and mask (1 = masked)."""
    cfg = self.cfg
    ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
    grid = self._grid(vol)
    n = int(np.prod(grid))
    ids_keep, mask, ids_restore = random_masking(key, vol.shape[0], n, ratio)
    pred = self.decode(self.encode(vol, ids_keep), ids_restore, grid)
    target = patch_targets(vol, cfg.patch, cfg.norm_pix_loss)
    loss, per_sample = masked_loss(pred, target, mask)
    return {"loss": loss, "per_sample": per_sample, "pred": pred, "target": target, "mask": mask}

