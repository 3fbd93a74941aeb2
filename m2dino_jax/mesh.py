"""The one mesh vocabulary: axes, logical-axis rules, presets and placement (models and trainers import it).

Mesh axes are always ('data', 'fsdp', 'expert', 'tensor'). Parameters name their dimensions
with logical axes (below); a preset maps each logical axis to mesh axes. Batches are split
over 'data', 'fsdp' and 'expert' (outside MoE layers the expert axis also carries batch, as in
MaxText); MoE layers re-split tokens over 'expert' themselves.

Logical axes used by parameters:
  embed   model width            mlp     FFN hidden width
  heads   attention q/k/v width  expert  expert index of MoE weights
  patch   flattened patch pixels task    per-task embeddings / biases
  norm    LayerNorm scale / bias (None)  replicated
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from m2dino_jax.errors import ConfigError

# The mesh axes by name (shard_map specs and collectives name them through these, never as literals).
DATA, FSDP, EXPERT, TENSOR = "data", "fsdp", "expert", "tensor"
MESH_AXES = (DATA, FSDP, EXPERT, TENSOR)
BATCH_AXES = (DATA, FSDP, EXPERT)

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Named presets: logical axis -> mesh axis / axes (None = replicated).
PRESETS: dict[str, Rules] = {
    # Pure data parallel: every parameter replicated, the batch split over all batch axes.
    "dp": (("batch", BATCH_AXES),),
    # Fully sharded data parallel: weights split along width over 'fsdp', hidden over 'tensor'.
    "fsdp": (("batch", BATCH_AXES), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
             ("expert", None)),
    # Expert parallel: experts over 'expert', the rest as fsdp.
    "ep": (("batch", BATCH_AXES), ("expert", "expert"), ("embed", "fsdp"), ("mlp", "tensor"),
           ("heads", "tensor")),
}


def get_rules(preset: str | Sequence) -> Rules:
  """Rules from a preset name, or passed through when already a rules sequence."""
  if isinstance(preset, str):
    if preset not in PRESETS:
      raise ConfigError("sharding", f"unknown preset '{preset}'; known: {', '.join(PRESETS)}")
    return PRESETS[preset]
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in preset)


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves the axis sizes (one may be -1 = fill) to a shape over MESH_AXES."""
  unknown = set(axes) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"mesh.{sorted(unknown)[0]}", f"unknown mesh axis; axes are {MESH_AXES}")
  sizes = [int(axes.get(a, 1)) for a in MESH_AXES]
  fills = [i for i, s in enumerate(sizes) if s == -1]
  if len(fills) > 1:
    raise ConfigError("mesh", "at most one axis may be -1 (fill)")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if any(s == 0 or s < -1 for s in sizes) or num_devices % fixed:
    raise ConfigError("mesh", f"axis sizes {dict(zip(MESH_AXES, sizes))} do not divide {num_devices} devices")
  if fills:
    sizes[fills[0]] = num_devices // fixed
  if int(np.prod(sizes)) != num_devices:
    raise ConfigError("mesh", f"axis sizes {dict(zip(MESH_AXES, sizes))} use {int(np.prod(sizes))} "
                      f"of {num_devices} devices")
  return tuple(sizes)


def make_mesh(axes: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """Builds a classic (Auto axis types) Mesh over MESH_AXES; default: all devices on 'data'."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(dict(axes or {"data": -1}), len(devices))
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    arr = np.array(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules) -> P:
  """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per spec."""
  if not names:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in names:
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def fit_spec(spec: P, shape, mesh: Mesh, what: str = "array", key: str = "sharding") -> P:
  """Drops mesh axes of size 1 and trailing Nones, so placed arrays carry the same canonical spec that jit
  gives its outputs (a different but equivalent spec would cost a recompilation of the next step). An axis
  that does not divide its dimension is a ConfigError naming `what` (a silent drop would replicate a weight
  the user asked to shard)."""
  out = []
  for d, (dim, entry) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    axes = tuple(a for a in ((entry,) if isinstance(entry, str) else tuple(entry or ())) if mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if dim % size:
      sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in axes)
      raise ConfigError(key, f"{what}: dimension {d} of shape {tuple(shape)} is not divisible by mesh axes "
                        f"{sizes}; change the mesh or the model size")
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _path_str(path) -> str:
  """'blocks/3/mlp/kernel' from a pytree path (the Variable's own '.value' attribute left out)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path
                  if not isinstance(k, jax.tree_util.GetAttrKey))


def state_shardings(state, mesh: Mesh, rules: Rules):
  """NamedShardings for an nnx.State (or abstract state) from its logical-axis metadata."""
  specs = nnx.get_partition_spec(state)

  def one(path, spec, leaf):
    return NamedSharding(mesh, fit_spec(logical_to_spec(tuple(spec), rules), np.shape(leaf), mesh,
                                        what=f"parameter '{_path_str(path)}'"))

  return jax.tree_util.tree_map_with_path(one, specs, state)


def shard_state(state, mesh: Mesh, rules: Rules):
  """Places every array of `state` according to its logical axes."""
  return jax.device_put(state, state_shardings(state, mesh, rules))


def batch_spec(ndim: int, rules: Rules) -> P:
  return logical_to_spec(("batch",) + (None,) * (ndim - 1), rules)


def batch_shardings(batch, mesh: Mesh, rules: Rules, global_scale: int = 1):
  """Shardings of a batch whose leading dim is split over the batch axes. `global_scale` multiplies the
  leading dim for the divisibility check (process-local data of a multi-process batch)."""
  def one(path, x):
    shape = (np.shape(x)[0] * global_scale,) + tuple(np.shape(x)[1:])
    return NamedSharding(mesh, fit_spec(batch_spec(np.ndim(x), rules), shape, mesh,
                                        what=f"batch '{_path_str(path)}'", key="data.batch_size"))
  return jax.tree_util.tree_map_with_path(one, batch)


def shard_batch(batch, mesh: Mesh, rules: Rules):
  """Global arrays from this process's slice of the batch (leading dim = local batch)."""
  shardings = batch_shardings(batch, mesh, rules, global_scale=jax.process_count())
  if jax.process_count() == 1:
    return jax.device_put(batch, shardings)
  return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)),
                      batch, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def axis_size(mesh, axis: str) -> int:
  """Size of `axis` in `mesh` (1 when there is no mesh or no such axis); works for abstract meshes."""
  if mesh is None or getattr(mesh, "empty", False) or axis not in mesh.axis_names:
    return 1
  return int(dict(zip(mesh.axis_names, mesh.axis_sizes))[axis])


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes that split a batch (outside MoE layers the expert axis carries batch too)."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)
