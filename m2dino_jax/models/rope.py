"""2D rotary position embedding as DINOv3 defines it.

Patch centres are normalised to [-1, 1] per axis (`((i + 0.5) / n) * 2 - 1`). Each head's
dimension is split into a y part and an x part; frequencies are `theta ** -(arange(0, 1, 4 / head_dim))`
and angles `2 pi * coord * freq`, laid out [y-block, x-block] and tiled twice, so the rotation
uses the half-split convention `q * cos + rotate_half(q) * sin`. Only patch tokens are rotated:
the CLS and register tokens keep their values.

During training DINOv3 may rescale all coordinates by a log-uniform factor in [1/r, r]
(`pos_embed_rescale`); evaluation never does.

`token_tables` + `apply_token_rope` are the fast form of the same rotation (bit-identical results): the
tables cover every token (identity rows for CLS and registers, so no slicing and concatenation of the
activations), `rotate_half`'s sign lives in the sine table, and an optimisation barrier keeps XLA from
folding the cos / sin computation into each block's fusions (it recomputed them in every block, forward
and backward).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def patch_coords(h: int, w: int) -> jax.Array:
  """[h*w, 2] (y, x) patch-centre coordinates in [-1, 1], row-major."""
  ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h * 2.0 - 1.0
  xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w * 2.0 - 1.0
  yy, xx = jnp.meshgrid(ys, xs, indexing="ij")
  return jnp.stack([yy.reshape(-1), xx.reshape(-1)], axis=-1)


def rope_tables(h: int, w: int, head_dim: int, theta: float = 100.0, *, rescale: float | None = None,
                key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each [h*w, head_dim]. With `rescale` and `key`, applies the training-time jitter."""
  if head_dim % 4:
    raise ValueError(f"RoPE needs head_dim divisible by 4, got {head_dim}")
  coords = patch_coords(h, w)
  if rescale is not None and key is not None:
    log_r = math.log(rescale)
    coords = coords * jnp.exp(jax.random.uniform(key, (), minval=-log_r, maxval=log_r))
  inv_freq = 1.0 / theta ** jnp.arange(0, 1, 4 / head_dim, dtype=jnp.float32)  # [head_dim / 4]
  angles = 2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]  # [N, 2, head_dim / 4]
  angles = angles.reshape(angles.shape[0], -1)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, num_prefix: int) -> jax.Array:
  """Rotates the patch tokens of x [B, T, heads, head_dim]; the first `num_prefix` tokens stay."""
  prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
  cos = cos[None, :, None, :].astype(x.dtype)
  sin = sin[None, :, None, :].astype(x.dtype)
  patches = patches * cos + rotate_half(patches) * sin
  return jnp.concatenate([prefix, patches], axis=1)


def token_tables(cos: jax.Array, sin: jax.Array, num_prefix: int) -> tuple[jax.Array, jax.Array]:
  """Patch tables [N, head_dim] -> tables over all tokens [num_prefix + N, head_dim] for `apply_token_rope`:
  prefix rows rotate by zero (cos 1, sin 0) and the first half of the sine carries rotate_half's sign."""
  half = cos.shape[-1] // 2
  cos = jnp.concatenate([jnp.ones((num_prefix, cos.shape[-1]), cos.dtype), cos])
  sin = jnp.concatenate([-sin[:, :half], sin[:, half:]], axis=-1)
  sin = jnp.concatenate([jnp.zeros((num_prefix, sin.shape[-1]), sin.dtype), sin])
  # computed once per forward: without the barrier XLA duplicates the table math into every consumer
  return jax.lax.optimization_barrier((cos, sin))


def apply_token_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [..., T, head_dim] rotated by `token_tables` [T, head_dim]; equals `apply_rope` bit for bit (x * 1 +
  y * 0 == x for finite values; the sign flip is exact)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos.astype(x.dtype) + jnp.concatenate([x2, x1], axis=-1) * sin.astype(x.dtype)
