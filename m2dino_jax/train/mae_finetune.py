"""Fine-tuning a 3D MAE encoder on labelled volumes: UNETR segmentation or an MLP classifier, on the shared core.

Start: `init_from` = a MAE workdir (its final/params and config.json) or a params folder; every encoder weight
of the model (mae3d.ENCODER_KEYS) must be in the checkpoint with the right shape, and the checkpoint's encoder
settings (mae3d.ENCODER_SETTINGS, from config.json when there is one) must equal the config's, else a clear
error names what is missing or different. Empty `init_from` = random init (the control).

Data: labelled phantoms of one domain (`data.domain`; voxel labels and a lesion-present class) or volume files
with label files (segmentation). Training examples are a pure function of (seed, step, index): segmentation
takes random crops (foreground-biased) of image and labels with the same flips; classification takes the whole
volume resized to the crop. The last `data.heldout` volumes are held out; `data.train_volumes` > 0 keeps the
first N of the others (the labelled-data budget).

Eval (WORKDIR/eval/STEP.json; the final one also in done.json):
  segmentation    sliding-window inference over each whole held-out volume, per-class Dice (over the volumes
                  where the class is present) and their mean
  classification  AUC, accuracy, F1 and MCC of the held-out volumes (tasks/metrics.py)
"""

from __future__ import annotations

import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2dino_jax import fileio
from m2dino_jax import mesh as mesh_lib
from m2dino_jax.data import phantoms, volumes
from m2dino_jax.errors import ConfigError, DataError
from m2dino_jax.models import mae3d, unetr
from m2dino_jax.tasks import losses, metrics
from m2dino_jax.train import checkpointing, core, loop, mae, optim
from m2dino_jax.train import workdir as workdir_lib

# ------------------------------------------------------------------------------------------------ data

def label_names(config) -> tuple[str, ...]:
  if config.task == "classification":
    return phantoms.CLASS_NAMES
  if config.data.source == "phantoms":
    return phantoms.label_names(config.data.domain)
  if config.data.num_classes < 2:
    raise ConfigError("data.num_classes", "set the number of label values (>= 2) of the label files")
  return tuple(f"class_{i}" for i in range(config.data.num_classes))


def _files(pattern: str, key: str) -> list[Path]:
  p = Path(pattern)
  paths = sorted(Path("/").glob(pattern.lstrip("/")) if p.is_absolute() else Path().glob(pattern))
  if not paths:
    raise ConfigError(key, f"no files match '{pattern}'")
  return paths


def _records(config) -> list[volumes.VolumeRecord]:
  d = config.data
  if d.source == "phantoms":
    return [phantoms.make_phantom(d.domain, i, d.phantom_size, d.phantom_seed) for i in range(d.per_domain)]
  if d.source != "files":
    raise ConfigError("data.source", f"'{d.source}' is not 'phantoms' or 'files'")
  if config.task == "classification":
    raise ConfigError("task", "classification reads the phantoms' class labels; files carry none")
  images, labels = _files(d.files, "data.files"), _files(d.label_files, "data.label_files")
  if len(images) != len(labels):
    raise ConfigError("data.label_files", f"{len(labels)} label files for {len(images)} images")
  mods = mae._kv(d.modalities, "data.modalities")
  recs = []
  for img, lab in zip(images, labels):
    rec = volumes.read_volume(img, d.domain, mods)
    lab_arr, _ = volumes.read_nifti(lab) if lab.name.lower().endswith((".nii", ".nii.gz")) else volumes.read_itk(lab)
    if lab_arr.shape != rec.image.shape:
      raise DataError(lab, f"label shape {lab_arr.shape} differs from its image {img} {rec.image.shape}")
    rec.label = np.rint(lab_arr).astype(np.int32)
    recs.append(rec)
  return recs


def load_data(config) -> tuple[list[dict], list[dict]]:
  """(train, held-out) lists of {'image' normalised, 'label' voxel labels, 'cls' class, 'resized' (cls)}."""
  d, c = config.data, config.data.crop
  spacing = tuple(d.target_spacing) if d.target_spacing else None
  recs = _records(config)
  if len(recs) <= d.heldout:
    raise ConfigError("data.heldout", f"{len(recs)} volume(s), needs > {d.heldout}")
  out = []
  for r in recs:
    image = volumes.prepare(r, spacing)
    label = r.label if r.label is not None else np.zeros(r.image.shape, np.int32)
    if spacing:
      label = volumes.resample(label.astype(np.float32), r.spacing, spacing, order=0).astype(np.int32)
    if config.task == "segmentation":
      volumes.crop_origin(image.shape, c, np.random.default_rng(0), r.path)  # too-small check, naming the file
    ex = {"image": image, "label": label.astype(np.int32), "cls": int(r.cls), "path": r.path}
    if config.task == "classification":
      ex["resized"] = _resize(image, c)
    out.append(ex)
  train, held = out[:len(out) - d.heldout], out[len(out) - d.heldout:]
  if d.train_volumes > 0:
    train = train[:d.train_volumes]
  return train, held


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  from scipy import ndimage
  return ndimage.zoom(image, [size / s for s in image.shape], order=1, mode="nearest").astype(np.float32)


class _Batches:
  """Local batch of global step `s`, a pure function of (seed, step, example index)."""

  def __init__(self, config, train, process_index=0, process_count=1):
    self.cfg, self.task, self.train = config.data, config.task, train
    self.seed, self.pi = config.seed, process_index
    self.local = config.data.batch_size // process_count

  def __call__(self, step) -> dict:
    d, imgs, labs = self.cfg, [], []
    for k in range(self.local):
      rng = np.random.default_rng([self.seed, int(step), self.pi * self.local + k, 7])
      ex = self.train[int(rng.integers(len(self.train)))]
      if self.task == "segmentation":
        o = volumes.crop_origin(ex["image"].shape, d.crop, rng, fg=ex["label"] > 0, foreground_bias=d.foreground_bias)
        img, lab = volumes.crop(ex["image"], o, d.crop), volumes.crop(ex["label"], o, d.crop)
      else:
        img, lab = ex["resized"], ex["cls"]
      if d.flip:
        for ax in range(3):
          if rng.random() < 0.5:
            img = np.flip(img, ax)
            lab = np.flip(lab, ax) if self.task == "segmentation" else lab
      if d.intensity_aug > 0:
        img = img * (1.0 + d.intensity_aug * rng.uniform(-1, 1)) + d.intensity_aug * rng.uniform(-1, 1)
      imgs.append(np.ascontiguousarray(img, np.float32))
      labs.append(np.ascontiguousarray(lab))
    key = "mask" if self.task == "segmentation" else "label"
    return {"image": np.stack(imgs)[..., None], key: np.asarray(np.stack(labs), np.int32)}


def make_iterator(config, train, total_steps: int, process_index=0, process_count=1):
  ds = grain.MapDataset.range(total_steps + 1).map(_Batches(config, train, process_index, process_count))
  return iter(ds.to_iter_dataset())


# ------------------------------------------------------------------------------------------ checkpoint

def _flat(tree) -> dict[str, object]:
  """{'blocks/0/attn/q/kernel': leaf} for an nnx.State or a restored dict (a trailing 'value' dropped)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    if keys and keys[-1] == "value":
      keys = keys[:-1]
    out["/".join(keys)] = leaf
  return out


def checkpoint_paths(path) -> tuple[Path, Path | None]:
  """(params folder, config.json or None) of `init_from`: a MAE workdir or a params folder."""
  path = Path(path)
  if (path / "final" / "params").is_dir():
    return path / "final" / "params", (path / "config.json" if (path / "config.json").is_file() else None)
  if path.is_dir():
    up = path.parent.parent / "config.json"
    return path, (up if path.name == "params" and up.is_file() else None)
  raise DataError(path, "no MAE checkpoint here (expected a MAE workdir with final/params, or a params folder)")


def check_settings(enc: mae3d.MAE3DConfig, config_json: Path | None) -> None:
  """The checkpoint's encoder settings must equal the config's (names the differing model.* key)."""
  if config_json is None:
    return
  saved = fileio.read_json(config_json, "MAE config")
  try:
    theirs = mae3d.MAE3DConfig.from_config(saved["model"])
  except (KeyError, TypeError, ConfigError) as e:
    raise DataError(config_json, f"cannot read the MAE model settings ({e})") from None
  for key in mae3d.ENCODER_SETTINGS:
    a, b = getattr(theirs, key), getattr(enc, key)
    if a != b:
      raise ConfigError(f"model.{key}", f"the checkpoint ({config_json.parent}) was pretrained with {key}={a}, "
                        f"the config has {b}; set --config.model.{key}={a} (or the same variant)")


def encoder_from_checkpoint(like, path) -> dict[str, np.ndarray]:
  """The checkpoint's value for every encoder weight of `like` (the model's encoder params, abstract or real),
  as {name: array}; raises DataError listing weights that are missing or have another shape."""
  params_dir, _ = checkpoint_paths(path)
  try:
    saved = _flat(checkpointing.restore_params(params_dir))
  except (FileNotFoundError, ValueError) as e:
    raise DataError(params_dir, f"cannot read the checkpoint ({e})") from None
  want = _flat(like)
  missing = [k for k in want if k not in saved]
  wrong = [f"{k} {tuple(np.shape(saved[k]))} (model {tuple(np.shape(want[k]))})" for k in want
           if k in saved and tuple(np.shape(saved[k])) != tuple(np.shape(want[k]))]
  if missing or wrong:
    parts = ([f"{len(missing)} encoder weight(s) missing: {', '.join(missing[:8])}"] if missing else []) + \
        ([f"shape mismatch: {', '.join(wrong[:8])}"] if wrong else [])
    raise DataError(params_dir, "; ".join(parts) + " (is it a 3D MAE checkpoint with the same encoder?)")
  return {k: np.asarray(saved[k]) for k in want}


def _assign(tree, values: dict):
  """`tree` with each leaf replaced by values[name] (same flattening as `_flat`)."""
  names = list(_flat(tree))
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return jax.tree_util.tree_unflatten(treedef, [values[n] for n in names])


# -------------------------------------------------------------------------------------------- program

class Program:
  """FineTune3D, its sharded TrainState and the compiled train / predict programs on one mesh."""

  def __init__(self, config, mesh, rules, total_steps: int, num_classes: int):
    self.config, self.mesh, self.rules = config, mesh, rules
    self.enc_cfg = mae3d.MAE3DConfig.from_config(config.model)
    if config.data.crop != self.enc_cfg.crop:
      raise ConfigError("data.crop", f"{config.data.crop} must equal model.crop {self.enc_cfg.crop}")
    self.head_cfg = unetr.HeadConfig.from_config(config.head, config.task, num_classes)
    tx = optim.adam_tx(config.optim)
    build = lambda seed: unetr.FineTune3D(self.enc_cfg, self.head_cfg, rngs=nnx.Rngs(jax.random.key(seed)))
    self.gdef, abstract_params, rest = nnx.split(nnx.eval_shape(lambda: build(0)), nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise ValueError("FineTune3D holds non-parameter state")

    def init(seed):  # the seed is an argument: one compiled init serves every seed (fine-tune repeats)
      _, params = nnx.split(build(seed), nnx.Param)
      return core.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             rng=jax.random.key_data(jax.random.key(seed)))

    shard = lambda abstract: core.replicate_unnamed(mesh_lib.state_shardings(abstract, mesh, rules), mesh)
    self._init = jax.jit(init, out_shardings=shard(jax.eval_shape(init, jnp.uint32(0))))
    self.abstract_params = abstract_params
    o = config.optim
    enc_scales = _flat(optim.encoder_lr_scales(abstract_params["encoder"], o, self.enc_cfg.depth))
    scales = _assign(abstract_params, {k: np.float32(enc_scales[k[len("encoder/"):]] if k.startswith("encoder/")
                                                     else o.head_lr_mult) for k in _flat(abstract_params)})
    schedule, clip, gdef, task = optim.lr_schedule(o, total_steps), float(o.clip_norm), self.gdef, config.task
    dice_w = float(config.dice_weight)

    def loss_fn(params, batch):
      logits = nnx.merge(gdef, params)(batch["image"])
      valid = jnp.ones((logits.shape[0],), bool)
      if task == "segmentation":
        b, d, h, w, k = logits.shape  # the 2D loss reduces over axes (1, 2): fold depth into rows
        return losses.segmentation_loss(logits.reshape(b, d * h, w, k), batch["mask"].reshape(b, d * h, w), valid,
                                        num_classes, dice_w)
      return losses.classification_loss(logits, batch["label"], valid, num_classes)

    def train_step(state, batch):
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
      grads, gnorm = optim.clip(grads, clip)
      lr = schedule(state.step)
      params, opt_state = optim.apply(tx, grads, state.opt_state, state.params, lr, scales)
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state), \
          {"loss": loss, "grad_norm": gnorm, "lr": lr, **aux}

    def predict(params, image):
      return jax.nn.softmax(nnx.merge(gdef, params)(image).astype(jnp.float32), axis=-1)

    self._train_fn, self._train = train_step, None
    self._predict = jax.jit(predict, out_shardings=mesh_lib.replicated(mesh))  # readable on every process

  def fresh_state(self, init_from: str = "", seed: int | None = None) -> core.TrainState:
    """A new sharded state initialised from `seed` (default config.seed); with `init_from`, the encoder's
    weights come from that MAE checkpoint."""
    with jax.set_mesh(self.mesh):
      state = self._init(jnp.uint32(self.config.seed if seed is None else seed))
    if init_from:
      check_settings(self.enc_cfg, checkpoint_paths(init_from)[1])
      values = encoder_from_checkpoint(state.params["encoder"], init_from)
      new = {k: jax.device_put(values[k[len("encoder/"):]].astype(leaf.dtype), leaf.sharding)
             if k.startswith("encoder/") else leaf for k, leaf in _flat(state.params).items()}
      state = state.replace(params=_assign(state.params, new))
    return state

  def step(self, state, batch: dict):
    batch = mesh_lib.shard_batch(batch, self.mesh, self.rules)
    with jax.set_mesh(self.mesh):
      if self._train is None:
        self._train = core.compile_step(self._train_fn, core.shardings_of(state), core.shardings_of(batch))
      return self._train(state, batch)

  def predict(self, params, image: np.ndarray) -> np.ndarray:
    """Class probabilities of a global host batch that every process holds (its size must split over the
    mesh's batch axes); each process feeds its slice."""
    local = len(image) // jax.process_count()
    x = np.asarray(image[jax.process_index() * local:(jax.process_index() + 1) * local], np.float32)
    x = mesh_lib.shard_batch(x, self.mesh, self.rules)
    with jax.set_mesh(self.mesh):
      return np.asarray(jax.device_get(self._predict(params, x)))


# ------------------------------------------------------------------------------------------------ eval

def evaluate_segmentation(prog: Program, params, held: list[dict], names, config) -> dict:
  d = config.data
  per_class = {n: [] for n in names[1:]}
  for ex in held:
    probs = unetr.sliding_window(lambda w: prog.predict(params, w), ex["image"], d.crop,
                                 overlap=d.overlap, batch=d.eval_batch, weighting=d.weighting)
    pred = probs.argmax(-1)
    for c, n in enumerate(names[1:], start=1):
      if (ex["label"] == c).any():
        per_class[n].append(metrics.dice(pred == c, ex["label"] == c))
  dice = {n: float(np.mean(v)) if v else float("nan") for n, v in per_class.items()}
  present = [v for v in dice.values() if np.isfinite(v)]
  return {"dice": dice, "mean_dice": float(np.mean(present)) if present else float("nan")}


def evaluate_classification(prog: Program, params, held: list[dict], config) -> dict:
  b = config.data.eval_batch
  x = np.stack([ex["resized"] for ex in held])[..., None]
  pad = (-len(x)) % b
  x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
  probs = np.concatenate([prog.predict(params, x[i:i + b]) for i in range(0, len(x), b)])[:len(held)]
  labels = np.asarray([ex["cls"] for ex in held])
  return {**metrics.classification_scores(labels, probs), "positives": int(labels.sum()), "n": len(held)}


def _program_key(config, num_classes) -> str:
  import json
  return json.dumps([config.task, config.model.to_dict(), config.head.to_dict(), config.optim.to_dict(),
                     config.total_steps, config.mesh.to_dict(), config.mesh_devices, config.sharding,
                     config.data.crop, config.data.batch_size, config.dice_weight, num_classes], sort_keys=True,
                    default=str)


def train_and_evaluate(config, workdir: str, cache: dict | None = None) -> str:
  """Fine-tunes (resuming from WORKDIR/ckpt), evaluates every `eval_every` and at the end; writes
  WORKDIR/eval/STEP.json, final/params and done.json. `cache` as in mae.train_and_evaluate."""
  root = Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  if (root / "done.json").is_file():
    print(f"[finetune] {root} already finished; skipping", file=sys.stderr)
    return loop.COMPLETED
  names = label_names(config)
  total = int(config.total_steps)
  train, held = load_data(config)
  key = _program_key(config, len(names))
  if cache is not None and cache.get("finetune_key") == key:
    prog = cache["finetune"]
  else:
    prog = Program(config, *mae.make_mesh(config), total, len(names))
    if cache is not None:
      cache.update(finetune_key=key, finetune=prog)
  if jax.process_index() == 0:
    workdir_lib.write_config(root, config)
  writer = loop.MetricWriter(root, tensorboard=config.tensorboard)

  def evaluate(state, step: int) -> dict:
    if config.task == "segmentation":
      result = evaluate_segmentation(prog, state.params, held, names, config)
      scalars = {"mean_dice": result["mean_dice"], **{f"dice/{k}": v for k, v in result["dice"].items()}}
    else:
      result = evaluate_classification(prog, state.params, held, config)
      scalars = {k: result[k] for k in ("auc", "accuracy", "f1_macro", "mcc")}
    writer.write(step, scalars, prefix="eval/")
    if jax.process_index() == 0:
      fileio.write_json(root / "eval" / f"{step}.json", {"step": step, **result})
    return result

  it = make_iterator(config, train, total, jax.process_index(), jax.process_count())
  state, step, status = loop.train(
      workdir=root, state=prog.fresh_state(config.init_from, config.seed), batches=it, step_fn=prog.step,
      total_steps=total, writer=writer, checkpoint=config.checkpoint, log_every=config.log_every,
      eval_every=config.eval_every, evaluate=evaluate, eval_at_start=config.eval_at_start,
      name=f"finetune-{config.task}", label="finetune")
  if status == loop.PREEMPTED:
    return status
  result = evaluate(state, step)
  if config.save_params:
    checkpointing.save_params(root / "final" / "params", state.params)
  writer.close()
  if jax.process_index() == 0:
    fileio.write_json(root / "done.json", {"step": step, "task": config.task, "init_from": config.init_from,
                                           **result})
  head = f"mean Dice {result['mean_dice']:.4f}" if config.task == "segmentation" else f"AUC {result['auc']:.4f}"
  print(f"[finetune] {config.task} on {config.data.domain}: {head}")
  return status
