"""M2DINO multi-task trainer: TS / CG / AU paradigms from one config.

  au  one model for all the config's tasks, MoE on;
  cg  one model per clinical group (config.groups, default: registry's organ groups), MoE on;
  ts  one model per task, MoE off.

Step budget rule (the same for all paradigms): a model with T tasks trains `steps_per_task * T` steps
with batches of one task each, drawn by the configured mixture, so the total number of batches (and
compute) over all models of a paradigm is the same and every task sees about the same number of
batches under a uniform mixture. Each model lives in WORKDIR/<model name>/ (AU: WORKDIR/all/) with its
checkpoints (ckpt/, best/), metrics.jsonl, TensorBoard events and eval/STEP.json files.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2dino_jax import fileio
from m2dino_jax import mesh as mesh_lib
from m2dino_jax.advise import adviceio
from m2dino_jax.data import pipeline
from m2dino_jax.errors import ConfigError
from m2dino_jax.models import convert, moe_dispatch, vit
from m2dino_jax.models import moe as moe_lib
from m2dino_jax.tasks import baselines, registry, table, types
from m2dino_jax.tasks import results as results_lib
from m2dino_jax.train import checkpointing, core, loop, optim
from m2dino_jax.train import workdir as workdir_lib
from m2dino_jax.train.multitask import eval as multitask_eval
from m2dino_jax.train.multitask import steps as multitask_steps
from m2dino_jax.train.multitask import sweep as multitask_sweep

PARADIGMS = results_lib.PARADIGMS


def plan_models(config) -> list[tuple[str, list[registry.Task]]]:
  """[(model name, tasks)] for the config's paradigm."""
  tasks = registry.resolve(config.tasks)
  if not tasks:
    raise ConfigError("tasks", "no tasks selected")
  if config.paradigm == "au":
    return [("all", tasks)]
  if config.paradigm == "ts":
    return [(t.name, [t]) for t in tasks]
  if config.paradigm == "cg":
    spec = parse_groups(config.groups)
    groups = {g: registry.resolve(names, "groups") for g, names in spec.items()}
    chosen = {t.name for t in tasks}
    plan = [(g, [t for t in members if t.name in chosen]) for g, members in groups.items()]
    plan = [(g, ts) for g, ts in plan if ts]
    covered = [t.name for _, ts in plan for t in ts]
    missing = sorted(chosen - set(covered))
    if missing:
      raise ConfigError("groups", f"tasks {missing} belong to no group")
    if len(covered) != len(set(covered)):
      raise ConfigError("groups", "a task appears in two groups")
    return plan
  raise ConfigError("paradigm", f"'{config.paradigm}' is not one of {PARADIGMS}")


def moe_enabled(config) -> bool:
  return bool(config.moe.enabled) and config.paradigm != "ts"


def parse_groups(spec) -> dict[str, list[str]]:
  """CG groups from `config.groups` (see `registry.parse_groups`): '' = the default preset ('paper'), a
  preset name ('paper' | 'organ' | 'type'), 'name:task+task;name:task', a JSON file {name: [task, ...]} or an
  advice.json from `m2dino advise fit` (its "groups")."""
  advised = adviceio.read_groups(spec) if str(spec or "").strip().endswith(".json") else None
  if advised is not None:
    for members in advised.values():
      registry.resolve(members, "groups")
    return advised
  return registry.parse_groups(spec)


@dataclasses.dataclass
class ModelDef:
  """The static half of a model: graph definitions and the encoder config."""
  enc_gdef: nnx.GraphDef
  head_gdefs: dict
  encoder_cfg: vit.ViTConfig


def model_moe_config(config, tasks: list[registry.Task]):
  """The MoE config of one model: with routing_loss 'task' and no `task_experts`, the model's tasks get
  round-robin experts (disjoint while tasks x top_k <= experts)."""
  moe = config.moe
  if moe.routing_loss != "task" or str(moe.task_experts).strip():
    return moe
  moe = moe.copy_and_resolve_references()
  chosen = moe_lib.round_robin_experts([t.task_id for t in tasks], moe.num_experts, moe.top_k)
  with moe.ignore_type():
    moe.task_experts = ";".join(f"{t.name}:{'+'.join(map(str, chosen[t.task_id]))}" for t in tasks)
  return moe


def build_modules(config, tasks: list[registry.Task], *, moe_on: bool, seed: int):
  """(encoder, {task: head}) NNX modules of one model."""
  cfg = vit.ViTConfig.from_config(config.model)
  rngs = nnx.Rngs(seed)
  encoder = vit.Encoder(cfg, moe=model_moe_config(config, tasks) if moe_on else None,
                        num_tasks=registry.NUM_TASKS, rngs=rngs)
  heads = {t.name: types.build_head(t, cfg.dim, cfg.patch, len(cfg.out_blocks), config.heads, rngs=rngs)
           for t in tasks}
  return encoder, heads


def split_model(encoder, heads):
  enc_gdef, enc_params, enc_rest = nnx.split(encoder, nnx.Param, ...)
  head_split = {n: nnx.split(m, nnx.Param) for n, m in heads.items()}
  return enc_gdef, enc_params, enc_rest, {n: g for n, (g, _) in head_split.items()}, \
      {n: p for n, (_, p) in head_split.items()}


def _total_steps(config, num_tasks: int) -> int:
  return int(config.total_steps) if config.total_steps > 0 else int(config.steps_per_task) * num_tasks


def _check(config) -> None:
  if config.data.channels != config.model.in_chans:
    raise ConfigError("data.channels", f"{config.data.channels} must equal model.in_chans {config.model.in_chans}")
  if config.data.image_size % vit.ViTConfig.from_config(config.model).patch:
    raise ConfigError("data.image_size", "must be divisible by the patch size")
  if not config.data.one_task_per_batch:
    raise ConfigError("data.one_task_per_batch", "the multi-task trainer applies one head per batch: "
                      "batches must hold one task each (set it to True)")


class _Run:
  """Training of one model (one of the paradigm's models)."""

  def __init__(self, config, workdir: Path | None, name: str, tasks: list[registry.Task]):
    self.config, self.workdir, self.name, self.tasks = config, workdir, name, tasks
    devices = jax.devices()[:config.mesh_devices] if config.mesh_devices > 0 else None
    self.mesh = mesh_lib.make_mesh(config.mesh.to_dict(), devices)
    self.rules = mesh_lib.get_rules(config.sharding)
    self.total = _total_steps(config, len(tasks))
    self.moe_on = moe_enabled(config)
    if self.moe_on:
      moe_dispatch.check_expert_parallel(config.moe.num_experts, config.data.batch_size, self.mesh)
    self.by_type = {}
    for t in tasks:
      self.by_type.setdefault(t.type, []).append(t)
    self._init_state()
    o, depth = config.optim, self.model.encoder_cfg.depth
    frozen = optim.frozen_mask(self.state.params["encoder"], o, depth)
    self.settings = multitask_steps.Settings(
        lr_schedule=optim.lr_schedule(o, self.total), tx=optim.adam_tx(o), head_lr_mult=float(o.head_lr_mult),
        clip_norm=float(o.clip_norm), loss_cfg=config.loss,
        enc_scales=jax.tree.map(np.float32, optim.encoder_lr_scales(self.state.params["encoder"], o, depth)),
        enc_tx=optim.adam_tx(o, frozen), enc_frozen=frozen,
        window_weight=float(config.moe.balance_loss_weight))
    enc_train, enc_total = optim.count_params(self.state.params["encoder"], frozen)
    head_total = optim.count_params(self.state.params["heads"])[1]
    self.param_counts = {"trainable": enc_train + head_total, "total": enc_total + head_total,
                         "encoder_trainable": enc_train, "encoder_total": enc_total, "heads": head_total}
    self.sizes = pipeline.train_sizes(config.data, tasks)
    weights = _task_weights(config.loss.task_weights, tasks)
    self.bound = {k: jax.device_put(multitask_steps.bound_inputs(ts, weights, self.enc_rest),
                                    mesh_lib.replicated(self.mesh)) for k, ts in self.by_type.items()}
    self._train_programs, self._eval_programs = {}, {}

  def _init_state(self) -> None:
    config, tx = self.config, optim.adam_tx(self.config.optim)
    seed_key = core.seed_data(config.seed)
    depth = vit.ViTConfig.from_config(config.model).depth

    def init():
      encoder, heads = build_modules(config, self.tasks, moe_on=self.moe_on, seed=config.seed)
      _, enc_params, enc_rest, _, head_params = split_model(encoder, heads)
      params = {"encoder": enc_params, "heads": head_params}
      enc_tx = optim.adam_tx(config.optim, optim.frozen_mask(enc_params, config.optim, depth))
      opt = {"encoder": enc_tx.init(enc_params), "heads": {n: tx.init(p) for n, p in head_params.items()}}
      moe_blocks = sum(b.is_moe for b in encoder.blocks)
      return core.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt,
                             rng=jnp.asarray(seed_key), extras=moe_lib.init_window(moe_blocks, config.moe)), enc_rest

    def shardings(abstract):
      state, rest = abstract
      return mesh_lib.state_shardings(state, self.mesh, self.rules), \
          jax.tree.map(lambda _: mesh_lib.replicated(self.mesh), rest)

    abstract_enc, abstract_heads = nnx.eval_shape(
        lambda: build_modules(config, self.tasks, moe_on=self.moe_on, seed=config.seed))
    enc_gdef, *_, head_gdefs, _ = split_model(abstract_enc, abstract_heads)
    self.model = ModelDef(enc_gdef, head_gdefs, vit.ViTConfig.from_config(config.model))
    self.moe_layers = [i for i, b in enumerate(abstract_enc.blocks) if b.is_moe]
    self.state, self.enc_rest = core.init_state(init, shardings)
    if config.init_from:
      encoder = nnx.merge(enc_gdef, jax.device_get(self.state.params["encoder"]), jax.device_get(self.enc_rest))
      convert.init_encoder_from(encoder, config.init_from)
      _, enc_params, _ = nnx.split(encoder, nnx.Param, ...)
      enc_params = mesh_lib.shard_state(enc_params, self.mesh, self.rules)
      self.state = self.state.replace(params={**self.state.params, "encoder": enc_params})
    self.state_shardings = core.shardings_of(self.state)

  def _train_program(self, task_type: str, batch):
    if task_type not in self._train_programs:
      fn = multitask_steps.train_program(self.model.enc_gdef, self.model.head_gdefs, self.by_type[task_type],
                                         self.settings)
      bound = self.bound[task_type]
      self._train_programs[task_type] = jax.jit(
          fn, in_shardings=(self.state_shardings, core.shardings_of(batch), core.shardings_of(bound)),
          out_shardings=(self.state_shardings, None), donate_argnums=(0,))
    return self._train_programs[task_type]

  def _eval_program(self, task_type: str):
    if task_type not in self._eval_programs:
      fn = multitask_steps.eval_program(self.model.enc_gdef, self.model.head_gdefs, self.by_type[task_type])
      self._eval_programs[task_type] = jax.jit(fn)
    return self._eval_programs[task_type]

  def prepare(self, batch: dict) -> dict:
    """A host batch from the pipeline -> a global batch on the mesh, with its task name (host side)."""
    task = registry.TASKS[int(batch["task_id"][0])]
    return {"task": task, "batch": mesh_lib.shard_batch(batch, self.mesh, self.rules)}

  def step(self, state, prepared: dict):
    """train_step(state, batch) -> (state, metrics): the compiled program of the batch's task type."""
    task, batch = prepared["task"], prepared["batch"]
    with jax.set_mesh(self.mesh):
      state, metrics = self._train_program(task.type, batch)(state, batch, self.bound[task.type])
    return state, {"task": task.name, **metrics}

  def evaluate(self, state, step: int) -> float:
    self.state = state
    shape = (len(self.moe_layers), registry.NUM_TASKS, self.config.moe.num_experts)
    usage = np.zeros(shape) if self.moe_on and self.moe_layers else None
    results, scores = {}, []
    diag = math.hypot(self.config.data.image_size, self.config.data.image_size)
    for task in self.tasks:
      program, bound = self._eval_program(task.type), self.bound[task.type]
      predict = lambda batch, program=program, bound=bound: program(self.state.params, batch, bound)
      results[task.name] = multitask_eval.evaluate_task(predict, task, self.config.data, self.mesh, self.rules,
                                                        usage)
      scores.append(multitask_eval.score(task, results[task.name], diag))
      results[task.name].update(n_train=self.sizes[task.name]["used"],
                                n_train_available=self.sizes[task.name]["available"])
    eval_dir = self.workdir / "eval"
    if jax.process_index() == 0:
      results_lib.write_eval(eval_dir, step, self.config.paradigm, results, data=data_scale(self.config.data))
      if usage is not None:
        ids = [t.task_id for t in self.tasks]
        results_lib.write_moe_usage(eval_dir, step, self.config.moe.num_experts, self.moe_layers,
                                    [t.name for t in self.tasks], usage.sum(axis=0)[ids].tolist(),
                                    per_layer=usage[:, ids].tolist())
    score = float(np.mean(scores))
    flat = {f"{t}/{k}": v for t, r in results.items() for k, v in r.items() if isinstance(v, (int, float))}
    self.writer.write(step, {"score": score, **flat}, prefix="eval/")
    if score > self.best_score:
      self.best_score = score
      checkpointing.save_params(self.workdir / "best" / "params", self.state.params)
      if jax.process_index() == 0:
        results_lib.write_best(eval_dir, step)
        fileio.write_json(self.workdir / "best" / "best.json", {"step": step, "score": score})
    return score

  def train(self) -> str:
    """Trains to the end (resuming if a checkpoint exists). Returns loop.COMPLETED or loop.PREEMPTED."""
    cfg = self.config
    done_file = self.workdir / "done.json"
    if done_file.is_file():
      print(f"[{self.name}] already finished; skipping", file=sys.stderr)
      return loop.COMPLETED
    c = self.param_counts
    print(f"[{self.name}] trainable parameters: {c['trainable']:,} of {c['total']:,} (encoder "
          f"{c['encoder_trainable']:,} of {c['encoder_total']:,}, heads {c['heads']:,}); freeze="
          f"'{cfg.optim.freeze}'")
    it = pipeline.make_train_iterator(cfg.data, self.tasks, seed=cfg.seed, process_index=jax.process_index(),
                                      process_count=jax.process_count())
    if jax.process_index() == 0:  # written once the config has built the model and its data (validated)
      workdir_lib.write_config(self.workdir.parent, cfg)
      fileio.write_json(self.workdir / "tasks.json", {
          "model": self.name, "tasks": [t.name for t in self.tasks], "moe": self.moe_on,
          "encoder": dataclasses.asdict(self.model.encoder_cfg), "parameters": self.param_counts,
          "train_sizes": self.sizes})
    best_file = self.workdir / "best" / "best.json"
    self.best_score = fileio.read_json(best_file, "best file")["score"] if best_file.is_file() else -math.inf
    self.writer = loop.MetricWriter(self.workdir, tensorboard=cfg.tensorboard)
    try:
      state, step, status = loop.train(
          workdir=self.workdir, state=self.state, batches=map(self.prepare, it), data_iter=it, step_fn=self.step,
          total_steps=self.total, writer=self.writer, checkpoint=cfg.checkpoint, log_every=cfg.log_every,
          eval_every=cfg.eval_every, evaluate=self.evaluate, name=self.name)
      self.state = state
    finally:
      it.close()
    if status == loop.PREEMPTED:
      return status
    self.evaluate(state, step)
    self.writer.close()
    if jax.process_index() == 0:
      fileio.write_json(done_file, {"step": step})
    return status


def data_scale(data_config) -> dict:
  """The data-scale knobs, recorded in every eval file."""
  return {k: data_config.get(k) for k in ("train_fraction", "max_train_per_task", "train_per_task",
                                          "subset_seed")}


def _task_weights(spec: str, tasks) -> dict[str, float]:
  weights = {t.name: 1.0 for t in tasks}
  for item in filter(None, (s.strip() for s in str(spec or "").split(","))):
    name, _, w = item.partition("=")
    registry.get(name.strip(), "loss.task_weights")
    try:
      weights[name.strip()] = float(w)
    except ValueError:
      raise ConfigError("loss.task_weights", f"bad weight in '{item}'; use task=weight") from None
  return weights


def resolve_config(config) -> None:
  """The config's final form before anything is built or compared (main.py calls it before the workdir's config
  check): the `init_from` policy (convert.apply_init_from; idempotent)."""
  convert.apply_init_from(config)


def train_and_evaluate(config, workdir: str) -> str:
  """Trains every model of the paradigm in turn and prints the per-task table. Returns loop.COMPLETED, or
  loop.PREEMPTED when a SIGTERM stopped a model (its checkpoint is written; rerun to resume). With
  `sweep.fractions` set, runs the data-scale sweep (sweep.py) instead. With `init_from`, the encoder's
  architecture must be the checkpoint's, or with `init_from_adopt` becomes it (e.g. a DINOv2-kind UltraDINO
  teacher), written into config.json (`resolve_config`; main.py applies it before the workdir's config check)."""
  resolve_config(config)
  if str(config.get("sweep", {}).get("fractions", "")).strip():
    return multitask_sweep.run(config, workdir, train_and_evaluate)
  _check(config)
  root = Path(workdir)
  for name, tasks in plan_models(config):
    if _Run(config, root / name, name, tasks).train() == loop.PREEMPTED:
      return loop.PREEMPTED
  print_table(results_lib.load_run(root, config.paradigm), config.data if config.get("report_baselines") else None)
  return loop.COMPLETED


def print_table(run, data_config=None) -> tuple[int, int] | None:
  """The per-task table of a run's chosen eval files (`tasks.table`: n, units, better direction, type means).
  With the run's `data_config`, each task's trivial baseline (tasks/baselines.py) is shown next to its primary
  metric, and (tasks beating it, tasks) is returned."""
  base = baselines.for_config(data_config, list(run.tasks)) if data_config is not None else None
  print("\n" + table.format_table(run.tasks, f"per-task metrics ({run.label})", baselines=base))
  if base is None:
    return None
  counts = table.beats_baseline(run.tasks, base).values()
  beat, total = sum(k for k, _ in counts), sum(n for _, n in counts)
  print(f"{run.label}: beats its trivial baseline on {beat} of {total} tasks")
  return beat, total
