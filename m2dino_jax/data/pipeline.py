"""Grain input pipelines: per-task datasets, a weighted task mixture, process shards, eval batches.

Train stream (one per process), built so it is a pure function of (config, seed) and its process's
slice of it:

  per task:  plans = source indices -> shuffle(seed) -> repeat
                     -> random_map(draw a per-example seed) -> batch(global batch)
  mixture:   grain.IterDataset.mix({task: plans}, {task: weight})   (one task per batch; a mapping,
             so a restored iterator may get new weights or tasks: task streams resume by name)
  process:   keep rows [p * local, (p + 1) * local) of every global plan batch
  workers:   WorkerStrideIterDataset -> map(load records + transforms) -> mp_prefetch(worker_count)

Plans are cheap (indices and seeds), the pixels are made after the stride, so the output is
identical for 0, 1 or N workers (see mixture.py), and so is the checkpoint state (TrainIterator).
Every process walks the same global plan order and materialises only its rows, so the global batch
of step s is the same for 1 or P processes (a P-process run equals a 1-process run), every process
draws the same task at every step (SPMD friendly), and the iterator state is the same on every
process: a checkpoint written by P processes resumes on Q processes at the same global position.

Sources ('folder' | 'tfds' | 'synthetic') give, per task, a random-access sequence of Records;
tests and tools may pass `sources={task: [Record, ...]}` directly.

Data scale: `train_fraction`, `max_train_per_task` and `train_per_task` shrink each task's train split to
a subset (`train_subset`) before anything else. The subset is a pure function of (task, n, size,
subset_seed): the same examples for every paradigm, model and training seed, and nested (a smaller size
is a prefix of the same permutation, so 10% is inside 30%). Evaluation splits are never subsampled.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import weakref
from collections.abc import Mapping, Sequence

import grain
import ml_collections
import numpy as np

from m2dino_jax.data import mixture, records, transforms
from m2dino_jax.errors import ConfigError, DataError, config_section
from m2dino_jax.tasks import registry

DEFAULT_TRAIN_TRANSFORMS = ("letterbox", "affine(scale=(0.8, 1.2), rotate=30, translate=0.1, p=0.5)",
                            "flip(p=0.5)", "intensity(contrast=0.3, brightness=0.1, p=0.5)",
                            "gamma(range=(0.7, 1.5), p=0.5)", "gain(range=(0.8, 1.25), p=0.5)",
                            "speckle(sigma=(0.0, 0.15), p=0.5)", "normalize")
DEFAULT_EVAL_TRANSFORMS = ("letterbox", "normalize")


def default_data_config() -> ml_collections.ConfigDict:
  """The data section of every training config (unlocked: experiment configs override and lock)."""
  c = ml_collections.ConfigDict()
  c.source = ml_collections.ConfigDict()
  c.source.kind = "synthetic"  # 'folder' | 'tfds' | 'synthetic'
  c.source.adapter = "fmc_uia"  # folder: adapter name (m2dino_jax.data.adapters.NAMES)
  c.source.root = ""  # folder: dataset root as released
  c.source.dataset = ""  # tfds: dataset name
  c.source.data_dir = ""  # tfds: data dir
  c.source.synthetic_count = 64  # synthetic: images per task and split (<= 0: sonosynth's task sizes)
  c.source.synthetic_scale = 0.1  # synthetic with count <= 0: sonosynth.task_size scale (sizes differ > 10x)
  c.source.synthetic_size = 256  # synthetic: simulated image side in pixels
  c.train_split = "train"
  c.eval_split = "val"
  c.image_size = 224
  c.channels = 3  # grey is replicated to this many channels
  c.transforms = ml_collections.ConfigDict()
  c.transforms.train = list(DEFAULT_TRAIN_TRANSFORMS)
  c.transforms.eval = list(DEFAULT_EVAL_TRANSFORMS)
  c.batch_size = 32  # global, over all processes
  c.eval_batch_size = 32  # global
  c.mixture = "size"  # 'uniform' | 'size' | 'temperature' | 'json'
  c.temperature = 2.0  # p_i ∝ n_i^(1/T)
  c.weights_file = ""  # mixture 'json': {task: w} or allocation.json {"weights": {...}}
  c.worker_count = 0  # Grain worker processes (0 = in the main process)
  c.prefetch = 2  # batches buffered per worker (or by one thread when worker_count = 0)
  c.seed = 0
  c.one_task_per_batch = True
  # data scale (train split only; see `train_subset`)
  c.train_fraction = 1.0  # of every task's train examples, in (0, 1]
  c.max_train_per_task = 0  # cap per task after the fraction (0 = none)
  c.train_per_task = ""  # per-task override 'task=0.25,task=40': with a '.' a fraction, else a count
  c.subset_seed = 0  # which subset (independent of the training seed)
  return c


# ----------------------------------------------------------------------------- sources


def as_record(item) -> records.Record:
  """A Record from a Record or a record dict (TFDS source rows), keeping only Record fields."""
  if isinstance(item, records.Record):
    return item
  if isinstance(item, Mapping):
    fields = records.Record.__dataclass_fields__
    rec = records.Record(**{k: v for k, v in item.items() if k in fields})
    if isinstance(rec.task, bytes):
      rec.task = rec.task.decode()
    return rec
  raise DataError("<source>", f"expected a Record or a record dict, got {type(item).__name__}")


class _TaskView:
  """Random access to the rows of one task inside a mixed random-access source."""

  def __init__(self, source, indices: np.ndarray):
    self._source, self._indices = source, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int):
    return self._source[int(self._indices[i])]


def _group_by_task(items, tasks: Sequence[str]) -> dict[str, list]:
  out: dict[str, list] = {t: [] for t in tasks}
  for item in items:
    rec = as_record(item)
    if rec.task in out:
      out[rec.task].append(rec)
  return out


def _synthetic(cfg, tasks, split):
  from m2dino_jax.data import sonosynth
  split_seed = {"train": 0, "val": 1, "test": 2}.get(split, 3)
  out = {}
  for t in tasks:
    n = int(cfg.synthetic_count)
    n = n if n > 0 else sonosynth.task_size(t, float(cfg.synthetic_scale))
    out[t] = sonosynth.generate(t, n, seed=1000 + split_seed, size=int(cfg.synthetic_size))
  return out


def _folder(cfg, tasks, split):
  from m2dino_jax.data import adapters
  read = adapters.get(cfg.adapter)
  read = getattr(read, "read", read)
  return _group_by_task(read(cfg.root, split), tasks)


def _tfds(cfg, tasks, split):
  from m2dino_jax.data import tfds as tfds_builders
  source = tfds_builders.source(cfg.dataset, split, cfg.data_dir)
  names = np.array(source.tasks)  # the task of every row, indexed at build time
  return {t: _TaskView(source, np.flatnonzero(names == t)) for t in tasks}


SOURCE_KINDS = {"synthetic": _synthetic, "folder": _folder, "tfds": _tfds}


@functools.lru_cache(maxsize=8)
def _load_sources_cached(source_json: str, tasks: tuple[str, ...], split: str):
  cfg = ml_collections.ConfigDict(json.loads(source_json))
  if cfg.kind not in SOURCE_KINDS:
    raise ConfigError("source.kind", f"unknown source '{cfg.kind}'; use one of {', '.join(SOURCE_KINDS)}")
  return SOURCE_KINDS[cfg.kind](cfg, list(tasks), split)


@config_section("data")
def load_sources(config, tasks, split: str) -> dict[str, Sequence]:
  """{task: random-access records} for the configured source (cached per source config and split)."""
  names = tuple(t.name for t in _resolve(tasks))
  return _load_sources_cached(config.source.to_json(), names, split)


def _resolve(tasks) -> list[registry.Task]:
  if isinstance(tasks, str) or (tasks and isinstance(next(iter(tasks)), str)):
    return registry.resolve(tasks)
  return list(tasks)


@config_section("data")
def task_sizes(config, tasks, *, split: str | None = None, sources=None) -> dict[str, int]:
  """Number of examples per task (all processes together) in the train split by default."""
  sources = sources if sources is not None else load_sources(config, tasks, split or config.train_split)
  return {t.name: len(sources[t.name]) for t in _resolve(tasks)}


# ----------------------------------------------------------------------------- data scale


def _parse_per_task(spec: str) -> dict[str, float | int]:
  """'task=0.25,task=40' -> {task: 0.25, task: 40}: with a '.' a fraction in (0, 1], else a count >= 1."""
  out: dict[str, float | int] = {}
  for item in filter(None, (s.strip() for s in str(spec or "").split(","))):
    name, _, raw = (p.strip() for p in item.partition("="))
    if name not in registry.BY_NAME:
      raise ConfigError("data.train_per_task", f"unknown task '{name}' in '{item}'{registry.suggest(name)}")
    try:
      value: float | int = float(raw) if "." in raw else int(raw)
    except ValueError:
      value = 0
    if not (0 < value <= 1 if isinstance(value, float) else value >= 1):
      raise ConfigError("data.train_per_task", f"bad item '{item}'; use task=FRACTION (0 < f <= 1, written "
                        "with a '.') or task=COUNT (an integer >= 1)")
    out[name] = value
  return out


def subset_size(config, task: str, n: int) -> int:
  """Train examples of `task` to use out of its `n`: fraction (rounded half up, at least 1), then the cap;
  a `train_per_task` entry replaces both. Data configs without the keys use all examples."""
  if n <= 0:
    return 0
  fraction = float(config.get("train_fraction", 1.0))
  if not 0 < fraction <= 1:
    raise ConfigError("data.train_fraction", f"must be in (0, 1], got {fraction}")
  cap = int(config.get("max_train_per_task", 0))
  if cap < 0:
    raise ConfigError("data.max_train_per_task", f"must be >= 0 (0 = no cap), got {cap}")
  override = _parse_per_task(config.get("train_per_task", "")).get(task)
  if isinstance(override, int):
    return min(n, override)
  if override is not None:
    return max(1, min(n, math.floor(override * n + 0.5)))
  k = max(1, math.floor(fraction * n + 0.5))
  return min(n, k, cap) if cap > 0 else min(n, k)


def subset_indices(task: registry.Task | str, n: int, k: int, subset_seed: int = 0) -> np.ndarray:
  """The k kept rows of an n-row task, sorted: the first k of a permutation seeded by (subset_seed, task)."""
  task = registry.get(task) if isinstance(task, str) else task
  perm = np.random.default_rng([int(subset_seed), task.index, 0x5CA1E]).permutation(n)
  return np.sort(perm[:k])


def train_subset(config, tasks, sources: Mapping[str, Sequence]) -> dict[str, Sequence]:
  """`sources` with each task's train rows cut to its configured data scale (unchanged at full scale)."""
  out = {}
  for task in _resolve(tasks):
    src = sources[task.name]
    n = len(src)
    k = subset_size(config, task.name, n)
    out[task.name] = src if k == n else _TaskView(src, subset_indices(task, n, k, config.get("subset_seed", 0)))
  return out


def train_sizes(config, tasks, *, sources=None) -> dict[str, dict[str, int]]:
  """{task: {"used": train examples after the data scale, "available": before}}."""
  tasks = _resolve(tasks)
  sources = sources if sources is not None else load_sources(config, tasks, config.train_split)
  return {t.name: {"used": subset_size(config, t.name, len(sources[t.name])), "available": len(sources[t.name])}
          for t in tasks}


# ----------------------------------------------------------------------------- train stream


def _per_process(batch: int, process_count: int, key: str) -> int:
  if batch <= 0 or batch % process_count:
    raise ConfigError(key, f"global batch {batch} must be a positive multiple of the "
                      f"{process_count} processes")
  return batch // process_count


class _ProcessRows(grain.transforms.Map):
  """A global plan batch -> this process's contiguous rows (the rows its devices hold in the global batch)."""

  def __init__(self, process_index: int, local_batch: int):
    self.start, self.stop = process_index * local_batch, (process_index + 1) * local_batch

  def map(self, plan):
    return {k: v[self.start:self.stop] for k, v in plan.items()}


class _DrawSeed(grain.transforms.RandomMap):
  """Plan of one example: which source row, and the seed of its transforms."""

  def __init__(self, task_index: int):
    self.task_index = task_index

  def random_map(self, index, rng: np.random.Generator):
    return {"task": np.int32(self.task_index), "index": np.int64(index),
            "seed": rng.integers(0, 2**63 - 1, dtype=np.int64)}


STATE_KEY = "_stream_state"  # rides along with each batch from the (worker-side) stride to TrainIterator


class _Materialize(grain.transforms.Map):
  """(plans, stream state) -> a batch of model-ready examples (the heavy part: decode, warp, jitter)."""

  def __init__(self, sources: Mapping[str, Sequence], task_names: Sequence[str], pipeline):
    self.sources, self.task_names, self.pipeline = sources, list(task_names), pipeline

  def example(self, task_index, index, seed) -> dict:
    rec = as_record(self.sources[self.task_names[int(task_index)]][int(index)])
    return self.pipeline(rec, np.random.default_rng(int(seed)))

  def map(self, plan_and_state):
    plan, state = plan_and_state
    examples = [self.example(t, i, s) for t, i, s in zip(plan["task"], plan["index"], plan["seed"])]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch[STATE_KEY] = state
    return batch


class TrainIterator(grain.DatasetIterator):
  """The train stream with a checkpoint state that does not depend on the worker count.

  Its state is the mixture's state after the last returned batch plus the stream position
  (mixture.WorkerStrideIterDataset); set_state rebuilds the Grain pipeline from it, so a state
  saved with N workers restores with M workers, and with the weights this iterator was built with.
  """

  def __init__(self, build):
    super().__init__()
    self._build, self._state, self._it = build, mixture.initial_state(), None

  def _iterator(self):
    if self._it is None:
      self._it = self._build(self._state).__iter__()
    return self._it

  def __next__(self) -> dict:
    batch = next(self._iterator())
    self._state = batch.pop(STATE_KEY)
    return batch

  def get_state(self) -> dict:
    return self._state

  def set_state(self, state: dict) -> None:
    self.close()
    self._state = state

  def start_prefetch(self) -> None:
    self._iterator().start_prefetch()

  def close(self) -> None:
    if self._it is not None:
      self._it.close()
      self._it = None


def _task_seeds(seed: int, task: registry.Task) -> tuple[int, int]:
  """Independent 32-bit (shuffle, per-example) seeds of one task's global stream (the same on every
  process; the trailing 0 keeps the streams of earlier single-process runs)."""
  shuffle_seed, example_seed = np.random.SeedSequence([seed, task.index, 0]).generate_state(2)
  return int(shuffle_seed), int(example_seed)


@config_section("data")
def make_train_iterator(config, tasks, *, seed: int | None = None, process_index: int = 0,
                        process_count: int = 1, sources=None, weights: Mapping[str, float] | None = None):
  """The infinite train iterator of this process: numpy batch dicts, leading dim = per-process batch.

  Each task's rows are first cut to the configured data scale (`train_subset`); the 'size' mixture then
  weighs the subsets. `weights` overrides the configured mixture ({task: w}). get_state/set_state round-trip through
  grain.checkpoint (Orbax), also into an iterator built with other weights or another worker count.
  """
  tasks = _resolve(tasks)
  seed = int(config.seed if seed is None else seed)
  if not 0 <= process_index < process_count:
    raise ConfigError("process_index", f"{process_index} is not in 0..{process_count - 1}")
  sources = sources if sources is not None else load_sources(config, tasks, config.train_split)
  sources = train_subset(config, tasks, sources)
  sizes = task_sizes(config, tasks, sources=sources)
  empty = [t for t, n in sizes.items() if n == 0]
  if empty:
    raise DataError(f"split '{config.train_split}'", f"no examples for task(s) {', '.join(empty)}")
  if weights is None:
    weights = mixture.mixture_weights(config.mixture, sizes, temperature=float(config.temperature),
                                      weights_file=config.weights_file)
  weights = {t: float(w) for t, w in weights.items() if w > 0 and t in sizes}
  if not weights:
    raise ConfigError("mixture", "no task has a positive weight")
  global_batch = int(config.batch_size)
  local_batch = _per_process(global_batch, process_count, "batch_size")
  names = [t.name for t in tasks]
  plans = {}
  for i, task in enumerate(tasks):
    if task.name not in weights:
      continue
    shuffle_seed, example_seed = _task_seeds(seed, task)
    ds = (grain.MapDataset.source(np.arange(sizes[task.name])).shuffle(seed=shuffle_seed).repeat()
          .random_map(_DrawSeed(i), seed=example_seed))
    if config.one_task_per_batch:
      ds = ds.batch(global_batch, drop_remainder=True)
    plans[task.name] = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  pipe = transforms.Pipeline(config.transforms.train, config.image_size, config.channels)
  materialize = _Materialize(sources, names, pipe)

  def build(start_state: dict) -> grain.IterDataset:
    mixed = grain.IterDataset.mix(plans, {t: weights[t] for t in plans})
    if not config.one_task_per_batch:
      mixed = mixed.batch(global_batch, drop_remainder=True)
    if process_count > 1:
      mixed = mixed.map(_ProcessRows(process_index, local_batch))
    ds = mixture.WorkerStrideIterDataset(mixed, start_state).map(materialize)
    return _parallelise(ds, int(config.worker_count), int(config.prefetch))

  iterator = TrainIterator(build)
  _OPEN_ITERATORS.add(iterator)
  return iterator


# Prefetch threads still reading (e.g. ArrayRecord) while the interpreter shuts down abort the process;
# iterators nobody closed are closed at exit instead.
_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
  for iterator in list(_OPEN_ITERATORS):
    iterator.close()


def _parallelise(ds: grain.IterDataset, worker_count: int, prefetch: int) -> grain.IterDataset:
  if worker_count < 0:
    raise ConfigError("worker_count", f"must be >= 0, got {worker_count}")
  if worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain workers read absl flags (REFERENCE.md: the Grain gotcha)
      flags.FLAGS.mark_as_parsed()
    options = grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=max(1, prefetch))
    return ds.mp_prefetch(options)
  if prefetch > 0:
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds


# ----------------------------------------------------------------------------- eval


class _EvalBatch(grain.transforms.Map):
  """Batch number -> the examples of this process's block in order, the tail padded with valid=False."""

  def __init__(self, source, indices: np.ndarray, batch: int, pipeline):
    self.source, self.indices, self.batch, self.pipeline = source, indices, batch, pipeline

  def map(self, b):
    chunk = self.indices[b * self.batch:(b + 1) * self.batch]
    examples = [self.pipeline(as_record(self.source[int(i)])) for i in chunk]
    if not examples:  # a process whose block ran out: a full batch of padding shaped like any example
      examples = [transforms.padding_example(self.pipeline(as_record(self.source[0])))]
      chunk = chunk[:0]
    examples += [transforms.padding_example(examples[0])] * (self.batch - len(chunk))
    out = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    out["valid"][len(chunk):] = False
    return out


@config_section("data")
def make_eval_batches(config, task, split: str | None = None, *, process_index: int = 0,
                      process_count: int = 1, sources=None) -> grain.MapDataset:
  """Finite eval batches of one task: every example exactly once over all processes, in order.

  Each process takes a contiguous block; every process gets the same number of batches (SPMD), the
  tail padded with valid=False examples. Transforms are config.transforms.eval (deterministic).
  """
  task = registry.get(task) if isinstance(task, str) else task
  split = split or config.eval_split
  source = sources[task.name] if sources is not None else load_sources(config, [task], split)[task.name]
  n = len(source)
  if n == 0:
    raise DataError(f"split '{split}'", f"no examples for task {task.name}")
  local_batch = _per_process(int(config.eval_batch_size), process_count, "eval_batch_size")
  block = math.ceil(n / process_count)
  indices = np.arange(process_index * block, min(n, (process_index + 1) * block))
  num_batches = math.ceil(block / local_batch)
  pipe = transforms.Pipeline(config.transforms.eval, config.image_size, config.channels)
  return grain.MapDataset.range(num_batches).map(_EvalBatch(source, indices, local_batch, pipe))
