"""Frozen-encoder features (`trainer = "features"` in configs/features.py): runs the encoder over images
and saves CLS / patch features (for probes, retrieval, or a quick check of imported weights). By default
it reads the real ultrasound DICOM frames bundled with pydicom.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from m2dino_jax import fileio
from m2dino_jax.data import imageio
from m2dino_jax.errors import DataError
from m2dino_jax.models import convert, vit

US_FILES = ("US1_UNCR.dcm", "gdcm-US-ALOKA-16.dcm", "OBXXXX1A.dcm")


def load_images(source: str) -> list[tuple[str, np.ndarray]]:
  """(name, grey float image) pairs from a folder, or pydicom's bundled ultrasound files."""
  if not source:
    from pydicom.data import get_testdata_file
    paths = [Path(p) for p in (get_testdata_file(n) for n in US_FILES) if p]
  else:
    paths = sorted(p for p in Path(source).iterdir() if p.suffix.lower() in (".dcm", ".png", ".jpg", ".jpeg"))
    if not paths:
      raise DataError(source, "no .dcm/.png/.jpg images found")
  out = []
  for p in paths:
    frames = imageio.iter_dicom_frames(p) if p.suffix.lower() == ".dcm" else [imageio.read_image(p)]
    out += [(f"{p.name}#{i}", (f.mean(axis=-1) if f.ndim == 3 else f).astype(np.float32))
            for i, f in enumerate(frames)]
  return out


def preprocess(img: np.ndarray, size: int) -> np.ndarray:
  lo, hi = float(img.min()), float(img.max())
  img = (img - lo) / max(hi - lo, 1e-6)
  img = np.asarray(Image.fromarray(img.astype(np.float32)).resize((size, size), Image.BILINEAR))
  return ((img - 0.1842924807) / 0.2187705424)[..., None].astype(np.float32)


def resolve_config(config) -> None:
  """The `init_from` policy (convert.apply_init_from): the architecture must match, or init_from_adopt takes it."""
  convert.apply_init_from(config)


def train_and_evaluate(config, workdir: str) -> dict:
  resolve_config(config)
  cfg = vit.ViTConfig.from_config(config.model)
  model = vit.Encoder(cfg, rngs=nnx.Rngs(config.seed))
  if config.init_from:
    convert.init_encoder_from(model, config.init_from)
  images = load_images(config.input)
  batch = np.stack([preprocess(im, config.image_size) for _, im in images])
  if cfg.in_chans == 3:
    batch = np.repeat(batch, 3, axis=-1)
  gdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: {k: v for k, v in nnx.merge(gdef, s)(x).items() if k != "grid"})
  t0 = time.perf_counter()
  jax.block_until_ready(fwd(state, jnp.asarray(batch[: config.batch_size])))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  outs = [jax.device_get(fwd(state, jnp.asarray(batch[i:i + config.batch_size])))
          for i in range(0, len(batch), config.batch_size)]
  run_s = time.perf_counter() - t0
  cls = np.concatenate([o["cls"] for o in outs])
  patches = np.concatenate([o["patch_tokens"] for o in outs])
  out = Path(workdir)
  with fileio.atomic_path(out / "features.npz") as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, cls=cls, patch_tokens=patches, names=np.array([n for n, _ in images]))
  summary = {"images": len(images), "cls": list(cls.shape), "patch_tokens": list(patches.shape),
             "features": [list(f.shape[1:]) for f in outs[0]["features"]], "compile_s": round(compile_s, 2),
             "images_per_s": round(len(images) / run_s, 2)}
  fileio.write_json(out / "features.json", summary)
  print(f"encoder {config.model.variant} on {len(images)} real ultrasound frames at {config.image_size}px")
  for k, v in summary.items():
    print(f"  {k:14s} {v}")
  return summary
