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
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from m2dino_jax import fileio
from m2dino_jax.data import pipeline
from m2dino_jax.errors import ConfigError
from m2dino_jax.models import convert, heads, vit
from m2dino_jax.report import paradigm as report_files
from m2dino_jax.tasks import registry
from m2dino_jax.train import checkpointing, loop, multitask_eval, multitask_steps, optim, sharding

PARADIGMS = ("ts", "cg", "au")


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
    groups = {k: registry.resolve(v) for k, v in config.groups.items()} if config.groups else None
    groups = groups or {g: registry.resolve(names) for g, names in registry.default_groups().items()}
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


@dataclasses.dataclass
class Model:
  """Encoder and heads as (graphdef, params) pairs: the functional form the steps use."""
  enc_gdef: nnx.GraphDef
  enc_params: nnx.State
  enc_rest: nnx.State
  head_gdefs: dict
  head_params: dict
  encoder_cfg: vit.ViTConfig

  def gdefs(self, task_name: str):
    return (self.enc_gdef, self.head_gdefs[task_name])


def build_model(config, tasks: list[registry.Task], *, moe_on: bool, seed: int) -> tuple[Model, vit.Encoder]:
  cfg = vit.ViTConfig.from_config(config.model)
  moe = config.moe if moe_on else None
  rngs = nnx.Rngs(seed)
  encoder = vit.Encoder(cfg, moe=moe, num_tasks=registry.NUM_TASKS, rngs=rngs)
  head_mods = {t.name: heads.build_head(t, cfg.dim, cfg.patch, len(cfg.out_blocks), config.heads, rngs=rngs)
               for t in tasks}
  enc_gdef, enc_params, enc_rest = nnx.split(encoder, nnx.Param, ...)
  hg, hp = {}, {}
  for name, mod in head_mods.items():
    hg[name], hp[name] = nnx.split(mod, nnx.Param)
  return Model(enc_gdef, enc_params, enc_rest, hg, hp, cfg), encoder


def _total_steps(config, num_tasks: int) -> int:
  return int(config.total_steps) if config.total_steps > 0 else int(config.steps_per_task) * num_tasks


def _check(config) -> None:
  if config.data.channels != config.model.in_chans:
    raise ConfigError("data.channels", f"{config.data.channels} must equal model.in_chans {config.model.in_chans}")
  if config.data.image_size % vit.ViTConfig.from_config(config.model).patch:
    raise ConfigError("data.image_size", "must be divisible by the patch size")


class _Run:
  """Training of one model (one of the paradigm's models)."""

  def __init__(self, config, workdir: Path, name: str, tasks: list[registry.Task]):
    self.config, self.workdir, self.name, self.tasks = config, workdir, name, tasks
    devices = jax.devices()[:config.mesh_devices] if config.mesh_devices > 0 else None
    self.mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    self.rules = sharding.get_rules(config.sharding)
    self.total = _total_steps(config, len(tasks))
    self.hp = multitask_steps.Hyper.from_config(config, self.total)
    self.moe_on = moe_enabled(config)
    model, encoder = build_model(config, tasks, moe_on=self.moe_on, seed=config.seed)
    if config.init_from:
      convert.init_encoder_from(encoder, config.init_from)
      _, model.enc_params, model.enc_rest = nnx.split(encoder, nnx.Param, ...)
    self.moe_layers = [i for i, b in enumerate(encoder.blocks) if b.is_moe]
    self.model = model
    self.scales = jax.tree.map(np.float32, optim.encoder_lr_scales(model.enc_params, config.optim,
                                                                     model.encoder_cfg.depth))
    self.task_weights = _task_weights(config.loss.task_weights, tasks)
    self.base_key = jax.random.key(config.seed)
    self._place()

  def _place(self) -> None:
    m, mesh, rules = self.model, self.mesh, self.rules
    tx = self.hp.tx()
    m.enc_params = sharding.shard_state(m.enc_params, mesh, rules)
    m.enc_rest = jax.device_put(m.enc_rest, sharding.replicated(mesh))
    m.head_params = {k: sharding.shard_state(v, mesh, rules) for k, v in m.head_params.items()}
    self.state = {
        "step": jax.device_put(np.int32(0), sharding.replicated(mesh)),
        "encoder": m.enc_params, "heads": m.head_params,
        "opt_encoder": self._on_mesh(jax.jit(tx.init)(m.enc_params)),
        "opt_heads": {k: self._on_mesh(jax.jit(tx.init)(v)) for k, v in m.head_params.items()},
    }

  def _on_mesh(self, tree):
    """Leaves created on one device (e.g. Adam's step count) go onto the mesh, replicated, as the step
    returns them; otherwise the second step would see new input shardings and recompile."""
    rep = sharding.replicated(self.mesh)
    return jax.tree.map(lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding) else jax.device_put(x, rep),
                        tree)

  def _sync_model(self) -> None:
    self.model.enc_params = self.state["encoder"]
    self.model.head_params = self.state["heads"]

  def step_fn(self, state, batch, task_name):
    task = registry.get(task_name)
    slc = {"step": state["step"], "encoder": state["encoder"], "head": state["heads"][task_name],
           "opt_encoder": state["opt_encoder"], "opt_head": state["opt_heads"][task_name]}
    with jax.set_mesh(self.mesh):
      new, metrics = multitask_steps.train_step(
          slc, self.model.enc_rest, batch, self.scales, self.base_key, np.float32(self.task_weights[task_name]),
          gdefs=self.model.gdefs(task_name), task=task, hp=self.hp)
    state = dict(state, step=new["step"], encoder=new["encoder"], opt_encoder=new["opt_encoder"],
                 heads={**state["heads"], task_name: new["head"]},
                 opt_heads={**state["opt_heads"], task_name: new["opt_head"]})
    return state, metrics

  def batches(self, iterator):
    for batch in iterator:
      task = registry.TASKS[int(batch["task_id"][0])].name
      yield task, sharding.shard_batch(batch, self.mesh, self.rules)

  def evaluate(self, state, step: int) -> float:
    self.state = state
    self._sync_model()
    usage = np.zeros((registry.NUM_TASKS, self.config.moe.num_experts)) if self.moe_on else None
    results, scores = {}, []
    diag = math.hypot(self.config.data.image_size, self.config.data.image_size)
    for task in self.tasks:
      results[task.name] = multitask_eval.evaluate_task(self.model, task, self.config.data, self.mesh, self.rules,
                                                        usage)
      scores.append(multitask_eval.score(task, results[task.name], diag))
    eval_dir = self.workdir / "eval"
    if jax.process_index() == 0:
      report_files.write_eval(eval_dir, step, self.config.paradigm, results)
      if usage is not None:
        rows = [usage[t.task_id].tolist() for t in self.tasks]
        report_files.write_moe_usage(eval_dir, step, self.config.moe.num_experts, self.moe_layers,
                                     [t.name for t in self.tasks], rows)
    score = float(np.mean(scores))
    flat = {f"{t}/{k}": v for t, r in results.items() for k, v in r.items() if isinstance(v, (int, float))}
    self.writer.write(step, {"score": score, **flat}, prefix="eval/")
    if score > self.best_score:
      self.best_score = score
      checkpointing.save_params(self.workdir / "best" / "params",
                                {"encoder": self.state["encoder"], "heads": self.state["heads"]})
      if jax.process_index() == 0:
        report_files.write_best(eval_dir, step)
        fileio.write_json(self.workdir / "best" / "best.json", {"step": step, "score": score})
    return score

  def train(self) -> bool:
    """Trains to the end (resuming if a checkpoint exists). Returns False if preempted."""
    cfg = self.config
    done_file = self.workdir / "done.json"
    if done_file.is_file():
      print(f"[{self.name}] already finished; skipping", file=sys.stderr)
      return True
    self.workdir.mkdir(parents=True, exist_ok=True)
    fileio.write_json(self.workdir / "tasks.json", {
        "model": self.name, "tasks": [t.name for t in self.tasks], "moe": self.moe_on,
        "encoder": dataclasses.asdict(self.model.encoder_cfg)})
    it = pipeline.make_train_iterator(cfg.data, self.tasks, seed=cfg.seed, process_index=jax.process_index(),
                                      process_count=jax.process_count())
    ckpt = checkpointing.Checkpointer(self.workdir / "ckpt", keep=cfg.checkpoint.keep,
                                      async_save=cfg.checkpoint.async_save)
    start = 0
    best_file = self.workdir / "best" / "best.json"
    self.best_score = json.loads(best_file.read_text())["score"] if best_file.is_file() else -math.inf
    if ckpt.latest_step() is not None:
      self.state = ckpt.restore(self.state, it)
      start = int(self.state["step"])
      print(f"[{self.name}] resumed from step {start}", file=sys.stderr)
    self.writer = loop.MetricWriter(self.workdir, tensorboard=cfg.tensorboard)
    save = lambda step, state, force: ckpt.save(step, state, it, force=force)
    state, step, preempted = loop.run(
        state=self.state, batches=self.batches(it), step_fn=self.step_fn, start_step=start,
        total_steps=self.total, writer=self.writer, log_every=cfg.log_every, eval_every=cfg.eval_every,
        evaluate=self.evaluate, checkpoint_every=cfg.checkpoint.every, save=save, name=self.name,
        crash_at_step=cfg.debug.crash_at_step, before_crash=ckpt.wait)
    self.state = state
    it.close()
    if preempted:
      ckpt.save(step, state, it, force=True)
      ckpt.close()
      print(f"[{self.name}] preempted at step {step}: checkpoint written; rerun the same command to resume",
            file=sys.stderr)
      return False
    ckpt.save(step, state, it, force=True)
    ckpt.close()
    self.evaluate(state, step)
    self.writer.close()
    if jax.process_index() == 0:
      fileio.write_json(done_file, {"step": step})
    return True


def _task_weights(spec: str, tasks) -> dict[str, float]:
  weights = {t.name: 1.0 for t in tasks}
  for item in filter(None, (s.strip() for s in str(spec or "").split(","))):
    name, _, w = item.partition("=")
    registry.get(name.strip())
    try:
      weights[name.strip()] = float(w)
    except ValueError:
      raise ConfigError("loss.task_weights", f"bad weight in '{item}'; use task=weight") from None
  return weights


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains every model of the paradigm in turn; returns {task: metrics} of the final evals."""
  _check(config)
  root = Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    fileio.write_text(root / "config.json", config.to_json_best_effort(indent=2))
  for name, tasks in plan_models(config):
    if not _Run(config, root / name, name, tasks).train():
      raise SystemExit(0)  # preempted: state saved
  run = report_files.load_run(root, config.paradigm)
  print_table(run)
  return run.tasks


def print_table(run) -> None:
  print(f"\nper-task metrics ({run.label}):")
  for task in registry.TASKS:
    if task.name in run.tasks:
      m = run.tasks[task.name]
      vals = "  ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float) and k != "n")
      print(f"  {task.name:24s} {task.type:15s} {vals}")
