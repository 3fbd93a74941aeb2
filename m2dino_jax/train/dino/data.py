"""Unlabelled multi-crop data for DINOv2 pretraining, on Grain.

Sources (config.data.sources, ';'-separated `spec=weight`, mixed by weight):
  synthetic            the simulator's images of config.data.synthetic_tasks (labels dropped)
  folder:PATH          the unlabelled adapter: PNG / JPG / DICOM (multi-frame cine: every frame) under PATH
Stream (one per process, checkpointable through grain.checkpoint):
  per source: indices of this process's shard -> shuffle -> repeat -> draw a per-image seed
  mix(weights) -> batch(per-process batch) -> map(multi-crop + block masks)
A batch is {"global": [B, 2, G, G, C], "local": [B, L, l, l, C], "masks": [B, 2, N]} (image-major, so every
crop of an image lands on the image's device); an example is a pure function of (record, seed).

Augmentations (DINOv2 DataAugmentationDINO, adapted to grey ultrasound): RandomResizedCrop (bicubic) with
scale (0.32, 1) for the 2 global and (0.05, 0.32) for the local crops, flip 0.5, brightness / contrast
jitter 0.4 with p 0.8 (saturation / hue / grey-scale are identities on grey), Gaussian blur sigma 0.1-2
(global 1: p 1.0, global 2: p 0.1, local: p 0.5), solarize (global 2, p 0.2), UltraDINO normalisation.
Block masks: DINOv2's MaskingGenerator and collate: int(2B * mask_probability) of the global crops get
a mask whose target size is drawn from consecutive slices of linspace(ratio_min, ratio_max).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import grain
import numpy as np
from PIL import Image, ImageFilter

from m2dino_jax.data import transforms
from m2dino_jax.errors import ConfigError, DataError

# ----------------------------------------------------------------------------- crops


def to_grey_uint8(image) -> np.ndarray:
  a = np.asarray(image)
  if a.ndim == 3:
    a = a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) if a.shape[-1] >= 3 \
        else a[..., 0]
  if a.dtype != np.uint8:
    a = np.asarray(a, np.float32)
    if a.max(initial=0.0) <= 1.0:
      a = a * 255.0
    a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
  return a


def random_resized_crop_box(rng: np.random.Generator, h: int, w: int, scale, ratio=(3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop.get_params: (x0, y0, x1, y1)."""
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    ar = math.exp(rng.uniform(*log_ratio))
    cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
    if 0 < cw <= w and 0 < ch <= h:
      y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      return x0, y0, x0 + cw, y0 + ch
  in_ratio = w / h
  if in_ratio < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif in_ratio > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  y0, x0 = (h - ch) // 2, (w - cw) // 2
  return x0, y0, x0 + cw, y0 + ch


def make_crop(img: Image.Image, rng: np.random.Generator, size: int, scale, blur_p: float,
              solarize_p: float, aug) -> np.ndarray:
  """One augmented crop, float32 [size, size] normalised."""
  box = random_resized_crop_box(rng, img.height, img.width, scale)
  crop = img.resize((size, size), Image.BICUBIC, box=box)
  if rng.random() < 0.5:
    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
  if rng.random() < blur_p:
    crop = crop.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.1, 2.0))))
  x = np.asarray(crop, np.float32) / 255.0
  if rng.random() < aug.jitter_p:
    b = rng.uniform(max(0.0, 1 - aug.brightness), 1 + aug.brightness)
    c = rng.uniform(max(0.0, 1 - aug.contrast), 1 + aug.contrast)
    ops = [lambda y: y * b, lambda y: (y - y.mean()) * c + y.mean()]
    for k in rng.permutation(2):
      x = np.clip(ops[k](x), 0.0, 1.0)
  if rng.random() < solarize_p:
    x = np.where(x >= 0.5, 1.0 - x, x)
  return (x - transforms.ULTRADINO_MEAN) / transforms.ULTRADINO_STD


class MultiCrop:
  """record image -> {"global": [2, G, G, C], "local": [L, l, l, C]}."""

  def __init__(self, cfg):
    self.cfg = cfg

  def __call__(self, image, rng: np.random.Generator) -> dict:
    c = self.cfg
    img = Image.fromarray(to_grey_uint8(image), mode="L")
    g1 = make_crop(img, rng, c.global_size, c.global_scale, 1.0, 0.0, c.aug)
    g2 = make_crop(img, rng, c.global_size, c.global_scale, 0.1, c.aug.solarize_p, c.aug)
    loc = [make_crop(img, rng, c.local_size, c.local_scale, 0.5, 0.0, c.aug) for _ in range(c.num_local)]
    chans = int(c.channels)
    out = {"global": np.repeat(np.stack([g1, g2])[..., None], chans, -1).astype(np.float32)}
    loc_arr = np.stack(loc) if loc else np.zeros((0, c.local_size, c.local_size), np.float32)
    out["local"] = np.repeat(loc_arr[..., None], chans, -1).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- block masks


class MaskingGenerator:
  """DINOv2 / BEiT block masking on an (h, w) patch grid."""

  def __init__(self, grid: tuple[int, int], max_num_patches: int, min_num_patches: int = 4,
               min_aspect: float = 0.3):
    self.height, self.width = grid
    self.min_num_patches, self.max_num_patches = min_num_patches, max_num_patches
    self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

  def _mask(self, mask, max_mask, rng):
    delta = 0
    for _ in range(10):
      target = self.min_num_patches + (max_mask - self.min_num_patches) * rng.random()  # random.uniform
      ar = math.exp(rng.uniform(*self.log_aspect))
      h, w = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
      if w < self.width and h < self.height:
        top, left = int(rng.integers(0, self.height - h + 1)), int(rng.integers(0, self.width - w + 1))
        region = mask[top:top + h, left:left + w]
        if 0 < h * w - region.sum() <= max_mask:
          delta += int(h * w - region.sum())
          region[...] = True
        if delta > 0:
          break
    return delta

  def __call__(self, num: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((self.height, self.width), bool)
    count = 0
    while count < num:
      delta = self._mask(mask, min(num - count, self.max_num_patches), rng)
      if delta == 0:
        break
      count += delta
    return mask


def collate_masks(n_crops: int, grid: tuple[int, int], probability: float, ratio, rng) -> np.ndarray:
  """[n_crops, h*w] masks: int(n_crops * probability) masked crops with ratios spread over `ratio`."""
  n = grid[0] * grid[1]
  gen = MaskingGenerator(grid, max_num_patches=int(0.5 * n))
  n_masked = int(n_crops * probability)
  probs = np.linspace(ratio[0], ratio[1], n_masked + 1)
  masks = [gen(int(n * rng.uniform(probs[i], probs[i + 1])), rng).reshape(-1) for i in range(n_masked)]
  masks += [np.zeros(n, bool)] * (n_crops - n_masked)
  return np.stack([masks[i] for i in rng.permutation(n_crops)])


# ----------------------------------------------------------------------------- sources and stream


def parse_sources(spec: str) -> list[tuple[str, float]]:
  out = []
  for item in filter(None, (s.strip() for s in str(spec).split(";"))):
    name, sep, w = item.rpartition("=")
    if not sep:
      name, w = item, "1"
    try:
      out.append((name.strip(), float(w)))
    except ValueError:
      raise ConfigError("data.sources", f"bad weight in '{item}'; use spec=weight") from None
  if not out:
    raise ConfigError("data.sources", "no source given; e.g. 'synthetic=1;folder:/data/us=1'")
  return out


def load_source(spec: str, cfg) -> list:
  """The images (arrays) of one source spec."""
  if spec == "synthetic":
    from m2dino_jax.data import sonosynth
    tasks = [t for t in str(cfg.synthetic_tasks).split(",") if t]
    per = max(1, int(cfg.synthetic_count) // max(len(tasks), 1))
    return [r.image for t in tasks for r in sonosynth.generate(t, per, seed=int(cfg.synthetic_seed),
                                                                 size=int(cfg.synthetic_size))]
  if spec.startswith("folder:"):
    from m2dino_jax.data.adapters import unlabelled
    images = [r.image for r in unlabelled.read(spec[len("folder:"):], "all", skip_bad=True)]
    if not images:
      raise DataError(spec[len("folder:"):], "no PNG / JPG / DICOM images found")
    return images
  raise ConfigError("data.sources", f"unknown source '{spec}'; use synthetic or folder:PATH")


class _Plan(grain.transforms.RandomMap):
  def __init__(self, source_index: int):
    self.source_index = source_index

  def random_map(self, index, rng: np.random.Generator):
    return (self.source_index, int(index), int(rng.integers(0, 2**63 - 1)))


class _Materialize(grain.transforms.Map):
  def __init__(self, sources: Sequence[Sequence], cfg, grid: tuple[int, int]):
    self.sources, self.crop, self.cfg, self.grid = sources, MultiCrop(cfg), cfg, grid

  def map(self, plans):
    examples = [self.crop(self.sources[s][i], np.random.default_rng(seed)) for s, i, seed in plans]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    b = len(plans)
    rng = np.random.default_rng([int(p[2]) % 2**32 for p in plans])
    masks = collate_masks(2 * b, self.grid, float(self.cfg.mask_probability), tuple(self.cfg.mask_ratio), rng)
    batch["masks"] = masks.reshape(2, b, -1).transpose(1, 0, 2)
    return batch


def make_iterator(cfg, *, patch: int, seed: int, process_index: int = 0, process_count: int = 1,
                  sources: Mapping[str, Sequence] | None = None):
  """The infinite multi-crop iterator of this process (a grain DatasetIterator: get_state / set_state)."""
  specs = parse_sources(cfg.sources)
  if cfg.global_size % patch or cfg.local_size % patch:
    raise ConfigError("data.global_size", f"crop sizes {cfg.global_size}/{cfg.local_size} must divide by {patch}")
  if cfg.batch_size % process_count:
    raise ConfigError("data.batch_size", f"{cfg.batch_size} is not divisible by {process_count} processes")
  loaded = [sources[s] if sources is not None and s in sources else load_source(s, cfg) for s, _ in specs]
  streams = []
  for k, images in enumerate(loaded):
    idx = np.arange(len(images))[process_index::process_count]
    if not len(idx):
      raise DataError(specs[k][0], f"no images for process {process_index} of {process_count}")
    ss = np.random.SeedSequence([seed, k, process_index]).generate_state(2)
    ds = (grain.MapDataset.source(idx).shuffle(seed=int(ss[0])).repeat()
          .random_map(_Plan(k), seed=int(ss[1])))
    streams.append(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
  mixed = grain.IterDataset.mix(streams, [w for _, w in specs]) if len(streams) > 1 else streams[0]
  grid = (cfg.global_size // patch, cfg.global_size // patch)
  ds = mixed.batch(cfg.batch_size // process_count, drop_remainder=True, batch_fn=list)
  ds = ds.map(_Materialize(loaded, cfg, grid))
  if int(cfg.worker_count) > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(cfg.worker_count)))
  return iter(ds)
