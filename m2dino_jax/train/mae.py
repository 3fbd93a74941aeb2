"""3D MAE pretraining on a mixture of imaging domains, on the shared training core.

Data: per domain, a list of training volumes (the first `data.budget[domain]` of them: the data budget the
scaling sweep varies) and a disjoint held-out list. Each training example is a pure function of (seed, global
example index): the domain is drawn from the mixture weights, then a volume and a random crop (+ flips), so a
batch does not depend on the device count and a resumed run (Grain iterator state in the checkpoint) sees
exactly the batches it would have seen.

Eval: for each domain, fixed crops of its held-out volumes under one fixed mask give the held-out
reconstruction loss. Every eval writes WORKDIR/eval/STEP.json and appends a row to the measurements file
that `m2dino scaling fit` reads (scaling/measurements.py):
  data    {domain: training volumes the run used}  (0 for domains out of the mixture)
  weights the mixture weights, budget = sum(data), available {domain: volumes the domain has}
  loss    {domain: held-out loss}
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from m2dino_jax import fileio
from m2dino_jax import mesh as mesh_lib
from m2dino_jax.data import mixture, phantoms, volumes
from m2dino_jax.errors import ConfigError
from m2dino_jax.models import mae3d
from m2dino_jax.train import checkpointing, core, loop, optim
from m2dino_jax.train import workdir as workdir_lib

EVAL_SEED = 1234


def _domains(config) -> list[str]:
  names = [d.strip() for d in str(config.data.domains).split(",") if d.strip()]
  if not names:
    raise ConfigError("data.domains", "no domains")
  return names


def _kv(spec: str, key: str, cast=str) -> dict:
  out = {}
  for item in filter(None, (s.strip() for s in str(spec or "").split(","))):
    k, sep, v = item.partition("=")
    if not sep:
      raise ConfigError(key, f"bad entry '{item}'; use name=value,name=value")
    try:
      out[k.strip()] = cast(v.strip())
    except ValueError:
      raise ConfigError(key, f"bad value in '{item}'") from None
  return out


@dataclasses.dataclass
class DomainData:
  """Prepared (normalised) images of one domain: training (budgeted) and held-out."""
  train: list[np.ndarray]
  heldout: list[np.ndarray]
  available: int


def _data_key(config) -> str:
  """What the prepared volumes depend on (not the budget): runs of a sweep with equal keys share them."""
  d = config.data.to_dict()
  return json.dumps({k: v for k, v in d.items() if k in (
      "source", "files", "domains", "modalities", "per_domain", "phantom_counts", "heldout", "phantom_size",
      "phantom_seed", "target_spacing", "crop")}, sort_keys=True, default=str)


def load_domains(config, cache: dict | None = None) -> dict[str, DomainData]:
  """Phantoms (`data.source = 'phantoms'`), volume files (`data.source = 'files'`, `data.files` =
  'domain=GLOB,domain=GLOB'; a shipped volume's name such as 'mni152' in place of a glob) or both
  ('phantoms+files': a domain's files, then its phantoms; domains without files get phantoms only); the last
  `data.heldout` volumes of each domain are held out, and of the others the first `data.budget[domain]` are
  used. `cache` (a dict a sweep passes from run to run) keeps the prepared volumes of the last
  data settings, so runs that differ only in budget prepare them once."""
  budget = _kv(config.data.budget, "data.budget", int)
  key = _data_key(config)
  if cache is not None and cache.get("data_key") == key:
    full = cache["data"]
  else:
    full = _prepare_domains(config)
    if cache is not None:
      cache.update(data_key=key, data=full)
  out = {}
  for name, (train, held) in full.items():
    n = budget.get(name, len(train))
    if n < 0:
      raise ConfigError("data.budget", f"domain '{name}': budget {n} < 0")
    out[name] = DomainData(train[:min(n, len(train))], held, len(train))
  unknown = sorted(set(budget) - set(full))
  if unknown:
    raise ConfigError("data.budget", f"domain(s) {unknown} are not in data.domains")
  return out


SOURCES = ("phantoms", "files", "phantoms+files")


def _paths(pattern: str) -> list[Path]:
  """Volume files of one `data.files` entry: a glob (relative or absolute) or a shipped volume's name
  (`volumes.SHIPPED`, e.g. 'mni152': the MNI152 T1 template inside the nilearn wheel)."""
  if not pattern:
    return []
  if pattern in volumes.SHIPPED:
    return [volumes.shipped_volume(pattern)]
  p = Path(pattern)
  paths = sorted(Path("/").glob(pattern.lstrip("/")) if p.is_absolute() else Path().glob(pattern))
  if not paths:
    raise ConfigError("data.files", f"no files match '{pattern}'")
  return paths


def _prepare_domains(config) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
  d = config.data
  names = _domains(config)
  mods = _kv(d.modalities, "data.modalities")
  counts = _kv(d.phantom_counts, "data.phantom_counts", int)
  spacing = tuple(d.target_spacing) if d.target_spacing else None
  if d.source not in SOURCES:
    raise ConfigError("data.source", f"'{d.source}' is not one of {', '.join(SOURCES)}")
  globs = _kv(d.files, "data.files") if "files" in d.source else {}
  if set(globs) - set(names):
    raise ConfigError("data.files", f"domain(s) {sorted(set(globs) - set(names))} are not in data.domains")
  out = {}
  for name in names:
    recs = []
    if "files" in d.source:  # real volumes first, so a budget counts them before the phantoms
      if name not in globs and d.source == "files":
        raise ConfigError("data.files", f"no file pattern for domain '{name}'")
      recs += [volumes.read_volume(p, name, mods) for p in _paths(globs.get(name, ""))]
    if "phantoms" in d.source:
      n = counts.get(name, d.per_domain)
      recs += [phantoms.make_phantom(name, i, d.phantom_size, d.phantom_seed) for i in range(n)]
    if len(recs) <= d.heldout:
      raise ConfigError("data.heldout", f"domain '{name}' has {len(recs)} volume(s), needs > {d.heldout}")
    prepared = []
    for r in recs:
      img = volumes.prepare(r, spacing)
      volumes.crop_origin(img.shape, d.crop, np.random.default_rng(0), r.path)  # too-small check, naming the file
      prepared.append(img)
    out[name] = (prepared[:len(prepared) - d.heldout], prepared[len(prepared) - d.heldout:])
  return out


def mixture_weights(config, data: dict[str, DomainData]) -> dict[str, float]:
  sizes = {n: len(v.train) for n, v in data.items()}
  w = mixture.mixture_weights(config.data.mixture, sizes, temperature=config.data.temperature,
                              weights_file=config.data.weights_file)
  return {n: w.get(n, 0.0) for n in data}


class _Batches:
  """Local batch of global step `s` (a pure function of the seed and example indices)."""

  def __init__(self, config, data, weights, process_index=0, process_count=1):
    self.cfg, self.data = config.data, data
    self.names = list(data)
    self.p = np.asarray([weights[n] for n in self.names])
    self.seed, self.pi = config.seed, process_index
    self.local = config.data.batch_size // process_count

  def __call__(self, step) -> dict:
    imgs, doms = [], []
    for k in range(self.local):
      rng = np.random.default_rng([self.seed, int(step), self.pi * self.local + k])
      di = int(rng.choice(len(self.names), p=self.p))
      train = self.data[self.names[di]].train
      img = train[int(rng.integers(len(train)))]
      vol = volumes.crop(img, volumes.crop_origin(img.shape, self.cfg.crop, rng, fg=img > 0.05,
                                                  foreground_bias=self.cfg.foreground_bias), self.cfg.crop)
      imgs.append(volumes.augment(vol, rng, self.cfg.flip, self.cfg.intensity_aug))
      doms.append(di)
    return {"image": np.stack(imgs)[..., None], "domain": np.asarray(doms, np.int32)}


def make_iterator(config, data, weights, total_steps: int, process_index=0, process_count=1):
  ds = grain.MapDataset.range(total_steps + 1).map(_Batches(config, data, weights, process_index, process_count))
  return iter(ds.to_iter_dataset())


def heldout_crops(config, held: list[np.ndarray]) -> np.ndarray:
  """Fixed eval crops [n, c, c, c, 1]: `data.eval_crops` per held-out volume (the first one centred)."""
  c, out = config.data.crop, []
  for i, img in enumerate(held):
    rng = np.random.default_rng([EVAL_SEED, i])
    for j in range(config.data.eval_crops):
      o = tuple((s - c) // 2 for s in img.shape) if j == 0 else volumes.crop_origin(img.shape, c, rng)
      out.append(volumes.crop(img, o, c))
  return np.stack(out)[..., None]


class Program:
  """The model, its sharded TrainState and the compiled train / eval programs on one mesh."""

  def __init__(self, config, mesh, rules, total_steps: int):
    self.config, self.mesh, self.rules = config, mesh, rules
    self.model_cfg = mae3d.MAE3DConfig.from_config(config.model)
    if config.data.crop != self.model_cfg.crop:
      raise ConfigError("data.crop", f"{config.data.crop} must equal model.crop {self.model_cfg.crop}")
    tx, seed_key = optim.adam_tx(config.optim), core.seed_data(config.seed)
    abstract = nnx.eval_shape(lambda: mae3d.MAE3D(self.model_cfg, rngs=nnx.Rngs(config.seed)))
    self.gdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise ValueError("MAE3D holds non-parameter state; bind it like the multitask trainer")

    def init():
      _, params = nnx.split(mae3d.MAE3D(self.model_cfg, rngs=nnx.Rngs(config.seed)), nnx.Param)
      return core.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             rng=jnp.asarray(seed_key))

    shard = lambda abstract: core.replicate_unnamed(mesh_lib.state_shardings(abstract, mesh, rules), mesh)
    self._init = jax.jit(init, out_shardings=shard(jax.eval_shape(init)))
    self.state = self.fresh_state()
    self.state_shardings = core.shardings_of(self.state)
    schedule, clip = optim.lr_schedule(config.optim, total_steps), float(config.optim.clip_norm)
    gdef = self.gdef

    def train_step(state, batch):
      key = state.key()

      def loss_fn(params):
        return nnx.merge(gdef, params)(batch["image"], key)["loss"]

      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      grads, gnorm = optim.clip(grads, clip)
      lr = schedule(state.step)
      params, opt_state = optim.apply(tx, grads, state.opt_state, state.params, lr)
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state), \
          {"loss": loss, "grad_norm": gnorm, "lr": lr}

    def eval_step(params, image):
      return nnx.merge(gdef, params)(image, jax.random.key(EVAL_SEED))["per_sample"]

    self._train_fn, self._eval_fn = train_step, eval_step
    # per-sample losses come back replicated, so every process can read all of them
    self._train, self._eval = None, jax.jit(eval_step, out_shardings=mesh_lib.replicated(mesh))

  def fresh_state(self) -> core.TrainState:
    """A newly initialised, sharded state (the init program is compiled once per Program)."""
    with jax.set_mesh(self.mesh):
      return self._init()

  def step(self, state, batch: dict):
    """One sharded train step on a host batch (numpy) -> (state, metrics)."""
    batch = mesh_lib.shard_batch(batch, self.mesh, self.rules)
    with jax.set_mesh(self.mesh):
      if self._train is None:
        self._train = core.compile_step(self._train_fn, self.state_shardings, core.shardings_of(batch))
      return self._train(state, batch)

  def heldout_loss(self, params, crops: np.ndarray) -> float:
    """Mean per-sample masked loss over fixed crops (padded to the mesh's batch split, pads dropped). Every
    process holds all crops and feeds its slice of them."""
    split = int(np.prod([mesh_lib.axis_size(self.mesh, a) for a in mesh_lib.batch_axes(self.mesh)]))
    n, pc, pi = len(crops), jax.process_count(), jax.process_index()
    pad = (-n) % int(np.lcm(split, pc))
    x = crops[np.arange(n + pad) % n]
    local = len(x) // pc
    x = mesh_lib.shard_batch(x[pi * local:(pi + 1) * local], self.mesh, self.rules)
    with jax.set_mesh(self.mesh):
      per = np.asarray(jax.device_get(self._eval(params, x)))
    return float(per[:n].mean())


def measurement_row(run_id: str, step: int, data: dict[str, DomainData], weights, losses) -> dict:
  used = {n: float(len(v.train)) if weights[n] > 0 else 0.0 for n, v in data.items()}
  return {"run_id": run_id, "data": used, "weights": {n: float(w) for n, w in weights.items()},
          "budget": float(sum(used.values())), "step": int(step), "loss": {n: float(v) for n, v in losses.items()},
          "available": {n: float(v.available) for n, v in data.items()}}


def _program_key(config) -> str:
  """What the compiled programs depend on: runs with equal keys can share one Program."""
  return json.dumps([config.model.to_dict(), config.optim.to_dict(), config.seed, config.total_steps,
                     config.mesh.to_dict(), config.mesh_devices, config.sharding, config.data.crop,
                     config.data.batch_size], sort_keys=True, default=str)


def run_settings(c, *, total_steps: int, eval_at_start: bool) -> None:
  """The run section configs/mae3d.py and configs/mae3d_finetune.py share: logging, eval and checkpoint cadence,
  mesh (fsdp preset) and multi-process settings (empty = read M2DINO_* from the environment)."""
  c.total_steps = total_steps
  c.log_every = 10
  c.eval_every = 500
  c.eval_at_start = eval_at_start
  c.tensorboard = True
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=2, async_save=True))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  c.mesh_devices = -1
  c.sharding = "fsdp"  # 'dp' | 'fsdp' (embed over fsdp, mlp / heads over tensor)
  c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=0, process_id=-1, auto=False))


def make_mesh(config):
  devices = jax.devices()[:config.mesh_devices] if config.mesh_devices > 0 else None
  return mesh_lib.make_mesh(config.mesh.to_dict(), devices), mesh_lib.get_rules(config.sharding)


def train_and_evaluate(config, workdir: str, cache: dict | None = None) -> str:
  """Pretrains (resuming from WORKDIR/ckpt if present), evaluates per-domain held-out loss at each eval and
  at the end, appends measurement rows. Returns loop.COMPLETED or loop.PREEMPTED.

  `cache`: a dict that a caller running many pretrainings in one process (the scaling sweep) passes to every
  run; runs with the same model / optimiser / mesh settings then reuse one compiled Program (a fresh state
  each), and runs with the same data settings reuse the prepared volumes."""
  root = Path(workdir)
  if (root / "done.json").is_file():
    print(f"[mae] {root} already finished; skipping", file=sys.stderr)
    return loop.COMPLETED
  total = int(config.total_steps)
  data = load_domains(config, cache)
  weights = mixture_weights(config, data)
  key = _program_key(config)
  if cache is not None and cache.get("program_key") == key:
    prog = cache["program"]
    prog.state = prog.fresh_state()
  else:
    prog = Program(config, *make_mesh(config), total)
    if cache is not None:
      cache.update(program_key=key, program=prog)
  crops = {n: heldout_crops(config, v.heldout) for n, v in data.items()}
  run_id = config.run_id or root.name
  meas_path = Path(config.measurements) if config.measurements else root / "measurements.jsonl"
  if jax.process_index() == 0:
    workdir_lib.write_config(root, config)  # the config has built the model and its data
  writer = loop.MetricWriter(root, tensorboard=config.tensorboard)

  def evaluate(state, step: int) -> dict:
    losses = {n: prog.heldout_loss(state.params, c) for n, c in crops.items()}
    writer.write(step, {f"heldout/{n}": v for n, v in losses.items()}, prefix="eval/")
    if jax.process_index() == 0:
      fileio.write_json(root / "eval" / f"{step}.json", {"step": step, "heldout_loss": losses, "weights": weights})
      row = measurement_row(run_id, step, data, weights, losses)
      prev = meas_path.read_text() if meas_path.is_file() else ""
      lines = [ln for ln in prev.splitlines() if ln.strip()]
      lines = [ln for ln in lines if (json.loads(ln)["run_id"], json.loads(ln)["step"]) != (run_id, step)]
      fileio.write_text(meas_path, "".join(ln + "\n" for ln in lines) + json.dumps(row) + "\n")
    return losses

  it = make_iterator(config, data, weights, total, jax.process_index(), jax.process_count())
  state, step, status = loop.train(
      workdir=root, state=prog.state, batches=it, step_fn=prog.step, total_steps=total, writer=writer,
      checkpoint=config.checkpoint, log_every=config.log_every, eval_every=config.eval_every, evaluate=evaluate,
      eval_at_start=config.eval_at_start, name="mae3d", label="mae")
  if status == loop.PREEMPTED:
    return status
  losses = evaluate(state, step)
  checkpointing.save_params(root / "final" / "params", state.params)
  writer.close()
  if jax.process_index() == 0:
    fileio.write_json(root / "done.json", {"step": step, "heldout_loss": losses})
  print("[mae] held-out loss: " + ", ".join(f"{n}={v:.4f}" for n, v in losses.items()))
  return status
