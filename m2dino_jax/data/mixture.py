"""Task mixture weights, and the worker stride that keeps a Grain mixture identical for any worker count.

Weights: 'uniform' (1 each), 'size' (p_i ∝ n_i), 'temperature' (p_i ∝ n_i^(1/T)) or 'json' (a file:
a flat {task: w} or the scaling allocator's {"weights": {...}}). Tasks with weight 0 leave the mixture.

Why a stride: `IterDataset.mp_prefetch` slices every MapDataset under it, so with n workers each
worker would mix its own slices of the tasks and the interleaved output would depend on n. Here the
mixture runs over cheap *plans* (task, example indices, per-example seeds); `WorkerStrideIterDataset`
takes Grain's per-worker slice itself and keeps every n-th plan of the full mixed stream, so worker w
materialises exactly global positions w, w + n, ... and the round-robin output is the 0-worker stream.
"""

from __future__ import annotations

from collections.abc import Mapping

import grain

from m2dino_jax.errors import ConfigError

MIXTURES = ("uniform", "size", "temperature", "json")


def load_mixture_weights(path) -> dict[str, float]:
  """{task: weight} (sum 1) from a JSON file: a flat mapping or the allocator's {"weights": {...}}.

  Delegates to the scaling allocator's reader, so the closed loop allocation.json -> mixture has one
  parser; bad files raise DataError naming the file and key.
  """
  from m2dino_jax.scaling import allocation_io
  return allocation_io.read_allocation_weights(path)


def mixture_weights(kind: str, sizes: Mapping[str, int], *, temperature: float = 1.0,
                    weights_file: str = "") -> dict[str, float]:
  """Normalised weights over the tasks in `sizes` (sum 1); tasks with weight 0 are left out."""
  if kind == "uniform":
    raw = {t: 1.0 for t in sizes}
  elif kind == "size":
    raw = {t: float(n) for t, n in sizes.items()}
  elif kind == "temperature":
    if not temperature > 0:
      raise ConfigError("temperature", f"must be > 0, got {temperature}")
    raw = {t: float(n) ** (1.0 / temperature) for t, n in sizes.items()}
  elif kind == "json":
    if not weights_file:
      raise ConfigError("weights_file", "mixture 'json' needs weights_file")
    table = load_mixture_weights(weights_file)
    missing = [t for t in sizes if t not in table]
    if missing:
      raise ConfigError("weights_file", f"'{weights_file}' has no weight for task(s) {', '.join(missing)}")
    raw = {t: table[t] for t in sizes}
  else:
    raise ConfigError("mixture", f"unknown mixture '{kind}'; use one of {', '.join(MIXTURES)}")
  raw = {t: w for t, w in raw.items() if w > 0 and sizes[t] > 0}
  total = sum(raw.values())
  if not raw or total <= 0:
    raise ConfigError("mixture", f"every task has weight 0 under mixture '{kind}'")
  return {t: w / total for t, w in raw.items()}


class WorkerStrideIterDataset(grain.IterDataset):
  """Yields (element, state after it) of its parent, or, once Grain gives it a worker slice (w::n),
  only every n-th element from position `start + w`.

  It absorbs the slice (parents are not sliced), so each worker walks the whole parent stream; keep
  the parent cheap (plans, not pixels) and do the heavy work in a map after this dataset. The state
  {"parent", "position"} travelling with each element is the same whatever the worker count, so a
  pipeline rebuilt from it (`start_state`) continues exactly, with any number of workers.
  """

  def __init__(self, parent: grain.IterDataset, start_state: dict | None = None):
    super().__init__(parent)
    self._start_state = start_state
    self._offset, self._step = 0, 1

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice  # a stride of an infinite stream; there is no sequential variant
    self._offset, self._step = sl.start or 0, sl.step or 1

  def __iter__(self):
    return _WorkerStrideIterator(self._parent.__iter__(), self._start_state, self._offset, self._step)

  def __str__(self) -> str:
    return f"WorkerStrideIterDataset(offset={self._offset}, step={self._step})"


def initial_state() -> dict:
  """The stride state of a stream nothing has been read from."""
  return {"parent": None, "position": 0}


class _WorkerStrideIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, start_state: dict | None, offset: int, step: int):
    super().__init__(parent)
    start_state = start_state or initial_state()
    if start_state["parent"] is not None:
      parent.set_state(start_state["parent"])
    self._position = self._first = int(start_state["position"])  # parent position of the next read
    self._offset, self._step = offset, step

  def __next__(self):
    while (self._position - self._first - self._offset) % self._step:
      next(self._parent)
      self._position += 1
    element = next(self._parent)
    self._position += 1
    return element, {"parent": self._parent.get_state(), "position": self._position}

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "position": self._position, "first": self._first}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._position, self._first = int(state["position"]), int(state["first"])
