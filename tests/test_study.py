"""The M2DINO study knobs: data scale per task, group presets, freezing, routing losses, specialisation."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from m2dino_jax import configlib
from m2dino_jax.data import pipeline, records
from m2dino_jax.errors import ConfigError
from m2dino_jax.models import moe as moe_lib
from m2dino_jax.models import moe_reference as ref
from m2dino_jax.tasks import registry
from m2dino_jax.tasks.results import specialisation
from m2dino_jax.train import checkpointing, multitask, optim

SMALL = ["data.image_size=32", "data.source.synthetic_count=16", "data.batch_size=4", "data.eval_batch_size=8",
         "tensorboard=False"]


def _config(arg, overrides=()):
  return configlib.load_config(f"configs/m2dino.py:{arg}", list(overrides))


# ------------------------------------------------------------------------------------------ data scale

def _data_config(**kw):
  cfg = pipeline.default_data_config()
  cfg.image_size, cfg.batch_size, cfg.prefetch = 8, 2, 0
  cfg.transforms.train = ["resize"]
  cfg.update(kw)
  return cfg


def _sources(sizes):
  """Records whose pixel value encodes their row, so a batch tells which rows were drawn."""
  out = {}
  for task, n in sizes.items():
    t = registry.get(task)
    out[task] = [records.validate(records.Record(np.full((8, 8), 1 + i, np.uint8), task, label=i % t.num_classes))
                 for i in range(n)]
  return out


def test_subset_sizes_are_exact():
  n = 40
  cases = [({}, 40), ({"train_fraction": 0.25}, 10), ({"train_fraction": 0.1}, 4), ({"train_fraction": 0.01}, 1),
           ({"train_fraction": 0.0625}, 3),  # 2.5 rounds half up
           ({"train_fraction": 0.5, "max_train_per_task": 7}, 7), ({"max_train_per_task": 100}, 40),
           ({"train_fraction": 0.5, "train_per_task": "breast_2cls=0.75"}, 30),
           ({"train_fraction": 0.5, "train_per_task": "breast_2cls=12,lung=3"}, 12),
           ({"train_per_task": "lung=3"}, 40)]
  for kw, want in cases:
    assert pipeline.subset_size(_data_config(**kw), "breast_2cls", n) == want, kw
  sizes = pipeline.train_sizes(_data_config(train_fraction=0.5), ["breast_2cls", "lung_2cls"],
                               sources=_sources({"breast_2cls": 9, "lung_2cls": 20}))
  assert sizes == {"breast_2cls": {"used": 5, "available": 9}, "lung_2cls": {"used": 10, "available": 20}}
  for bad in ("breast_2cls=1.5", "breast_2cls=0", "nope=0.5", "breast_2cls"):
    with pytest.raises(ConfigError, match="data.train_per_task"):
      pipeline.subset_size(_data_config(train_per_task=bad), "breast_2cls", n)
  with pytest.raises(ConfigError, match="data.train_fraction"):
    pipeline.subset_size(_data_config(train_fraction=0.0), "breast_2cls", n)


def test_subsets_are_deterministic_nested_and_the_only_rows_drawn():
  a = pipeline.subset_indices("breast_2cls", 50, 10)
  assert np.array_equal(a, pipeline.subset_indices("breast_2cls", 50, 10)) and len(set(a.tolist())) == 10
  big = pipeline.subset_indices("breast_2cls", 50, 30)
  assert set(a.tolist()) <= set(big.tolist())  # 20% inside 60%
  assert not np.array_equal(a, pipeline.subset_indices("lung_2cls", 50, 10))
  assert not np.array_equal(a, pipeline.subset_indices("breast_2cls", 50, 10, subset_seed=1))
  sizes = {"breast_2cls": 20, "lung_2cls": 12}
  want = {registry.get(t).task_id: set(pipeline.subset_indices(t, n, n // 4).tolist()) for t, n in sizes.items()}
  for seed in (0, 3):  # the training seed changes the order, never the subset
    it = pipeline.make_train_iterator(_data_config(train_fraction=0.25), list(sizes), seed=seed,
                                      sources=_sources(sizes))
    seen: dict[int, set] = {}
    for _ in range(40):
      batch = next(it)
      rows = np.rint(batch["image"][:, 4, 4, 0] * 255).astype(int) - 1
      seen.setdefault(int(batch["task_id"][0]), set()).update(rows.tolist())
    it.close()
    assert seen == want, (seed, seen, want)


# ------------------------------------------------------------------------------------------ groups

def test_group_presets_and_specs(tmp_path):
  paper = registry.parse_groups("")
  assert list(paper) == ["Fetal", "Abd", "MO", "Breast", "Lung", "Thyroid", "Cardiac", "Gyn"]
  assert paper["Abd"] == ["fetal_abdomen_multi", "liver_lesion_2cls"]
  assert paper["MO"] == ["organ_cls", "spinal_cord_injury_loc"]
  for name in ("paper", "organ", "type"):
    members = [t for ts in registry.parse_groups(name).values() for t in ts]
    assert sorted(members) == sorted(registry.BY_NAME), name  # every task exactly once
  assert registry.parse_groups("type")["detection"] == ["spinal_cord_injury_loc", "thyroid_nodule_det",
                                                       "uterine_fibroid_det"]
  assert registry.parse_groups("a:lung+lung_2cls;b:FUGC") == {"a": ["lung", "lung_2cls"], "b": ["FUGC"]}
  path = tmp_path / "g.json"
  path.write_text(json.dumps({"x": ["lung"], "y": "FUGC"}))
  assert registry.parse_groups(str(path)) == {"x": ["lung"], "y": ["FUGC"]}
  path.write_text(json.dumps({"x": "lung+lung_2cls"}))
  assert registry.parse_groups(str(path)) == {"x": ["lung", "lung_2cls"]}
  with pytest.raises(ConfigError, match="unknown task 'lungs'"):
    registry.parse_groups("a:lungs")
  c = _config("paradigm=cg,smoke,tasks=fetal_head+breast_2cls+thyroid_nodule_det+fetal_femur", ["groups=type"])
  plan = {g: [t.name for t in ts] for g, ts in multitask.plan_models(c)}
  assert plan == {"segmentation": ["fetal_head"], "classification": ["breast_2cls"],
                  "detection": ["thyroid_nodule_det"], "regression": ["fetal_femur"]}


# ------------------------------------------------------------------------------------------ freezing

def _encoder_params(moe_on: bool):
  c = _config("paradigm=au,smoke,tasks=breast_2cls")
  enc, heads = nnx.eval_shape(lambda: multitask.trainer.build_modules(c, registry.resolve("breast_2cls"),
                                                                        moe_on=moe_on, seed=0))
  return c, multitask.trainer.split_model(enc, heads)[1]


def _named(tree):
  return {optim._path_str(p): f for p, f in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_freeze_patterns_and_presets():
  c, params = _encoder_params(moe_on=True)  # smoke: 4 blocks, MoE in blocks 2 and 3
  o = c.optim
  o.freeze = "backbone"
  frozen = _named(optim.frozen_mask(params, o, 4))
  moe = {n for n in frozen if n.split("/")[-1] in optim.MOE_PARAMS}
  assert moe == {f"blocks/{b}/mlp/{p}" for b in (2, 3) for p in ("w_in", "b_in", "w_out", "b_out", "router",
                                                                   "task_bias")}
  assert {n for n, f in frozen.items() if not f} == moe
  sizes = {optim._path_str(p): int(np.prod(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert optim.count_params(params, optim.frozen_mask(params, o, 4)) == (sum(sizes[n] for n in moe),
                                                                          sum(sizes.values()))
  o.freeze = "encoder.blocks.*.attn,encoder.patch_embed,!encoder.blocks.0"
  got = {n for n, f in _named(optim.frozen_mask(params, o, 4)).items() if f}
  assert got == {n for n in sizes if n.startswith("patch_embed/") or
                 (n.startswith("blocks/") and "/attn/" in n and not n.startswith("blocks/0/"))}
  o.freeze = "all_but_heads"
  assert all(_named(optim.frozen_mask(params, o, 4)).values())
  for bad, msg in (("encoder.blocks.*.atn", "matches no encoder parameter"), ("heads.x", "heads are always")):
    o.freeze = bad
    with pytest.raises(ConfigError, match=msg):
      optim.frozen_mask(params, o, 4)
  # TS has no MoE: 'backbone' leaves nothing of the encoder to train
  c, dense = _encoder_params(moe_on=False)
  c.optim.freeze = "backbone"
  assert all(_named(optim.frozen_mask(dense, c.optim, 4)).values())


@pytest.mark.slow
def test_frozen_backbone_trains_only_moe_and_heads(tmp_path):
  """freeze=backbone over 3 AU steps: every frozen leaf bit-identical, every MoE leaf and the active heads
  changed; frozen leaves hold no optimiser state; the routing window (extras) records the loads; the state
  (masked optimiser state, window) survives a checkpoint round trip and the next step is the same."""
  c = _config("paradigm=au,smoke,tasks=fetal_head+breast_2cls",
              SMALL + ["optim.freeze=backbone", "moe.routing_loss=window", "moe.window=3"])
  r = multitask._Run(c, None, "all", registry.resolve(c.tasks))
  before = jax.device_get(r.state.params)
  frozen = _named(r.settings.enc_frozen)
  opt_leaves = jax.tree.leaves(r.state.opt_state["encoder"])
  n_train = sum(not f for f in frozen.values())
  assert n_train == 12 and len(opt_leaves) == 1 + 2 * n_train  # count + (mu, nu) of trainable leaves only
  trainable_size = sum(int(np.prod(x.shape)) for n, x in _named(before["encoder"]).items() if not frozen[n])
  assert r.param_counts["encoder_trainable"] == trainable_size
  assert sum(x.size for x in opt_leaves) == 1 + 2 * trainable_size
  it = map(r.prepare, pipeline.make_train_iterator(c.data, r.tasks, seed=0))
  state, seen = r.state, set()
  for _ in range(3):
    batch = next(it)
    seen.add(batch["task"].name)
    state, m = r.step(state, batch)
    assert np.isfinite(float(m["loss"]))
  after = jax.device_get(state.params)
  enc_before, enc_after = _named(before["encoder"]), _named(after["encoder"])
  for name, is_frozen in frozen.items():
    same = np.array_equal(enc_before[name], enc_after[name])
    assert same == is_frozen, name
  for task in seen:
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["heads"][task]),
                                                        jax.tree.leaves(after["heads"][task])))
  window = np.asarray(state.extras[moe_lib.WINDOW_KEY])
  assert window.shape == (2, 2, 4) and np.allclose(window.sum(-1), 1.0)
  assert not np.allclose(window, 0.25)  # the last two batches' loads replaced the uniform start
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", keep=1, async_save=False)
  ckpt.save(3, state, force=True)
  restored = ckpt.restore(state)
  ckpt.close()
  batch = next(it)
  a, _ = r.step(restored, batch)
  b, _ = r.step(state, batch)
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------ routing

def _moe(routing_loss="balance", seed=0, num_experts=4, top_k=2, num_tasks=3, **kw):
  cfg = moe_lib.default_moe_config()
  cfg.update({"enabled": True, "num_experts": num_experts, "top_k": top_k, "capacity_factor": 0.0,
              "routing_loss": routing_loss, **kw})
  return moe_lib.MoEFFN(8, 12, cfg, num_tasks, rngs=nnx.Rngs(seed))


def test_routing_losses_equal_loop_reference():
  x = jax.random.normal(jax.random.key(1), (3, 5, 8)) * 2.0
  tasks = jnp.array([0, 2, 1])
  m = _moe("task", task_experts="0:1;2:0+3")
  state = nnx.state(m, nnx.Param)
  p = nnx.to_pure_dict(state)
  p["task_bias"] = jax.random.normal(jax.random.key(2), p["task_bias"].shape)  # tasks route differently
  nnx.replace_by_pure_dict(state, p)
  nnx.update(m, state)
  call = nnx.jit(lambda m, x, t: m(x, t, train=True)[1])  # eager op-by-op dispatch is slow on a shared CPU
  aux = call(m, x, tasks)
  assignment = {0: (1,), 1: (2, 3), 2: (0, 3)}  # task 1 unnamed: round robin (1 * k .. 1 * k + 1)
  want = ref.reference_task_loss(p, x, tasks, "token", assignment)
  assert float(aux["task_loss"]) == pytest.approx(want, rel=1e-5)
  assert float(aux["aux_loss"]) == pytest.approx(0.01 * want + 1e-3 * float(aux["z_loss"]), rel=1e-5)
  load, prob = ref.reference_load_and_prob(p, x, tasks, "token", 2)
  np.testing.assert_allclose(aux["load"], load, rtol=1e-6)
  np.testing.assert_allclose(aux["mean_prob"], prob, rtol=1e-5)
  assert float(aux["balance_loss"]) == pytest.approx(4 * float(np.dot(load, prob)), rel=1e-5)
  # the window: a sequence of batches through window_balance equals the loop over a history list
  window_moe = _moe("window")
  seq, loads_probs = [], []
  for i in range(6):
    xi = jax.random.normal(jax.random.key(10 + i), (2, 5, 8)) * 3.0
    ti = jnp.array([i % 3] * 2)
    a = call(window_moe, xi, ti)
    seq.append(a)
    loads_probs.append((np.asarray(a["load"]), np.asarray(a["mean_prob"])))
    assert float(a["aux_loss"]) == pytest.approx(1e-3 * float(a["z_loss"]), rel=1e-6)  # no per-batch balance
  for w in (1, 3, 4):
    cfg = window_moe.cfg.as_configdict()
    cfg.window = w
    extras, got = moe_lib.init_window(1, cfg), []
    for step, a in enumerate(seq):
      loss, extras = moe_lib.window_balance(extras, [a], step, 1.0)
      got.append(float(loss))
    np.testing.assert_allclose(got, ref.reference_window_losses(loads_probs, w, 4), rtol=1e-5)
    if w == 1:  # window 1 = the per-batch Switch loss
      np.testing.assert_allclose(got, [float(a["balance_loss"]) for a in seq], rtol=1e-5)
  with pytest.raises(ConfigError, match="moe.task_experts"):
    _moe("task", task_experts="0:7")
  with pytest.raises(ConfigError, match="moe.routing_loss"):
    _moe("damex")


def test_specialisation_score():
  assert specialisation(np.eye(4) * 10) == pytest.approx(1.0)
  assert specialisation(np.ones((3, 4))) == pytest.approx(0.0)
  assert math.isnan(specialisation([[1, 2, 3]])) and math.isnan(specialisation([[1, 0], [0, 0]]))
  u = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
  p = u / u.sum(1, keepdims=True)
  marginal = p.mean(0)
  h = lambda q: -sum(v * math.log(v) for v in q if v > 0)  # noqa: E731
  want = (h(marginal) - (h(p[0]) + h(p[1])) / 2) / math.log(2)
  assert specialisation(u) == pytest.approx(want)
  assert specialisation(u * 100) == pytest.approx(want)  # counts scale out


def _train_router(routing_loss: str, seed: int, steps: int = 400, e: int = 8, top_k: int = 2):
  """4 tasks whose targets are different functions of the same inputs (only the router's task bias tells
  the tasks apart, so solving them needs task-specific experts), one task per batch as in the trainer; the
  project's E=8, top-2. Returns the eval task x expert usage."""
  num_tasks = 4
  m = _moe(routing_loss, seed=seed, num_experts=e, top_k=top_k, num_tasks=num_tasks, balance_loss_weight=0.1,
           task_loss_weight=0.1, window=8)
  graphdef, params = nnx.split(m, nnx.Param)
  mix = jax.random.normal(jax.random.key(100 + seed), (num_tasks, 8, 8))
  tx = optax.adam(1e-2)
  extras = moe_lib.init_window(1, m.cfg)

  def data(key, t):
    x = jax.random.normal(key, (8, 8, 8))
    return x, jnp.tanh(x @ mix[t]), jnp.full((8,), t, jnp.int32)

  @jax.jit
  def step(params, opt, extras, i):
    t = i % num_tasks
    x, y, tid = data(jax.random.fold_in(jax.random.key(seed), i), t)

    def loss_fn(params):
      out, aux = nnx.merge(graphdef, params)(x, tid, train=True)
      window, new_extras = moe_lib.window_balance(extras, [aux], i, m.cfg.balance_loss_weight)
      return jnp.mean((out - y) ** 2) + aux["aux_loss"] + window, new_extras

    (_, new_extras), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, new_extras

  opt = tx.init(params)
  for i in range(steps):
    params, opt, extras = step(params, opt, extras, i)
  usage_of = jax.jit(lambda params, x, tid: nnx.merge(graphdef, params)(x, tid)[1]["task_usage"])
  return sum(np.asarray(usage_of(params, *data(jax.random.key(999 + t), t)[::2])) for t in range(num_tasks))


@pytest.mark.slow
def test_task_aware_routing_specialises_more_than_per_batch_balance():
  """Seeds 0 and 1, 400 steps. Measured: balance 0.35 / 0.37, window 0.72 / 0.80, task 1.00 / 1.00: the
  DAMEX-style task loss puts each task on its own two experts, the window balance lets tasks specialise, and
  the per-batch balance spreads every task over the experts."""
  scores = {mode: [specialisation(_train_router(mode, seed)) for seed in (0, 1)]
            for mode in ("balance", "window", "task")}
  msg = f"specialisation by routing loss over seeds 0, 1: {scores}"
  assert min(scores["task"]) > 0.95, msg
  assert min(scores["task"]) > max(scores["balance"]) + 0.4, msg
  assert min(scores["window"]) > max(scores["balance"]) + 0.2, msg


def test_task_experts_filled_per_model():
  c = _config("paradigm=au,smoke,tasks=fetal_head+breast_2cls+lung", ["moe.routing_loss=task"])
  moe = multitask.trainer.model_moe_config(c, registry.resolve(c.tasks))
  assert moe.task_experts == "breast_2cls:0+1;fetal_head:2+3;lung:0+1"  # registry order, E=4, top-2
  table = moe_lib.task_expert_table(moe.task_experts, registry.NUM_TASKS, 4, 2)
  assert table[registry.get("fetal_head").task_id] == (0.0, 0.0, 0.5, 0.5)
  assert c.moe.task_experts == ""  # the config itself is untouched
