"""DINO projection head (shared by the DINO CLS loss and the iBOT patch loss, as in UltraDINO).

  x -> Linear(D, hidden) GELU -> Linear(hidden, hidden) GELU -> Linear(hidden, bottleneck)   (nlayers = 3)
    -> L2 normalise -> weight-normalised bias-free Linear(bottleneck, K prototypes)

The prototype layer is `weight_norm(Linear)` as in DINOv2: kernel = g * v / ||v|| per prototype (column),
with g initialised to 1. Trunc-normal(0.02) init for the MLP, zero biases. Runs in float32 whatever the
encoder's compute dtype (the softmax over 65,536 prototypes is sensitive).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


class DINOHead(nnx.Module):

  def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
               nlayers: int = 3, *, rngs: nnx.Rngs):
    init = nnx.initializers.truncated_normal(0.02)
    dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
      names = ("embed", "mlp" if len(dims) > 2 else None) if i == 0 else ("mlp", None)
      layers.append(nnx.Linear(a, b, kernel_init=nnx.with_partitioning(init, names),
                               bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]),
                               rngs=rngs))
    self.mlp = nnx.List(layers)
    v = init(rngs.params(), (bottleneck_dim, out_dim))
    self.last_v = nnx.Param(v, sharding_names=(None, "vocab"))
    self.last_g = nnx.Param(jnp.ones((out_dim,), jnp.float32), sharding_names=("vocab",))

  def __call__(self, x):
    x = x.astype(jnp.float32)
    for i, layer in enumerate(self.mlp):
      x = layer(x)
      if i < len(self.mlp) - 1:
        x = nnx.gelu(x, approximate=False)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize eps
    v = self.last_v[...]
    w = v * (self.last_g[...] / jnp.linalg.norm(v, axis=0))
    return x @ w
