"""ViT encoders: DINOv3 (patch 16, 2D RoPE, registers) and DINOv2 (patch 14, learned position
embedding resized bicubically), in Flax NNX.

One `Encoder` class covers both; `ViTConfig.kind` picks the position scheme. Tokens are laid out
[CLS, registers, patches (row-major)]. Blocks are pre-norm with LayerScale and drop-path; the FFN
is a GELU MLP, a SwiGLU, or (in the blocks the MoE config names) a task-conditioned MoE.

The forward pass returns a dict of intermediates:
  cls [B, D], registers [B, R, D], patch_tokens [B, N, D] (after the final norm),
  features: tuple of [B, h, w, D], the final-normed patch tokens of `out_blocks` (for dense heads),
  grid: (h, w), moe_aux: tuple of per-MoE-layer auxiliary dicts.

Randomness (drop-path, RoPE rescale) comes from an explicit `key` argument, so a train step is a
pure function of (params, batch, key).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from m2dino_jax.errors import ConfigError
from m2dino_jax.models import interp, precision, rope

ATTENTION = ("matmul", "xla")

# name -> (width, depth, heads, mlp width). 'mu' is a tiny size for tests.
VARIANTS = {
    "mu": (64, 4, 2, 256),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
}


def decode_variant(variant: str) -> dict:
  """'S/16' -> dict(dim=384, depth=12, heads=6, mlp_dim=1536, patch=16) (big_vision style)."""
  name, _, patch = variant.partition("/")
  if name not in VARIANTS:
    raise ConfigError("model.variant", f"unknown variant '{variant}'; sizes: {', '.join(VARIANTS)}")
  dim, depth, heads, mlp = VARIANTS[name]
  out = dict(dim=dim, depth=depth, heads=heads, mlp_dim=mlp)
  if patch:
    out["patch"] = int(patch)
  return out


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of one encoder. Defaults are DINOv3 ViT-S/16 with 4 registers."""
  kind: str = "dinov3"  # 'dinov3' (RoPE) | 'dinov2' (learned position embedding)
  dim: int = 384
  depth: int = 12
  heads: int = 6
  mlp_dim: int = 1536
  ffn: str = "mlp"  # 'mlp' (GELU) | 'swiglu'
  patch: int = 16
  num_registers: int = 4
  in_chans: int = 3
  query_bias: bool = True
  key_bias: bool = False
  value_bias: bool = True
  proj_bias: bool = True
  mlp_bias: bool = True
  layerscale_init: float | None = 1e-5  # None disables LayerScale
  norm_eps: float = 1e-5
  drop_path: float = 0.0
  rope_theta: float = 100.0
  pos_embed_rescale: float | None = None  # training-time RoPE coordinate jitter (DINOv3 uses 2.0)
  pos_grid: int = 37  # dinov2: learned position grid side (518 / 14)
  pos_antialias: bool = False  # dinov2: antialiased bicubic resize (HF Dinov2WithRegisters)
  out_blocks: tuple[int, ...] = ()  # block indices (0-based) whose outputs feed dense heads
  # matmul precision: 'float32', or 'bfloat16' = bf16 matmul inputs with fp32 accumulation (models/precision.py);
  # parameters, norms, softmax and the residual stream stay float32
  dtype: str = "float32"
  # 'matmul': attention as explicit batched matmuls in [B, heads, T, head_dim] with RoPE tables built once per
  # forward (the fast form on CPU); 'xla': jax.nn.dot_product_attention with per-block RoPE (the earlier
  # formulation, kept for comparison). Both compute the same function.
  attention: str = "matmul"

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict | dict) -> ViTConfig:
    """Builds from a config dict; 'variant' (e.g. 'S/16') fills dim/depth/heads/mlp_dim/patch."""
    cfg = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    variant = cfg.pop("variant", None)  # '' / None: sizes given field by field
    out = decode_variant(variant) if variant else {}
    for k, v in cfg.items():
      if k not in fields:
        raise ConfigError(f"model.{k}", "unknown encoder setting")
      if v is not None or k in ("layerscale_init", "pos_embed_rescale"):
        out[k] = tuple(v) if isinstance(v, list) else v
    c = cls(**out)
    if c.dim % c.heads or (c.kind == "dinov3" and (c.dim // c.heads) % 4):
      raise ConfigError("model.heads", f"dim {c.dim} must split into {c.heads} heads of size % 4 == 0")
    if c.kind not in ("dinov3", "dinov2"):
      raise ConfigError("model.kind", f"'{c.kind}' is not 'dinov3' or 'dinov2'")
    if c.attention not in ATTENTION:
      raise ConfigError("model.attention", f"'{c.attention}' is not one of {ATTENTION}")
    precision.check_dtype(c.dtype)
    if any(not 0 <= b < c.depth for b in c.out_blocks):
      raise ConfigError("model.out_blocks", f"{c.out_blocks} outside 0..{c.depth - 1}")
    return c


def _dense(din, dout, names, *, bias=True, rngs):
  init = nnx.initializers.truncated_normal(0.02)
  return nnx.Linear(din, dout, use_bias=bias, kernel_init=nnx.with_partitioning(init, names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]), rngs=rngs)


def _norm(dim, eps, rngs):
  # 'norm' has no mesh rule in the presets: norms stay replicated, but still carry a name
  return nnx.LayerNorm(dim, epsilon=eps, rngs=rngs,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)))


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Stochastic depth: zeroes whole samples of a residual branch with probability `rate`."""
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class LayerScale(nnx.Module):
  def __init__(self, dim: int, init: float):
    self.gamma = nnx.Param(jnp.full((dim,), init, jnp.float32), sharding_names=("embed",))

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU as torch writes it, x / 2 * (1 + erf(x / sqrt 2)). jax.nn.gelu(approximate=False)
  goes through erfc, whose two-branch expansion costs XLA:CPU about twice as much forward and backward;
  the two agree to ~1e-7 * |x|."""
  return x * 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


class Mlp(nnx.Module):
  """GELU MLP (`mlp`) or SwiGLU (`swiglu`: silu(gate) * up)."""

  def __init__(self, dim: int, hidden: int, kind: str = "mlp", bias: bool = True, *, dtype: str = "float32",
               rngs: nnx.Rngs):
    self.kind = kind
    self.dtype = dtype
    if kind == "swiglu":
      self.gate = _dense(dim, hidden, ("embed", "mlp"), bias=bias, rngs=rngs)
    elif kind != "mlp":
      raise ConfigError("model.ffn", f"unknown FFN '{kind}'; use 'mlp' or 'swiglu'")
    self.up = _dense(dim, hidden, ("embed", "mlp"), bias=bias, rngs=rngs)
    self.down = _dense(hidden, dim, ("mlp", "embed"), bias=bias, rngs=rngs)

  def __call__(self, x):
    dense = lambda layer, y: precision.linear(layer, y, self.dtype)
    if self.kind == "swiglu":
      return dense(self.down, jax.nn.silu(dense(self.gate, x)) * dense(self.up, x))
    return dense(self.down, gelu(dense(self.up, x)))


def _attention_dtype(dtype: str) -> str:
  """Matmul precision of the attention core: `dtype`, except on CPU, where it stays fp32. XLA:CPU's batched
  bf16 matmul alone is fast (q k^T at S/16: 397 vs 177 GFLOP/s fp32, one core), but the whole bf16 step
  with a bf16 core measured no faster (0.81x vs 0.86x torch autocast, one core): the extra conversions
  around the softmax cost what the matmuls save."""
  return "float32" if jax.default_backend() == "cpu" else dtype


class Attention(nnx.Module):
  """Multi-head self-attention with separate q/k/v projections and optional RoPE on patch tokens.

  `rope_cs` is what `Encoder.__call__` built for this attention kind: patch tables (cfg.attention 'xla') or
  token tables (`rope.token_tables`, 'matmul')."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    self.heads = cfg.heads
    self.impl = cfg.attention
    self.dtype = cfg.dtype
    self.q = _dense(d, d, ("embed", "heads"), bias=cfg.query_bias, rngs=rngs)
    self.k = _dense(d, d, ("embed", "heads"), bias=cfg.key_bias, rngs=rngs)
    self.v = _dense(d, d, ("embed", "heads"), bias=cfg.value_bias, rngs=rngs)
    self.o = _dense(d, d, ("heads", "embed"), bias=cfg.proj_bias, rngs=rngs)

  def __call__(self, x, rope_cs=None, num_prefix: int = 0):
    if self.impl == "xla":
      return self._xla(x, rope_cs, num_prefix)
    b, t, d = x.shape
    dh = d // self.heads
    dense = lambda layer, y: precision.linear(layer, y, self.dtype)
    # [B, T, D] -> [B, heads, T, head_dim]: batch dimensions leading, as the batched matmuls want them
    # (one fused [D, 3D] projection measured 4-5% slower on CPU than three)
    split = lambda y: y.reshape(b, t, self.heads, dh).transpose(0, 2, 1, 3)
    q, k, v = split(dense(self.q, x)), split(dense(self.k, x)), split(dense(self.v, x))
    if rope_cs is not None:
      q, k = rope.apply_token_rope(q, *rope_cs), rope.apply_token_rope(k, *rope_cs)
    # softmax(q k^T / sqrt(head_dim)) v with the scale on q (exact for head_dim 64, a power-of-two scale)
    # and the normalisation after the value matmul: the [T, T] probabilities are never divided
    adt = _attention_dtype(self.dtype)
    logits = precision.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(dh ** -0.5, q.dtype), k, adt)
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits)
    out = precision.einsum("bhqk,bhkd->bhqd", e, v, adt) / jnp.sum(e, axis=-1, keepdims=True)
    return dense(self.o, out.transpose(0, 2, 1, 3).reshape(b, t, d))

  def _xla(self, x, rope_cs, num_prefix):
    """The earlier formulation: [B, T, heads, head_dim] and jax.nn.dot_product_attention."""
    b, t, d = x.shape
    dense = lambda layer, y: precision.linear(layer, y, self.dtype)
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    q, k, v = split(dense(self.q, x)), split(dense(self.k, x)), split(dense(self.v, x))
    if rope_cs is not None:
      q = rope.apply_rope(q, *rope_cs, num_prefix)
      k = rope.apply_rope(k, *rope_cs, num_prefix)
    if precision.is_mixed(self.dtype):  # bf16 operands: the logits and softmax are fp32 inside
      q, k, v = q.astype(self.dtype), k.astype(self.dtype), v.astype(self.dtype)
    out = jax.nn.dot_product_attention(q, k, v)  # scale head_dim ** -0.5, softmax over keys
    return dense(self.o, out.reshape(b, t, d).astype(x.dtype))


class Block(nnx.Module):
  """Pre-norm transformer block: x + LS(attn(norm1 x)); x + LS(ffn(norm2 x)); drop-path on both."""

  def __init__(self, cfg: ViTConfig, drop_rate: float, ffn: nnx.Module | None = None, *, rngs: nnx.Rngs):
    self.drop_rate = drop_rate
    self.norm1 = _norm(cfg.dim, cfg.norm_eps, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.norm2 = _norm(cfg.dim, cfg.norm_eps, rngs)
    self.is_moe = ffn is not None
    self.mlp = ffn if ffn is not None else Mlp(cfg.dim, cfg.mlp_dim, cfg.ffn, cfg.mlp_bias, dtype=cfg.dtype,
                                                rngs=rngs)
    use_ls = cfg.layerscale_init is not None
    self.ls1 = LayerScale(cfg.dim, cfg.layerscale_init) if use_ls else None
    self.ls2 = LayerScale(cfg.dim, cfg.layerscale_init) if use_ls else None

  def __call__(self, x, rope_cs, num_prefix, task_ids=None, *, train=False, key=None):
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    h = self.attn(self.norm1(x), rope_cs, num_prefix)
    h = self.ls1(h) if self.ls1 is not None else h
    x = x + drop_path(h, self.drop_rate, k1)
    aux = None
    if self.is_moe:
      h, aux = self.mlp(self.norm2(x), task_ids, train=train)
    else:
      h = self.mlp(self.norm2(x))
    h = self.ls2(h) if self.ls2 is not None else h
    return x + drop_path(h, self.drop_rate, k2), aux


class Encoder(nnx.Module):
  """DINOv3 / DINOv2 ViT. `moe` (an MoE ConfigDict with enabled=True) swaps FFNs for MoE blocks."""

  def __init__(self, cfg: ViTConfig, *, moe: ml_collections.ConfigDict | None = None, num_tasks: int = 1,
               rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.dim
    self.patch_embed = _dense(cfg.patch * cfg.patch * cfg.in_chans, d, ("patch", "embed"), rngs=rngs)
    tok = nnx.initializers.truncated_normal(0.02)
    self.cls_token = nnx.Param(tok(rngs.params(), (1, 1, d)), sharding_names=(None, None, "embed"))
    self.mask_token = nnx.Param(jnp.zeros((1, 1, d)), sharding_names=(None, None, "embed"))
    self.register_tokens = (nnx.Param(tok(rngs.params(), (1, cfg.num_registers, d)),
                                      sharding_names=(None, None, "embed")) if cfg.num_registers else None)
    if cfg.kind == "dinov2":
      n = cfg.pos_grid * cfg.pos_grid + 1
      self.pos_embed = nnx.Param(tok(rngs.params(), (1, n, d)), sharding_names=(None, None, "embed"))
    moe_layers = _moe_layers(moe, cfg.depth)
    rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
    blocks = []
    for i in range(cfg.depth):
      ffn = None
      if i in moe_layers:
        from m2dino_jax.models import moe as moe_lib
        ffn = moe_lib.MoEFFN(d, cfg.mlp_dim, moe, num_tasks, rngs=rngs)
      blocks.append(Block(cfg, rates[i], ffn, rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.norm = _norm(d, cfg.norm_eps, rngs)

  @property
  def num_prefix(self) -> int:
    return 1 + self.cfg.num_registers

  def embed(self, images: jax.Array, mask: jax.Array | None = None):
    """images [B, H, W, C] -> tokens [B, 1 + R + N, D] and the patch grid (h, w)."""
    cfg = self.cfg
    b, hh, ww, c = images.shape
    p = cfg.patch
    if hh % p or ww % p:
      raise ValueError(f"image size {hh}x{ww} is not divisible by the patch size {p}")
    if c != cfg.in_chans:
      raise ValueError(f"expected {cfg.in_chans} input channels, got {c}")
    h, w = hh // p, ww // p
    x = images.astype(jnp.float32).reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = precision.linear(self.patch_embed, x.reshape(b, h * w, p * p * c), cfg.dtype)
    if mask is not None:
      x = jnp.where(mask[..., None], self.mask_token[...].astype(x.dtype), x)
    elif cfg.kind == "dinov3":
      x = x + 0.0 * self.mask_token[...].astype(x.dtype)  # keeps mask_token in the graph, as DINOv3 does
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, cfg.dim)).astype(x.dtype)
    if cfg.kind == "dinov2":
      pos = self.pos_embed[...]
      grid = pos[0, 1:].reshape(cfg.pos_grid, cfg.pos_grid, cfg.dim)
      grid = interp.resize_grid(grid, (h, w), antialias=cfg.pos_antialias).reshape(1, h * w, cfg.dim)
      x = x + grid.astype(x.dtype)
      cls = cls + pos[:, :1].astype(x.dtype)
    parts = [cls]
    if self.register_tokens is not None:
      regs = jnp.broadcast_to(self.register_tokens[...], (b, cfg.num_registers, cfg.dim))
      parts.append(regs.astype(x.dtype))
    return jnp.concatenate(parts + [x], axis=1), (h, w)

  def __call__(self, images: jax.Array, task_ids: jax.Array | None = None, *, train: bool = False,
               key: jax.Array | None = None, mask: jax.Array | None = None) -> dict:
    cfg = self.cfg
    x, (h, w) = self.embed(images, mask)
    rope_cs = None
    if cfg.kind == "dinov3":
      rkey = None
      if train and key is not None and cfg.pos_embed_rescale:
        key, rkey = jax.random.split(key)
      rope_cs = rope.rope_tables(h, w, cfg.dim // cfg.heads, cfg.rope_theta,
                                 rescale=cfg.pos_embed_rescale if train else None, key=rkey)
      if cfg.attention == "matmul":
        rope_cs = rope.token_tables(*rope_cs, self.num_prefix)
    if task_ids is None:
      task_ids = jnp.zeros((x.shape[0],), jnp.int32)
    keys = list(jax.random.split(key, cfg.depth)) if (train and key is not None) else [None] * cfg.depth
    feats, aux = [], []
    for i, block in enumerate(self.blocks):
      x, a = block(x, rope_cs, self.num_prefix, task_ids, train=train, key=keys[i])
      if a is not None:
        aux.append(a)
      if i in cfg.out_blocks:
        feats.append(self.norm(x)[:, self.num_prefix:].reshape(x.shape[0], h, w, cfg.dim))
    x = self.norm(x)
    return {
        "cls": x[:, 0],
        "registers": x[:, 1:self.num_prefix],
        "patch_tokens": x[:, self.num_prefix:],
        "features": tuple(feats),
        "grid": (h, w),
        "moe_aux": tuple(aux),
    }


def _moe_layers(moe, depth: int) -> Sequence[int]:
  if moe is None or not moe.get("enabled", False):
    return ()
  from m2dino_jax.models import moe as moe_lib
  return tuple(moe_lib.moe_layer_indices(moe.layers, depth))


def count_params(module: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
