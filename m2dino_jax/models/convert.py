"""Weight import from HF transformers DINOv3 / DINOv2 checkpoints, and encoder save / load.

Sources: a HF checkpoint folder (config.json + *.safetensors), a lone .safetensors file plus a
config dict, or an in-memory state dict (torch tensors or NumPy arrays). Pickle is never executed:
we read safetensors, or `torch.load(weights_only=True)` for .bin/.pt files.

Layout changes: Linear weights [out, in] -> kernels [in, out]; the patch Conv2d [D, C, p, p] becomes
a dense kernel over patches flattened in (row, col, channel) order. A grey-input model (in_chans=1)
built from RGB weights sums the three patch-embedding channels, which gives the same output as
feeding the grey image replicated to three channels.

Our own encoder checkpoints (`save_encoder`) are an Orbax checkpoint of the Param state plus
`encoder.json` (the ViTConfig), or a safetensors file with our dotted parameter names. Meta DINOv2-format
`.pth` state dicts (UltraDINO's released weights) are read by `models/dinov2_pth.py`.

Every checkpoint knows its architecture (encoder.json, config.json, or the .pth shapes). The `init_from` policy
(`apply_init_from`, run by the trainers before the workdir's config check):
  init_from=PATH                              strict: every architecture field of the config must equal the
                                              checkpoint's, else a ConfigError naming the keys (model.rope_theta,
                                              model.norm_eps, model.num_registers, model.ffn, model.key_bias, ...
                                              sizes as model.variant) with both values;
  init_from=PATH + init_from_adopt=True       `adopt_architecture` writes the checkpoint's architecture into the
                                              config's `model` section before the model is built (the UltraDINO
                                              hand-off: a DINOv2-kind teacher into a DINOv3-kind config). It only
                                              reads the checkpoint, so a rerun of the same command adopts the same
                                              values and resumes.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from m2dino_jax import fileio
from m2dino_jax.errors import ConfigError, DataError
from m2dino_jax.models import dinov2_pth, vit

# Older HF / Meta-style names -> the transformers 5.x names we map from.
_ALIASES = (
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.mlp\.fc1\.", ".mlp.up_proj."),
    (r"\.mlp\.fc2\.", ".mlp.down_proj."),
    (r"\.mlp\.weights_out\.", ".mlp.down_proj."),
    (r"^model\.layer\.", "layer."),
    (r"^encoder\.layer\.", "layer."),
    (r"^layernorm\.", "norm."),
    (r"\.patch_embeddings\.projection\.", ".patch_embeddings."),
)
_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attention.q_proj": "attn.q", "attention.k_proj": "attn.k",
          "attention.v_proj": "attn.v", "attention.o_proj": "attn.o", "mlp.gate_proj": "mlp.gate",
          "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down"}


def _check_activation(hf: dict, gated: bool) -> None:
  """Our FFNs are a GELU MLP or a SiLU-gated SwiGLU: any other pairing would load and silently compute another
  function, so it is refused."""
  act, want = hf.get("hidden_act", "gelu"), "silu" if gated else "gelu"
  if act != want:
    kind = "a gated MLP" if gated else "a plain MLP"
    raise DataError("config.json", f"hidden_act {act!r} with {kind} is not implemented (only {want!r} is)")


def config_from_hf(hf: dict, **overrides) -> vit.ViTConfig:
  """Our ViTConfig from a transformers DINOv3ViTConfig / Dinov2Config dict (config.json)."""
  mtype = hf.get("model_type", "dinov3_vit")
  needed = ("hidden_size", "num_attention_heads", "num_hidden_layers") + (
      ("intermediate_size",) if str(mtype).startswith("dinov3") else ())
  missing = [k for k in needed if k not in hf]
  if missing:
    raise DataError("config.json", f"missing {', '.join(missing)} (not a DINOv3 / DINOv2 config?)")
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  common = dict(dim=d, depth=hf["num_hidden_layers"], heads=heads, patch=_int(hf.get("patch_size", 16)),
                num_registers=hf.get("num_register_tokens", 0), in_chans=hf.get("num_channels", 3),
                layerscale_init=hf.get("layerscale_value", 1.0))
  if mtype.startswith("dinov3"):
    cfg = dict(common, kind="dinov3", mlp_dim=hf["intermediate_size"],
               ffn="swiglu" if hf.get("use_gated_mlp") else "mlp", query_bias=hf.get("query_bias", True),
               key_bias=hf.get("key_bias", False), value_bias=hf.get("value_bias", True),
               proj_bias=hf.get("proj_bias", True), mlp_bias=hf.get("mlp_bias", True),
               norm_eps=hf.get("layer_norm_eps", 1e-5), rope_theta=hf.get("rope_theta", 100.0))
    _check_activation(hf, gated=bool(hf.get("use_gated_mlp")))
  elif mtype.startswith("dinov2"):
    hidden = int(d * hf.get("mlp_ratio", 4))
    swiglu = bool(hf.get("use_swiglu_ffn", False))
    if not swiglu:  # HF's DINOv2 SwiGLU FFN is SiLU whatever hidden_act says; its plain MLP follows hidden_act
      _check_activation(hf, gated=False)
    if swiglu:
      hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    qkv = hf.get("qkv_bias", True)
    cfg = dict(common, kind="dinov2", mlp_dim=hidden, ffn="swiglu" if swiglu else "mlp", query_bias=qkv,
               key_bias=qkv, value_bias=qkv, norm_eps=hf.get("layer_norm_eps", 1e-6),
               pos_grid=_int(hf.get("image_size", 518)) // common["patch"],
               pos_antialias=mtype == "dinov2_with_registers")
  else:
    raise DataError("config.json", f"unsupported model_type {mtype!r}; expected dinov3_vit or dinov2*")
  cfg.update(overrides)
  return vit.ViTConfig(**cfg)


def _int(v) -> int:
  return int(v[0] if isinstance(v, (list, tuple)) else v)


def _np(t) -> np.ndarray:
  if hasattr(t, "detach"):
    t = t.detach().cpu().float().numpy()
  return np.asarray(t, np.float32)


def normalise_names(state: dict) -> dict[str, np.ndarray]:
  """Maps HF / Meta-style names to one scheme; splits packed SwiGLU `weights_in` into gate and up."""
  out = {}
  for name, value in state.items():
    for pat, rep in _ALIASES:
      name = re.sub(pat, rep, name)
    arr = _np(value)
    if ".mlp.weights_in." in name:
      gate, up = np.split(arr, 2, axis=0)
      out[name.replace("weights_in", "gate_proj")] = gate
      out[name.replace("weights_in", "up_proj")] = up
      continue
    out[name] = arr
  return out


def hf_to_params(state: dict, cfg: vit.ViTConfig, source: str = "<state dict>") -> dict[str, np.ndarray]:
  """HF state dict -> {our dotted param name: array}. Raises DataError on missing or extra weights."""
  sd = normalise_names(state)
  used: set[str] = set()

  def take(name):
    if name not in sd:
      raise DataError(source, f"missing weight '{name}' for a {cfg.kind} encoder of depth {cfg.depth}")
    used.add(name)
    return sd[name]

  p = cfg.patch
  w = take("embeddings.patch_embeddings.weight")  # [D, C, p, p]
  if w.shape[1] != cfg.in_chans:
    if cfg.in_chans == 1:
      w = w.sum(axis=1, keepdims=True)
    else:
      raise DataError(source, f"patch embedding has {w.shape[1]} channels, model wants {cfg.in_chans}")
  params = {"patch_embed.kernel": w.transpose(2, 3, 1, 0).reshape(p * p * cfg.in_chans, cfg.dim),
            "patch_embed.bias": take("embeddings.patch_embeddings.bias"),
            "cls_token": take("embeddings.cls_token").reshape(1, 1, cfg.dim),
            "mask_token": take("embeddings.mask_token").reshape(1, 1, cfg.dim),
            "norm.scale": take("norm.weight"), "norm.bias": take("norm.bias")}
  if cfg.num_registers:
    params["register_tokens"] = take("embeddings.register_tokens")
  if cfg.kind == "dinov2":
    params["pos_embed"] = take("embeddings.position_embeddings")
  for i in range(cfg.depth):
    for hf_name, ours in _BLOCK.items():
      key = f"layer.{i}.{hf_name}"
      if hf_name == "mlp.gate_proj" and cfg.ffn != "swiglu":
        continue
      weight = take(key + ".weight")
      is_norm = hf_name.startswith("norm")
      params[f"blocks.{i}.{ours}.{'scale' if is_norm else 'kernel'}"] = weight if is_norm else weight.T
      if key + ".bias" in sd:
        params[f"blocks.{i}.{ours}.bias"] = take(key + ".bias")
    for j in (1, 2):
      key = f"layer.{i}.layer_scale{j}.lambda1"
      if cfg.layerscale_init is not None:
        params[f"blocks.{i}.ls{j}.gamma"] = take(key)
  extra = sorted(k for k in set(sd) - used - {"embeddings.position_ids"} if sd[k].size)
  if extra:
    raise DataError(source, f"unexpected weights for this config: {extra[:5]}")
  return params


def flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
  return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# Parameters a pretrained dense encoder cannot hold: the routers and task biases of MoE blocks made by upcycling
# (the experts themselves are copied from the dense FFN). Everything else must come from the checkpoint.
NEW_WITH_MOE = re.compile(r"blocks\.\d+\.mlp\.(router|task_bias)")


def assign(model: nnx.Module, params: dict[str, np.ndarray], source: str = "<params>", strict: bool = True,
           may_miss: re.Pattern | None = None):
  """Copies named arrays into `model` (shapes checked); `strict` requires every encoder param except those whose
  name matches `may_miss` in full (they keep their initial values)."""
  target = flat_params(model)
  for name, arr in params.items():
    if name not in target:
      raise DataError(source, f"weight '{name}' has no place in this model")
    if tuple(target[name].shape) != tuple(np.shape(arr)):
      raise DataError(source, f"weight '{name}' has shape {np.shape(arr)}, model wants {target[name].shape}")
    target[name].set_value(jax.numpy.asarray(arr, target[name].dtype))  # also over read-only host arrays
  missing = [n for n in target if n not in params and not (may_miss and may_miss.fullmatch(n))]
  if strict and missing:
    raise DataError(source, f"no value for {len(missing)} params, e.g. {missing[:3]}")
  return model


def read_hf(path) -> tuple[dict, dict]:
  """(state dict, config dict) from a HF folder, or a .safetensors file with config.json beside it."""
  path = Path(path)
  if not path.exists():
    raise DataError(path, "no such file or folder")
  folder = path if path.is_dir() else path.parent
  cfg_file = folder / "config.json"
  if not cfg_file.is_file():
    raise DataError(cfg_file, "no config.json beside the weights")
  hf_cfg = fileio.read_json(cfg_file, "HF config")
  if not isinstance(hf_cfg, dict):
    raise DataError(cfg_file, "not a HF model config (a JSON object expected)")
  files = [path] if path.is_file() else sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
  if not files:
    raise DataError(folder, "no *.safetensors (or *.bin) weights found")
  state = {}
  for f in files:
    state.update(read_weights(f))
  return state, hf_cfg


def read_weights(path) -> dict[str, np.ndarray]:
  path = Path(path)
  try:
    if path.suffix == ".safetensors":
      from safetensors.numpy import load_file
      return load_file(str(path))
    import pickle
    import warnings

    import torch  # only for .bin / .pt, never executing pickle code
    try:
      with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: one line is enough
        warnings.simplefilter("ignore")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
      raise DataError(path, "refused: loading it would run pickled code (only plain tensor files are read); "
                      "convert it to .safetensors where it came from") from None
    if not isinstance(state, dict):
      raise DataError(path, f"not a state dict (a {type(state).__name__})")
    return {k: _np(v) for k, v in state.items()}
  except DataError:
    raise
  except Exception as e:  # any failure to parse a weights file (truncated, not a weights file) is bad input
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise DataError(path, f"cannot read weights ({first})") from None


def encoder_from_hf(path_or_state, hf_config: dict | None = None, *, rngs: nnx.Rngs | None = None,
                    **overrides) -> vit.Encoder:
  """A ready encoder from a HF folder / file, or from (state dict, config dict)."""
  if isinstance(path_or_state, (str, Path)):
    state, hf_config = read_hf(path_or_state)
    source = str(path_or_state)
  else:
    state, source = path_or_state, "<state dict>"
  cfg = config_from_hf(hf_config, **overrides)
  model = vit.Encoder(cfg, rngs=rngs or nnx.Rngs(0))
  return assign(model, hf_to_params(state, cfg, source), source)


def save_encoder(model: vit.Encoder, out_dir, fmt: str = "orbax") -> Path:
  """Writes `encoder.json` and the params (Orbax folder `params/`, or `encoder.safetensors`)."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  arrays = {k: np.asarray(v[...]) for k, v in flat_params(model).items()}
  if fmt == "safetensors":
    from safetensors.numpy import save_file
    with fileio.atomic_path(out / "encoder.safetensors") as tmp:
      save_file(arrays, str(tmp))
  elif fmt == "orbax":
    import orbax.checkpoint as ocp
    target = (out / "params").resolve()
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(target, arrays, force=True)
  else:
    raise DataError(out, f"unknown format {fmt!r}; use orbax or safetensors")
  fileio.write_json(out / "encoder.json", dataclasses.asdict(model.cfg))
  return out


def load_encoder_params(path) -> tuple[vit.ViTConfig | None, dict[str, np.ndarray]]:
  """Reads our saved encoder (folder or .safetensors), a HF checkpoint or a DINOv2-format .pth; returns
  (config, params)."""
  path = Path(path)
  folder = path if path.is_dir() else path.parent
  ours = folder / "encoder.json"
  if ours.is_file():
    cfg = vit.ViTConfig(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in fileio.read_json(ours, "encoder config").items()})
    if (folder / "params").is_dir():
      import orbax.checkpoint as ocp
      with ocp.StandardCheckpointer() as ckptr:
        return cfg, dict(ckptr.restore((folder / "params").resolve()))
    return cfg, read_weights(folder / "encoder.safetensors")
  if path.suffix in (".pth", ".pt") and path.is_file():
    state = dinov2_pth.load_pth(path)
    cfg = dinov2_pth.config_from_state(state, str(path))
    return cfg, dinov2_pth.to_params(state, cfg, str(path))
  if (folder / "config.json").is_file():
    state, hf_cfg = read_hf(path)
    cfg = config_from_hf(hf_cfg)
    return cfg, hf_to_params(state, cfg, str(path))
  raise DataError(path, "not an encoder checkpoint: expected encoder.json, a HF config.json or a DINOv2 .pth")


def upcycle_moe(params: dict, model: vit.Encoder, source: str = "<params>") -> dict:
  """Sparse upcycling: the dense FFN weights of a block that is MoE in `model` become every expert's
  weights (router and task biases keep their initialisation). SwiGLU experts take [gate | up]."""
  params = dict(params)
  for i, block in enumerate(model.blocks):
    if not block.is_moe or f"blocks.{i}.mlp.up.kernel" not in params:
      continue
    moe = block.mlp
    e = moe.cfg.num_experts
    dense = {k.rsplit(".mlp.", 1)[1]: params.pop(k) for k in list(params) if k.startswith(f"blocks.{i}.mlp.")}
    w_in, b_in = dense["up.kernel"], dense.get("up.bias")
    if moe.cfg.activation == "swiglu":
      if "gate.kernel" not in dense:
        raise DataError(source, f"block {i}: SwiGLU experts need a SwiGLU dense FFN to upcycle from")
      w_in = np.concatenate([dense["gate.kernel"], w_in], axis=-1)
      b_in = None if b_in is None else np.concatenate([dense["gate.bias"], b_in], axis=-1)
    if tuple(w_in.shape) != tuple(moe.w_in.shape[1:]):
      raise DataError(source, f"block {i}: dense FFN {w_in.shape} does not fit experts {moe.w_in.shape[1:]}")
    prefix = f"blocks.{i}.mlp."
    params[prefix + "w_in"], params[prefix + "w_out"] = _tile(w_in, e), _tile(dense["down.kernel"], e)
    if b_in is not None:
      params[prefix + "b_in"], params[prefix + "b_out"] = _tile(b_in, e), _tile(dense["down.bias"], e)
  return params


def _tile(a: np.ndarray, n: int) -> np.ndarray:
  return np.broadcast_to(a, (n, *a.shape)).copy()


def init_encoder_from(model: vit.Encoder, path) -> vit.Encoder:
  """Loads saved weights into an existing encoder (architecture must match; grey from RGB allowed; dense
  FFNs upcycled into the MoE blocks)."""
  cfg, params = load_encoder_params(path)
  params = upcycle_moe(params, model, str(path))
  pe = params.get("patch_embed.kernel")
  want = model.cfg.patch * model.cfg.patch * model.cfg.in_chans
  if pe is not None and pe.shape[0] != want and model.cfg.in_chans == 1 and cfg is not None:
    params = dict(params, **{"patch_embed.kernel": pe.reshape(cfg.patch, cfg.patch, cfg.in_chans, -1)
                             .sum(axis=2).reshape(want, -1)})
  try:
    return assign(model, params, str(path), may_miss=NEW_WITH_MOE)
  except DataError as e:
    diff = architecture_diff(model.cfg, cfg) if cfg is not None else {}
    if not diff:
      raise
    what = ", ".join(f"{k}: model {a!r} vs checkpoint {b!r}" for k, (a, b) in diff.items())
    raise DataError(path, f"{str(e).split(': ', 1)[-1]}; the architectures differ ({what}); build the model from the "
                    f"checkpoint's (--config.init_from_adopt=True, convert.adopt_architecture)") from None


# The ViTConfig fields that the weights or the forward of a checkpoint fix; the rest (in_chans, drop_path,
# dtype, out_blocks, pos_embed_rescale, the LayerScale init value) are the run's own.
ARCH_FIELDS = ("kind", "dim", "depth", "heads", "mlp_dim", "ffn", "patch", "num_registers", "query_bias",
               "key_bias", "value_bias", "proj_bias", "mlp_bias", "norm_eps")
KIND_FIELDS = {"dinov2": ("pos_grid", "pos_antialias"), "dinov3": ("rope_theta",)}


def architecture_diff(model_cfg: vit.ViTConfig, ckpt_cfg: vit.ViTConfig) -> dict[str, tuple]:
  """{field: (model value, checkpoint value)} of the architecture fields that differ."""
  out = {f: (getattr(model_cfg, f), getattr(ckpt_cfg, f))
         for f in ARCH_FIELDS + KIND_FIELDS.get(ckpt_cfg.kind, ())
         if getattr(model_cfg, f) != getattr(ckpt_cfg, f)}
  if (model_cfg.layerscale_init is None) != (ckpt_cfg.layerscale_init is None):
    out["layerscale_init"] = (model_cfg.layerscale_init, ckpt_cfg.layerscale_init)
  return out


def checkpoint_config(path) -> vit.ViTConfig:
  """The architecture stored with a checkpoint (encoder.json, HF config.json, or read off a DINOv2 .pth)."""
  path = Path(path)
  folder = path if path.is_dir() else path.parent
  if (folder / "encoder.json").is_file():
    return vit.ViTConfig(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in fileio.read_json(folder / "encoder.json", "encoder config").items()})
  if path.suffix in (".pth", ".pt") and path.is_file():
    return dinov2_pth.config_from_state(dinov2_pth.load_pth(path), str(path))
  if (folder / "config.json").is_file():
    return config_from_hf(fileio.read_json(folder / "config.json", "HF config"))
  if not path.exists():
    raise DataError(path, "no such checkpoint (init_from)")
  raise DataError(path, "not an encoder checkpoint: expected encoder.json, a HF config.json or a DINOv2 .pth")


def adopt_architecture(model_config, path, *, verbose: bool = True) -> dict[str, tuple]:
  """Sets the architecture fields of a config's `model` section (a ConfigDict, locked or not) to those of the
  checkpoint at `path`, keeping the run's own settings (in_chans, out_blocks, drop_path, dtype, ...). The
  variant name follows when the sizes are a known variant. Returns {field: (old, new)} of what changed."""
  ckpt = checkpoint_config(path)
  ours = vit.ViTConfig.from_config(model_config)
  diff = architecture_diff(ours, ckpt)
  if not diff:
    return {}
  sizes = (ckpt.dim, ckpt.depth, ckpt.heads, ckpt.mlp_dim)
  name = next((n for n, v in vit.VARIANTS.items() if tuple(v) == sizes), None)
  with model_config.unlocked():
    if "variant" in model_config:
      model_config.variant = f"{name}/{ckpt.patch}" if name else ""
    base = vit.ViTConfig.from_config(model_config)
    for field in diff.keys() | set(ARCH_FIELDS + KIND_FIELDS.get(ckpt.kind, ())):
      if field in model_config or getattr(base, field) != getattr(ckpt, field):
        model_config[field] = getattr(ckpt, field)
  if verbose:
    print(f"[init_from] model architecture taken from {path}: "
          + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items()), file=sys.stderr)
  return diff


_SIZE_FIELDS = ("dim", "depth", "heads", "mlp_dim", "patch")


def _config_key(model_config, field: str) -> str:
  """The config key that sets `field`: the sizes come from `model.variant` unless given field by field."""
  if field in _SIZE_FIELDS and field not in model_config and model_config.get("variant"):
    return "model.variant"
  return f"model.{field}"


def check_architecture(model_config, path) -> None:
  """Refuses a config whose encoder architecture differs from the checkpoint's at `path`: a ConfigError naming
  every differing config key with the config's and the checkpoint's values."""
  diff = architecture_diff(vit.ViTConfig.from_config(model_config), checkpoint_config(path))
  if not diff:
    return
  keys = list(dict.fromkeys(_config_key(model_config, f) for f in diff))
  listed = "; ".join(f"{_config_key(model_config, f)}"
                     + ("" if _config_key(model_config, f).endswith(f".{f}") else f" ({f})")
                     + f": config {a!r}, checkpoint {b!r}" for f, (a, b) in diff.items())
  raise ConfigError(", ".join(keys), f"differs from the init_from checkpoint {path} ({listed}); set the config to "
                    "the checkpoint's values, or pass --config.init_from_adopt=True to build the model with the "
                    "checkpoint's architecture")


def apply_init_from(config, *, verbose: bool = True) -> dict[str, tuple]:
  """The `init_from` policy on a run's config, before its model is built and before the workdir's config check:
  strict by default (`check_architecture`), or with `init_from_adopt=True` the checkpoint's architecture written
  into `config.model` (`adopt_architecture`; deterministic, so a rerun of the same command resumes). Returns
  {field: (old, new)} of what adoption changed ({} when strict or nothing differed). Idempotent."""
  path = config.get("init_from", "")
  adopt = config.get("init_from_adopt", False)
  if not isinstance(adopt, bool):
    raise ConfigError("init_from_adopt", f"{adopt!r} is not True or False")
  if not path:
    if adopt:
      raise ConfigError("init_from_adopt", "is True but init_from is empty: there is no checkpoint to adopt")
    return {}
  if adopt:
    return adopt_architecture(config.model, path, verbose=verbose)
  check_architecture(config.model, path)
  return {}
