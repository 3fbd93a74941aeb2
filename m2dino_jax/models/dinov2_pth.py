"""Meta DINOv2-format state dicts (UltraDINO's released `.pth`): import into our encoder, and export.

Layout (dinov2/models/vision_transformer.py), after stripping a `teacher.backbone.` / `student.backbone.` /
`backbone.` / `module.` prefix:
  patch_embed.proj.weight [D, C, p, p], .bias; cls_token [1, 1, D]; pos_embed [1, 1 + g*g, D];
  register_tokens [1, R, D]; mask_token [1, D]; norm.weight / .bias;
  blocks.{i}.norm1 / norm2, attn.qkv.weight [3D, D] (fused q | k | v), attn.qkv.bias, attn.proj,
  ls1.gamma / ls2.gamma, mlp.fc1 / mlp.fc2.
Training checkpoints with `block_chunks` (FSDP) name blocks `blocks.{chunk}.{i}.`: the inner index is the
global block index (the chunks are padded with Identity), so they are read as `blocks.{i}.`.
The architecture can be read off the state dict (`config_from_state`): width, depth, patch, channels,
registers, position grid, FFN width, qkv bias and LayerScale from the shapes; heads from the width
(the DINOv2 sizes: 384 -> 6, 768 -> 12, 1024 -> 16, ...).
Pickles are never executed: `torch.load(weights_only=True)` refuses anything but tensors and containers.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from m2dino_jax.errors import DataError
from m2dino_jax.models import vit

PREFIXES = ("teacher.backbone.", "student.backbone.", "backbone.", "module.")
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _np(t) -> np.ndarray:
  if hasattr(t, "detach"):
    t = t.detach().cpu().float().numpy()
  return np.asarray(t, np.float32)


def load_pth(path) -> dict[str, np.ndarray]:
  """The state dict of a DINOv2-format checkpoint (a `{'teacher': {...}}` wrapper is unwrapped)."""
  import pickle

  import torch
  try:
    obj = torch.load(Path(path), map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as e:
    raise DataError(path, f"refused or unreadable checkpoint (only plain tensors are loaded): "
                    f"{str(e).splitlines()[0]}") from None
  if isinstance(obj, dict) and "teacher" in obj and isinstance(obj["teacher"], dict):
    obj = {"teacher." + k: v for k, v in obj["teacher"].items()}
  if not isinstance(obj, dict):
    raise DataError(path, f"expected a state dict, got {type(obj).__name__}")
  return {k: _np(v) for k, v in obj.items()}


def strip_prefix(state: dict) -> dict:
  """Drops the first known prefix (`teacher.backbone.`, ...) and un-chunks `blocks.{chunk}.{i}.` names."""
  for prefix in PREFIXES:
    if any(k.startswith(prefix) for k in state):
      state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
      break
  return {_CHUNKED.sub(r"blocks.\1.", k): v for k, v in state.items()}


def config_from_state(state: dict, source: str = "<state dict>", **overrides) -> vit.ViTConfig:
  """The `kind='dinov2'` ViTConfig of a DINOv2-format state dict, read off its shapes (`overrides` win)."""
  sd = strip_prefix(state)
  for name in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.mlp.fc1.weight"):
    if name not in sd:
      what = "SwiGLU FFNs are not supported" if name.startswith("blocks.0.mlp") and any(
          ".mlp.w12." in k for k in sd) else f"no '{name}'"
      raise DataError(source, f"not a DINOv2 ViT state dict ({what})")
  w = np.shape(sd["patch_embed.proj.weight"])  # [D, C, p, p]
  dim = int(w[0])
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.endswith(".norm1.weight"))
  grid = int(round(np.sqrt(np.shape(sd["pos_embed"])[1] - 1)))
  heads = {d: h for d, h in ((v[0], v[2]) for v in vit.VARIANTS.values())} | {1536: 24}
  cfg = dict(kind="dinov2", dim=dim, depth=depth, heads=heads.get(dim, 0), mlp_dim=int(np.shape(
      sd["blocks.0.mlp.fc1.weight"])[0]), patch=int(w[-1]), in_chans=int(w[1]),
      num_registers=int(np.shape(sd["register_tokens"])[1]) if "register_tokens" in sd else 0,
      pos_grid=grid, norm_eps=1e-6, layerscale_init=1e-5 if "blocks.0.ls1.gamma" in sd else None)
  qkv = "blocks.0.attn.qkv.bias" in sd
  cfg.update(query_bias=qkv, key_bias=qkv, value_bias=qkv)
  cfg.update(overrides)
  if not cfg["heads"]:
    raise DataError(source, f"cannot tell the number of heads of a width-{dim} encoder; give heads=")
  return vit.ViTConfig(**cfg)


def to_params(state: dict, cfg: vit.ViTConfig, source: str = "<state dict>") -> dict[str, np.ndarray]:
  """DINOv2 state dict -> {our dotted param name: array} for a `kind='dinov2'` encoder."""
  sd = strip_prefix(state)
  d, p = cfg.dim, cfg.patch

  def take(name):
    if name not in sd:
      raise DataError(source, f"missing weight '{name}' for a dinov2 encoder of depth {cfg.depth}")
    return np.asarray(sd.pop(name), np.float32)

  w = take("patch_embed.proj.weight")
  if w.shape[1] != cfg.in_chans:
    if cfg.in_chans != 1:
      raise DataError(source, f"patch embedding has {w.shape[1]} channels, model wants {cfg.in_chans}")
    w = w.sum(axis=1, keepdims=True)
  out = {"patch_embed.kernel": w.transpose(2, 3, 1, 0).reshape(p * p * cfg.in_chans, d),
         "patch_embed.bias": take("patch_embed.proj.bias"), "cls_token": take("cls_token").reshape(1, 1, d),
         "mask_token": take("mask_token").reshape(1, 1, d), "pos_embed": take("pos_embed"),
         "norm.scale": take("norm.weight"), "norm.bias": take("norm.bias")}
  if cfg.num_registers:
    out["register_tokens"] = take("register_tokens")
  for i in range(cfg.depth):
    b = f"blocks.{i}."
    qkv_w, qkv_b = take(b + "attn.qkv.weight"), sd.pop(b + "attn.qkv.bias", None)
    for j, name in enumerate("qkv"):
      out[f"{b}attn.{name}.kernel"] = qkv_w[j * d:(j + 1) * d].T
      if qkv_b is not None and getattr(cfg, {"q": "query", "k": "key", "v": "value"}[name] + "_bias"):
        out[f"{b}attn.{name}.bias"] = np.asarray(qkv_b[j * d:(j + 1) * d], np.float32)
    pairs = (("attn.proj", "attn.o"), ("mlp.fc1", "mlp.up"), ("mlp.fc2", "mlp.down"))
    for theirs, ours in pairs:
      out[f"{b}{ours}.kernel"] = take(f"{b}{theirs}.weight").T
      out[f"{b}{ours}.bias"] = take(f"{b}{theirs}.bias")
    for j in (1, 2):
      out[f"{b}norm{j}.scale"], out[f"{b}norm{j}.bias"] = take(f"{b}norm{j}.weight"), take(f"{b}norm{j}.bias")
      if cfg.layerscale_init is not None:
        out[f"{b}ls{j}.gamma"] = take(f"{b}ls{j}.gamma")
  extra = sorted(k for k in sd if not k.startswith(("dino_head.", "ibot_head.")))
  if extra:
    raise DataError(source, f"unexpected weights for this config: {extra[:5]}")
  return out


def from_params(params: dict[str, np.ndarray], cfg: vit.ViTConfig, prefix: str = "teacher.backbone.") -> dict:
  """Our dotted params -> a DINOv2-layout state dict of NumPy arrays (the inverse of `to_params`)."""
  d, p = cfg.dim, cfg.patch
  a = {k: np.asarray(v, np.float32) for k, v in params.items()}
  sd = {"patch_embed.proj.weight": a["patch_embed.kernel"].reshape(p, p, cfg.in_chans, d).transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": a["patch_embed.bias"], "cls_token": a["cls_token"],
        "mask_token": a["mask_token"].reshape(1, d), "pos_embed": a["pos_embed"],
        "norm.weight": a["norm.scale"], "norm.bias": a["norm.bias"]}
  if cfg.num_registers:
    sd["register_tokens"] = a["register_tokens"]
  for i in range(cfg.depth):
    b = f"blocks.{i}."
    sd[b + "attn.qkv.weight"] = np.concatenate([a[f"{b}attn.{n}.kernel"].T for n in "qkv"])
    sd[b + "attn.qkv.bias"] = np.concatenate([a.get(f"{b}attn.{n}.bias", np.zeros(d, np.float32)) for n in "qkv"])
    for theirs, ours in (("attn.proj", "attn.o"), ("mlp.fc1", "mlp.up"), ("mlp.fc2", "mlp.down")):
      sd[f"{b}{theirs}.weight"], sd[f"{b}{theirs}.bias"] = a[f"{b}{ours}.kernel"].T, a[f"{b}{ours}.bias"]
    for j in (1, 2):
      sd[f"{b}norm{j}.weight"], sd[f"{b}norm{j}.bias"] = a[f"{b}norm{j}.scale"], a[f"{b}norm{j}.bias"]
      if cfg.layerscale_init is not None:
        sd[f"{b}ls{j}.gamma"] = a[f"{b}ls{j}.gamma"]
  return {prefix + k: np.ascontiguousarray(v) for k, v in sd.items()}


def save_pth(model: vit.Encoder, path, prefix: str = "teacher.backbone.") -> Path:
  import torch

  from m2dino_jax.models import convert
  params = {k: np.asarray(v[...]) for k, v in convert.flat_params(model).items()}
  sd = {k: torch.from_numpy(v.copy()) for k, v in from_params(params, model.cfg, prefix).items()}
  path = Path(path)
  torch.save(sd, path)
  return path


def encoder_from_pth(path, cfg: vit.ViTConfig | None = None, *, seed: int = 0) -> vit.Encoder:
  """A ready `kind='dinov2'` encoder from a DINOv2 / UltraDINO `.pth` (architecture from `cfg`, or read off the
  state dict)."""
  from flax import nnx

  from m2dino_jax.models import convert
  state = load_pth(path)
  cfg = cfg or config_from_state(state, str(path))
  model = vit.Encoder(cfg, rngs=nnx.Rngs(seed))
  return convert.assign(model, to_params(state, cfg, str(path)), str(path))
