"""Mixed precision for the encoder's matmuls: bf16 inputs, fp32 accumulation and fp32 results.

`model.dtype = "bfloat16"` runs the encoder's linear layers (patch embedding, q / k / v / o, MLP) with
bf16 operands and fp32 accumulation, and the two attention matmuls too on accelerators (on CPU the
attention core stays fp32: see `vit._attention_dtype`). Everything else
(residual stream, layer norms, softmax, GELU, MoE experts, heads, losses) and the parameters and optimiser
state stay fp32, so no loss scaling is needed. `"float32"` leaves every op as it is (exact fp32).

The backward pass is written by hand (`custom_vjp`): the cotangent is rounded to bf16 once and both
gradient matmuls take bf16 operands with fp32 results (see `matmul` for the weight gradient's layout).
Autodiff of a dot with `preferred_element_type` would instead pair an fp32 cotangent with a bf16
operand, which XLA runs as an fp32 matmul: two thirds of the FLOPs would not use bf16. The residuals
saved for the backward are the bf16 operands (half the memory of fp32 activations).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from m2dino_jax.errors import ConfigError

COMPUTE_DTYPES = ("float32", "bfloat16")


def check_dtype(dtype: str, key: str = "model.dtype") -> str:
  if dtype not in COMPUTE_DTYPES:
    raise ConfigError(key, f"'{dtype}' is not one of {COMPUTE_DTYPES} (bfloat16: bf16 matmul inputs, fp32 "
                           "accumulation, fp32 parameters)")
  return dtype


def is_mixed(dtype) -> bool:
  return dtype is not None and jnp.dtype(dtype) != jnp.float32


def _grad_specs(spec: str) -> tuple[str, str]:
  """'ab,bc->ac' -> ('ac,bc->ab', 'ab,ac->bc'): the einsums of both operand gradients. Valid for
  (batched) matmul-like specs, where every index appears in at least two of the three terms."""
  ins, out = spec.replace(" ", "").split("->")
  a, b = ins.split(",")
  for idx in set(a + b + out):
    if (idx in a) + (idx in b) + (idx in out) < 2:
      raise ValueError(f"'{spec}' is not matmul-like: index '{idx}' must appear in two or three terms")
  return f"{out},{b}->{a}", f"{a},{out}->{b}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _einsum(spec: str, a, b, dtype):
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _einsum_fwd(spec, a, b, dtype):
  a_c, b_c = a.astype(dtype), b.astype(dtype)
  out = jnp.einsum(spec, a_c, b_c, preferred_element_type=jnp.float32)
  # the primal dtypes travel as empty arrays (residuals must be arrays)
  return out, (a_c, b_c, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _einsum_bwd(spec, dtype, res, g):
  a_c, b_c, a_like, b_like = res
  spec_a, spec_b = _grad_specs(spec)
  g_c = g.astype(dtype)
  da = jnp.einsum(spec_a, g_c, b_c, preferred_element_type=jnp.float32)
  db = jnp.einsum(spec_b, a_c, g_c, preferred_element_type=jnp.float32)
  return da.astype(a_like.dtype), db.astype(b_like.dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype=None) -> jax.Array:
  """A two-operand matmul-like einsum; with a mixed `dtype` (bf16) the operands are rounded to it and the
  result (and both gradients) accumulate in fp32. `dtype` None / float32: a plain einsum."""
  if not is_mixed(dtype):
    return jnp.einsum(spec, a, b)
  _grad_specs(spec)  # fail at trace time on a spec the custom backward cannot invert
  return _einsum(spec, a, b, np.dtype(jnp.dtype(dtype)))


def matmul(x: jax.Array, kernel: jax.Array, dtype=None) -> jax.Array:
  """x [..., K] @ kernel [K, C]. fp32: the same dot as nnx.Linear. Mixed: a bf16 matmul with fp32
  accumulation; inputs of rank >= 3 are viewed as [N, T, K], so that the weight gradient contracts two
  dimensions ('ntk,ntc->kc'): XLA:CPU then lays the activations out transposed once and runs its bf16
  library matmul, where a one-dimension contraction over the rows ('mk,mc->kc') falls back to a 2-3x
  slower fp32 matmul."""
  if not is_mixed(dtype):
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
  if x.ndim >= 3:
    y = einsum("ntk,kc->ntc", x.reshape(-1, *x.shape[-2:]), kernel, dtype)
  else:
    y = einsum("mk,kc->mc", x.reshape(-1, x.shape[-1]), kernel, dtype)
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


def linear(layer, x: jax.Array, dtype=None) -> jax.Array:
  """An nnx.Linear applied to x [..., K]: the layer itself in fp32; with a mixed dtype, `matmul` plus the
  fp32 bias."""
  if not is_mixed(dtype):
    return layer(x)
  y = matmul(x, layer.kernel[...], dtype)
  if layer.bias is not None:
    y = y + layer.bias[...].astype(y.dtype)
  return y
