"""Task heads on top of the encoder's intermediates (a registry keyed by task type).

  segmentation   UperNet-lite: the selected block outputs become a 4-level pyramid (strides 4, 8,
                 16, 32 relative to the image for patch 16), FPN top-down fusion, concat at the finest
                 level, 3x3 conv, 1x1 classifier, bilinear upsampling to the input size.
  classification linear (or 1-hidden-layer MLP) on [CLS || mean patch token].
  detection      one box per image: centre by soft-argmax over the patch grid, size by an MLP on
                 [CLS || attention-pooled patches] -> (x_min, y_min, x_max, y_max) in [0, 1].
  regression     K landmarks in [0, 1]: direct (MLP -> 2K sigmoids) or heatmap (1x1 conv on the last
                 feature map -> K maps -> soft-argmax).

Each head maps the encoder output dict to the raw prediction of its task; `tasks/types.py` picks the head
of a task type.

The segmentation head's 3x3 convolutions go through `conv_same`, whose backward pass is written out on CPU:
the multi-task step runs each head inside `lax.switch` (train/multitask/steps.py), and XLA:CPU leaves the
weight-gradient convolution of an autodiffed conv inside a conditional branch in its raw layout
(dim_labels f01b_i01o->01bf), which its Eigen convolution runtime cannot take, so it is emitted as a naive
loop nest, 50-80x slower than the same conv outside the switch (issue 17).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from m2dino_jax.errors import ConfigError


def default_heads_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "seg_channels": 128,  # UperNet-lite width
      "cls_kind": "linear",  # 'linear' | 'mlp'
      "mlp_hidden": 256,  # hidden width of MLP heads (cls 'mlp', det, reg 'direct')
      "reg_kind": "direct",  # 'direct' | 'heatmap'
  })


def _dense(din, dout, *, rngs, names=("embed", None)):
  return nnx.Linear(din, dout, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
                    rngs=rngs)


def _conv(cin, cout, k, *, rngs):
  return nnx.Conv(cin, cout, (k, k), padding="SAME",
                  kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None, None, None)),
                  rngs=rngs)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv_nhwc(x, kernel, padding):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


def _pads(kernel):
  return [(k // 2, k // 2) for k in kernel.shape[:2]]


@jax.custom_vjp
def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'SAME' convolution x [B, H, W, Cin] * kernel [kh, kw, Cin, Cout] (odd kh, kw), as nnx.Conv.
  On CPU the gradients are autodiff's, each written as a convolution in the canonical NHWC / HWIO layout
  (bit-identical to autodiff outside a conditional), so that XLA:CPU runs them with its fast convolution
  inside `lax.switch` too; other platforms use autodiff's own backward convolutions."""
  return _conv_nhwc(x, kernel, _pads(kernel))


def _conv_same_fwd(x, kernel):
  return conv_same(x, kernel), (x, kernel)


def _canonical_conv_grads(x, kernel, g):
  # dx: g convolved with the spatially flipped kernel, input / output channels swapped
  dx = _conv_nhwc(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), _pads(kernel))
  # dkernel[i, j, ci, co] = sum_{b,h,w} x_pad[b, h+i, w+j, ci] g[b, h, w, co]: a VALID convolution with the
  # input channels as its batch, the examples as its features and g as a [H, W]-window kernel
  xp = jnp.pad(x, [(0, 0), *_pads(kernel), (0, 0)]).transpose(3, 1, 2, 0)  # [Cin, H+kh-1, W+kw-1, B]
  dk = _conv_nhwc(xp, g.transpose(1, 2, 0, 3), "VALID")  # [Cin, kh, kw, Cout]
  return dx.astype(x.dtype), dk.transpose(1, 2, 0, 3).astype(kernel.dtype)


def _autodiff_conv_grads(x, kernel, g):
  return jax.vjp(lambda a, b: _conv_nhwc(a, b, _pads(kernel)), x, kernel)[1](g)


def _conv_same_bwd(res, g):
  # the written-out form on CPU only: accelerators' compilers recognise autodiff's own backward convolutions
  return jax.lax.platform_dependent(*res, g, cpu=_canonical_conv_grads, default=_autodiff_conv_grads)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def _apply_conv(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """An nnx.Conv built by `_conv` (stride 1, 'SAME', odd kernel, bias) applied through `conv_same`."""
  return conv_same(x, conv.kernel[...]) + conv.bias[...]


def pooled(enc_out: dict) -> jax.Array:
  return jnp.concatenate([enc_out["cls"], enc_out["patch_tokens"].mean(axis=1)], axis=-1)


def _resize(x, hw):
  return jax.image.resize(x, (x.shape[0], hw[0], hw[1], x.shape[-1]), "bilinear")


class SegHead(nnx.Module):
  """UperNet-lite decoder over `num_inputs` feature maps [B, h, w, D] -> logits [B, H, W, classes]."""

  def __init__(self, dim: int, num_classes: int, num_inputs: int, channels: int, patch: int, *, rngs):
    self.patch = patch
    # level i is resampled by 4 / 2**i relative to the patch grid (x4, x2, x1, x0.5 for 4 inputs)
    self.scales = tuple(4.0 / 2 ** i for i in range(num_inputs))
    self.lateral = nnx.List([_dense(dim, channels, rngs=rngs) for _ in range(num_inputs)])
    self.smooth = nnx.List([_conv(channels, channels, 3, rngs=rngs) for _ in range(num_inputs)])
    self.fuse = _conv(channels * num_inputs, channels, 3, rngs=rngs)
    self.norm = nnx.GroupNorm(channels, num_groups=min(32, channels), rngs=rngs)
    self.classify = _dense(channels, num_classes, rngs=rngs, names=(None, None))

  def __call__(self, enc_out: dict, image_hw: tuple[int, int]) -> jax.Array:
    feats = enc_out["features"]
    if len(feats) != len(self.lateral):
      raise ConfigError("model.out_blocks", f"segmentation head needs {len(self.lateral)} feature maps, "
                                            f"encoder gives {len(feats)}")
    h, w = enc_out["grid"]
    levels = []
    for f, lat, s in zip(feats, self.lateral, self.scales):
      size = (max(1, round(h * s)), max(1, round(w * s)))
      levels.append(_resize(lat(f), size))
    for i in range(len(levels) - 2, -1, -1):  # top-down: coarse into fine
      levels[i] = levels[i] + _resize(levels[i + 1], levels[i].shape[1:3])
    finest = levels[0].shape[1:3]
    outs = [_resize(_apply_conv(conv, x), finest) for conv, x in zip(self.smooth, levels)]
    x = jax.nn.gelu(self.norm(_apply_conv(self.fuse, jnp.concatenate(outs, axis=-1))))
    return _resize(self.classify(x), image_hw)


class ClsHead(nnx.Module):
  def __init__(self, dim: int, num_classes: int, kind: str, hidden: int, *, rngs):
    self.hidden = _dense(2 * dim, hidden, rngs=rngs) if kind == "mlp" else None
    self.out = _dense(hidden if kind == "mlp" else 2 * dim, num_classes, rngs=rngs)

  def __call__(self, enc_out: dict, image_hw=None) -> jax.Array:
    x = pooled(enc_out)
    if self.hidden is not None:
      x = jax.nn.gelu(self.hidden(x))
    return self.out(x)


class BoxHead(nnx.Module):
  """One box per image: the centre is a soft-argmax over patch positions, the size comes from an MLP on
  [CLS || attention-pooled patches]; output (x_min, y_min, x_max, y_max) in [0, 1]."""

  def __init__(self, dim: int, hidden: int, *, rngs):
    self.attn = _dense(dim, 1, rngs=rngs)
    self.hidden = _dense(2 * dim, hidden, rngs=rngs)
    self.size = _dense(hidden, 2, rngs=rngs, names=(None, None))

  def __call__(self, enc_out: dict, image_hw=None) -> jax.Array:
    tokens = enc_out["patch_tokens"]
    weights = jax.nn.softmax(self.attn(tokens)[..., 0], axis=-1)  # [B, N]
    centre = weights @ patch_centres(*enc_out["grid"])  # [B, 2] (x, y)
    pooled_tokens = jnp.einsum("bn,bnd->bd", weights, tokens)
    feat = jax.nn.gelu(self.hidden(jnp.concatenate([enc_out["cls"], pooled_tokens], axis=-1)))
    half = jax.nn.sigmoid(self.size(feat)) / 2
    return jnp.clip(jnp.concatenate([centre - half, centre + half], axis=-1), 0.0, 1.0)


def patch_centres(h: int, w: int) -> jax.Array:
  """[h*w, 2] (x, y) centres of the patch grid in [0, 1], row-major."""
  ys, xs = jnp.meshgrid((jnp.arange(h) + 0.5) / h, (jnp.arange(w) + 0.5) / w, indexing="ij")
  return jnp.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1)


class PointHead(nnx.Module):
  """K landmarks (x, y) in [0, 1]: 'direct' regression or 'heatmap' soft-argmax."""

  def __init__(self, dim: int, num_points: int, kind: str, hidden: int, *, rngs):
    self.kind, self.k = kind, num_points
    if kind == "direct":
      self.hidden = _dense(2 * dim, hidden, rngs=rngs)
      self.out = _dense(hidden, 2 * num_points, rngs=rngs, names=(None, None))
    elif kind == "heatmap":
      self.out = _dense(dim, num_points, rngs=rngs)
    else:
      raise ConfigError("heads.reg_kind", f"unknown '{kind}'; use 'direct' or 'heatmap'")

  def __call__(self, enc_out: dict, image_hw=None) -> jax.Array:
    b = enc_out["cls"].shape[0]
    if self.kind == "direct":
      return jax.nn.sigmoid(self.out(jax.nn.gelu(self.hidden(pooled(enc_out))))).reshape(b, self.k, 2)
    h, w = enc_out["grid"]
    maps = self.out(enc_out["patch_tokens"]).reshape(b, h * w, self.k)
    prob = jax.nn.softmax(maps, axis=1)  # over positions
    return jnp.einsum("bnk,nc->bkc", prob, patch_centres(h, w))
