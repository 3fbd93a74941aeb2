"""`m2dino advise probe`: lookahead affinities and per-task data-scaling points of the multi-task model.

From a shared state (the config's `advise.checkpoint` params, else `advise.warmup_steps` all-task steps from
the config's initialisation), for every pair of tasks (i, j): one step on task j, then task i's held-out loss
(affinity.py). Steps reuse the multi-task train program of the task's type (train/multitask/steps.py: one
program per type, lax.switch over the type's heads, here compiled without donation so the shared state is
reused); losses use one forward-only program per type built the same way. Steps run at schedule step
`advise.probe_step` (so the warm-up's zero learning rate does not hide the effect).

Held-out batches come from the eval split (`data.eval_split`) with the eval transforms; step batches from the
train split. Optional data-scaling points (`advise.scale_fractions`, the study's `data.train_fraction` knob):
`advise.scale_steps` steps on one task's fraction-f subset from the shared state, then its held-out loss.

Budget: `advise.budget` program calls (steps + forward losses, warm-up and scaling included); the number of
repeats is planned to fit it and the calls used and seconds are written to probe.json.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from m2dino_jax import fileio
from m2dino_jax.advise import affinity
from m2dino_jax.data import pipeline
from m2dino_jax.errors import ConfigError
from m2dino_jax.tasks import registry, types
from m2dino_jax.train import checkpointing
from m2dino_jax.train.multitask import steps as multitask_steps
from m2dino_jax.train.multitask import trainer


def loss_program(enc_gdef, head_gdefs: dict, tasks: list[registry.Task], loss_cfg):
  """`program(params, batch, bound) -> loss`: forward only (train=False), the batch task's head via
  lax.switch over the type's heads (as steps.train_program)."""
  names = [t.name for t in tasks]

  def program(params, batch, bound):
    enc_out, _ = multitask_steps.forward_encoder(enc_gdef, params["encoder"], bound["enc_rest"], batch,
                                                 train=False)
    arrays, restore = multitask_steps._split_static(enc_out)
    heads = tuple(params["heads"][n] for n in names)

    def branch(i):
      def f(head_params, enc_arrays):
        pred = nnx.merge(head_gdefs[names[i]], head_params[i])(restore(enc_arrays), batch["image"].shape[1:3])
        return types.task_loss(tasks[i], pred, batch, loss_cfg)[0]
      return f

    return jax.lax.switch(multitask_steps._head_index(bound, batch), [branch(i) for i in range(len(names))],
                          heads, arrays)

  return program


def _parse_fractions(spec: str) -> list[float]:
  try:
    out = [float(x) for x in str(spec or "").split(",") if x.strip()]
  except ValueError:
    raise ConfigError("advise.scale_fractions", f"'{spec}': a comma list of fractions in (0, 1]") from None
  if any(not 0 < f <= 1 for f in out):
    raise ConfigError("advise.scale_fractions", f"'{spec}': fractions must be in (0, 1]")
  return out


class Prober:
  """The probe of one config: a `_Run` of all the config's tasks (paradigm forced to AU) and its programs."""

  def __init__(self, config):
    self.config = config.copy_and_resolve_references()
    with self.config.unlocked():
      self.config.paradigm = "au"
      self.config.groups = ""
      self.config.data.mixture = "uniform"
    self.tasks = registry.resolve(self.config.tasks)
    self.run = trainer._Run(self.config, None, "probe", self.tasks)
    self.a = self.config.advise
    self.calls = 0
    self._steps, self._losses = {}, {}

  # -- programs
  def _step_program(self, task_type):
    if task_type not in self._steps:
      r = self.run
      self._steps[task_type] = jax.jit(multitask_steps.train_program(r.model.enc_gdef, r.model.head_gdefs,
                                                                     r.by_type[task_type], r.settings))
    return self._steps[task_type]

  def _loss_program(self, task_type):
    if task_type not in self._losses:
      r = self.run
      self._losses[task_type] = jax.jit(loss_program(r.model.enc_gdef, r.model.head_gdefs, r.by_type[task_type],
                                                     self.config.loss))
    return self._losses[task_type]

  def step(self, state, task, batch):
    self.calls += 1
    with jax.set_mesh(self.run.mesh):
      new, _ = self._step_program(task.type)(state, batch, self.run.bound[task.type])
    return new

  def loss(self, params, task, batch) -> float:
    self.calls += 1
    with jax.set_mesh(self.run.mesh):
      return float(self._loss_program(task.type)(params, batch, self.run.bound[task.type]))

  # -- data
  def _batches(self, data_cfg, task, count: int, seed: int) -> list:
    it = pipeline.make_train_iterator(data_cfg, [task], seed=seed)
    out = [self.run.prepare(next(it))["batch"] for _ in range(count)]
    it.close()
    return out

  def _held_out_config(self):
    d = self.config.data.copy_and_resolve_references()
    with d.unlocked():
      d.train_split = d.eval_split
      d.transforms.train = list(d.transforms.eval)
      d.train_fraction, d.max_train_per_task, d.train_per_task = 1.0, 0, ""
    return d

  # -- the probe
  def shared_state(self):
    state = self.run.state
    if str(self.a.checkpoint).strip():
      params = checkpointing.restore_params(self.a.checkpoint, state.params)
      return state.replace(params=params), 0
    n = int(self.a.warmup_steps)
    if n > 0:
      it = map(self.run.prepare, pipeline.make_train_iterator(self.config.data, self.tasks, seed=self.config.seed))
      for _ in range(n):
        b = next(it)
        state = self.step(state, b["task"], b["batch"])
    return state, n

  def probe(self) -> dict:
    t0 = time.perf_counter()
    a, tasks, n = self.a, self.tasks, len(self.tasks)
    fractions = _parse_fractions(a.scale_fractions)
    scale_calls = len(fractions) * n * (int(a.scale_steps) + int(a.repeats)) if fractions else 0
    reserved = (0 if str(a.checkpoint).strip() else int(a.warmup_steps)) + scale_calls
    repeats = affinity.plan_repeats(n, int(a.budget), int(a.repeats), reserved=reserved)
    state, _ = self.shared_state()
    state = state.replace(step=np.int32(a.probe_step))
    seed = int(self.config.seed)
    held_cfg = self._held_out_config()
    step_b = {t.name: self._batches(self.config.data, t, repeats, seed + 1) for t in tasks}
    held_b = {t.name: self._batches(held_cfg, t, max(repeats, int(a.repeats)), seed + 2) for t in tasks}
    result = affinity.lookahead_affinity(
        lambda s, j, r: self.step(s, tasks[j], step_b[tasks[j].name][r]),
        lambda s, i, r: self.loss(s.params, tasks[i], held_b[tasks[i].name][r]),
        state, n, repeats)
    scaling = self._scaling(state, fractions, held_b) if fractions else {}
    seconds = time.perf_counter() - t0
    return {"tasks": [t.name for t in tasks], "types": [t.type for t in tasks],
            "affinity": result["affinity"].tolist(), "affinity_per_repeat": result["affinity_per_repeat"].tolist(),
            "base_loss": result["base_loss"].tolist(), "repeats": repeats, "scaling": scaling,
            "train_sizes": pipeline.train_sizes(self.config.data, tasks),
            "batch_size": int(self.config.data.batch_size), "steps_per_task": int(self.config.steps_per_task),
            "seed": seed, "budget": {"calls_allowed": int(a.budget), "calls_used": self.calls,
                                     "affinity_calls": result["calls"], "scaling_calls": scale_calls,
                                     "seconds": seconds, "affinity_seconds": result["seconds"]},
            "config": {k: self.a[k] for k in self.a.keys()}}

  def _scaling(self, state, fractions, held_b) -> dict:
    """{task: {"d": [train examples], "loss": [held-out loss]}} after scale_steps steps on the subset."""
    out = {}
    for t in self.tasks:
      ds, losses = [], []
      for f in fractions:
        d = self.config.data.copy_and_resolve_references()
        with d.unlocked():
          d.train_fraction = float(f)
        size = pipeline.train_sizes(d, [t])[t.name]["used"]
        s = state
        for b in self._batches(d, t, int(self.a.scale_steps), int(self.config.seed) + 3):
          s = self.step(s, t, b)
        losses.append(float(np.mean([self.loss(s.params, t, b) for b in held_b[t.name][:int(self.a.repeats)]])))
        ds.append(size)
      out[t.name] = {"d": ds, "loss": losses, "fractions": fractions}
    return out


def run_probe(config, out_path) -> dict:
  record = Prober(config).probe()
  fileio.write_json(out_path, record)
  return record
