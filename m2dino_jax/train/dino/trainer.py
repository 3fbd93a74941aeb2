"""UltraDINO / DINOv2 pretraining on the shared core: state, step, collapse monitors, teacher export.

WORKDIR layout: ckpt/ (state + Grain iterator, resumable), metrics.jsonl, tb/, monitor.jsonl lines in
metrics.jsonl under 'monitor/', teacher/ (the teacher backbone as encoder.json + params/, what
`--config.init_from=WORKDIR/teacher --config.init_from_adopt=True` of configs/m2dino.py takes), done.json.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2dino_jax import fileio
from m2dino_jax import mesh as mesh_lib
from m2dino_jax.errors import ConfigError, M2DinoError
from m2dino_jax.models import convert, dino_head, vit
from m2dino_jax.train import core, loop
from m2dino_jax.train import workdir as workdir_lib
from m2dino_jax.train.dino import data as dino_data
from m2dino_jax.train.dino import losses
from m2dino_jax.train.dino import step as dino_step


class CollapseError(M2DinoError):
  """A collapse monitor fell below its threshold; names the monitor, its value and the step."""


def monitor_values(s: dino_step.Settings, state, batch) -> dict:
  """The collapse monitors (scalars) of `state` on `batch`."""
  glob = dino_step.crop_major(batch["global"])
  temp = s.teacher_temp(state.step)
  teacher = state.extras["teacher"]
  out = dino_step.forward(s, teacher, glob, train=False)
  t_logits = dino_step.head_apply(s, teacher["head"], out["cls"])
  targets = losses.teacher_targets(t_logits, state.extras["center"], temp, s.centering, s.sinkhorn_iters)
  s_logits = dino_step.head_apply(s, state.params["head"], dino_step.forward(s, state.params, glob, train=False)["cls"])
  return {"rankme": losses.rankme(out["cls"]), "teacher_entropy": losses.mean_entropy(targets),
          "student_teacher_kl": losses.kl_divergence(targets, s_logits, s.student_temp)}


def build_modules(config, seed: int):
  cfg = vit.ViTConfig.from_config(config.model)
  rngs = nnx.Rngs(seed)
  encoder = vit.Encoder(cfg, rngs=rngs)
  h = config.head
  head = dino_head.DINOHead(cfg.dim, h.prototypes, h.hidden_dim, h.bottleneck_dim, h.nlayers, rngs=rngs)
  return encoder, head


def max_masked(config, patch: int) -> int:
  n = (config.data.global_size // patch) ** 2
  return max(1, min(int(n * config.data.mask_ratio[1]), int(0.5 * n)))


class Run:
  def __init__(self, config, workdir: Path | None):
    self.config, self.workdir = config, workdir
    devices = jax.devices()[:config.mesh_devices] if config.mesh_devices > 0 else None
    self.mesh = mesh_lib.make_mesh(config.mesh.to_dict(), devices)
    self.rules = mesh_lib.get_rules(config.sharding)
    self.total = int(config.epochs * config.epoch_length) if config.total_steps <= 0 else int(config.total_steps)
    self.vit_cfg = vit.ViTConfig.from_config(config.model)
    self._init_state()
    self.settings = dino_step.settings_from_config(
        config, self.enc_gdef, self.head_gdef, self.enc_rest, self.state.params, self.vit_cfg.depth, self.total,
        max_masked(config, self.vit_cfg.patch))
    self._step = None
    self._monitor_fn = None

  def _init_state(self) -> None:
    config = self.config
    seed_key = core.seed_data(config.seed)
    k = int(config.head.prototypes)
    import optax
    tx = optax.scale_by_adam()

    def init():
      encoder, head = build_modules(config, config.seed)
      _, enc_params, _ = nnx.split(encoder, nnx.Param, ...)
      _, head_params = nnx.split(head, nnx.Param)
      params = {"backbone": enc_params, "head": head_params}
      extras = {"teacher": jax.tree.map(lambda x: x, params), "center": jnp.zeros((1, k), jnp.float32),
                "ibot_center": jnp.zeros((1, k), jnp.float32)}
      return core.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             rng=jnp.asarray(seed_key), extras=extras)

    abstract_enc, abstract_head = nnx.eval_shape(lambda: build_modules(config, config.seed))
    self.enc_gdef, _, self.enc_rest = nnx.split(abstract_enc, nnx.Param, ...)
    self.head_gdef, _ = nnx.split(abstract_head, nnx.Param)
    self.enc_rest = jax.tree.map(np.asarray, self.enc_rest)
    self.state = core.init_state(init, lambda a: mesh_lib.state_shardings(a, self.mesh, self.rules))
    self.state_shardings = core.shardings_of(self.state)

  def compiled_step(self, batch):
    if self._step is None:
      self._step = core.compile_step(dino_step.make_step(self.settings), self.state_shardings,
                                     core.shardings_of(batch))
    return self._step

  def step(self, state, batch):
    batch = mesh_lib.shard_batch(batch, self.mesh, self.rules)
    with jax.set_mesh(self.mesh):
      return self.compiled_step(batch)(state, batch)

  # ------------------------------------------------------------------------- monitors

  def monitors(self, state, batch) -> dict:
    """RankMe of the teacher's CLS embeddings, teacher entropy and student-teacher KL on a fixed batch (one
    compiled program on the sharded state; the batch is the global batch of every process's part)."""
    batch = mesh_lib.shard_batch(batch, self.mesh, self.rules)
    with jax.set_mesh(self.mesh):
      if self._monitor_fn is None:
        self._monitor_fn = jax.jit(functools.partial(monitor_values, self.settings))
      out = self._monitor_fn(state, batch)
    return {k: float(v) for k, v in out.items()}

  def evaluate(self, state, step: int) -> float:
    m = self.monitors(state, self.monitor_batch)
    self.writer.write(step, m, prefix="monitor/")
    c = self.config.monitor
    for name, low in (("rankme", c.min_rankme), ("teacher_entropy", c.min_teacher_entropy)):
      if m[name] < low:
        raise CollapseError(f"collapse monitor '{name}' = {m[name]:.4g} fell below monitor.min_{name} = {low} "
                            f"at step {step}: lower the teacher temperature or keep centring on; the last "
                            f"checkpoint in {self.workdir / 'ckpt'} is intact")
    return m["rankme"]

  # ------------------------------------------------------------------------- export

  def teacher_encoder(self, state) -> vit.Encoder:
    params = jax.device_get(state.extras["teacher"]["backbone"])
    return nnx.merge(self.enc_gdef, params, self.enc_rest)

  def export_teacher(self, state) -> Path:
    return convert.save_encoder(self.teacher_encoder(state), self.workdir / "teacher")

  # ------------------------------------------------------------------------- train

  def train(self) -> str:
    cfg = self.config
    done = self.workdir / "done.json"
    if done.is_file():
      print("[dino] already finished; skipping", file=sys.stderr)
      return loop.COMPLETED
    it = dino_data.make_iterator(cfg.data, patch=self.vit_cfg.patch, seed=cfg.seed,
                                 process_index=jax.process_index(), process_count=jax.process_count())
    mon_it = dino_data.make_iterator(cfg.data, patch=self.vit_cfg.patch, seed=cfg.seed + 7919,
                                     process_index=jax.process_index(), process_count=jax.process_count())
    self.monitor_batch = next(mon_it)
    if jax.process_index() == 0:  # the config has built the model and its data
      workdir_lib.write_config(self.workdir, cfg)
      fileio.write_json(self.workdir / "encoder.json", dataclasses.asdict(self.vit_cfg))
    self.writer = loop.MetricWriter(self.workdir, tensorboard=cfg.tensorboard)
    state, step, status = loop.train(
        workdir=self.workdir, state=self.state, batches=it, step_fn=self.step, total_steps=self.total,
        writer=self.writer, checkpoint=cfg.checkpoint, log_every=cfg.log_every, eval_every=cfg.monitor.every,
        evaluate=self.evaluate, name="dino")
    self.state = state
    if status == loop.PREEMPTED:
      return status
    self.evaluate(state, step)
    path = self.export_teacher(state)
    self.writer.close()
    if jax.process_index() == 0:
      fileio.write_json(done, {"step": step, "teacher": str(path)})
    print(f"[dino] teacher backbone written to {path} (use --config.init_from={path} --config.init_from_adopt=True)",
          file=sys.stderr)
    return status


def train_and_evaluate(config, workdir: str) -> str:
  """Pretrains (resuming if WORKDIR/ckpt has a checkpoint) and exports the teacher. Returns loop.COMPLETED or
  loop.PREEMPTED; a collapse raises CollapseError naming the monitor."""
  if config.model.in_chans != config.data.channels:
    raise ConfigError("data.channels", f"{config.data.channels} must equal model.in_chans {config.model.in_chans}")
  return Run(config, Path(workdir)).train()
