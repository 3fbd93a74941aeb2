"""The training core: one program per task type equals per-head programs, config fixes, the mesh vocabulary's
errors, preemption agreed across processes, and the data flow's import rule."""

import ast
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2dino_jax import configlib, main
from m2dino_jax.data import pipeline
from m2dino_jax.errors import ConfigError
from m2dino_jax.tasks import registry, types
from m2dino_jax.train import multitask, optim
from m2dino_jax.train.multitask import steps
from tests.util import ROOT, run_with_devices

SMALL = ["data.image_size=32", "data.source.synthetic_count=16", "data.batch_size=4", "tensorboard=False"]
MIXED = "breast_2cls+fetal_plane_cls+fetal_femur+IUGC"  # 2 types, heads of different class / point counts


def _config(arg, overrides=()):
  return configlib.load_config(f"configs/m2dino.py:{arg}", list(overrides))


def _per_head_step(run, state, batch, task):
  """Today's reference: a program for (encoder, this task's head) only, written out plainly."""
  s, name = run.settings, task.name
  enc_rest = run.enc_rest

  def loss_fn(enc_params, head_params):
    enc_out, moe_aux = steps.forward_encoder(run.model.enc_gdef, enc_params, enc_rest, batch, train=True,
                                             key=state.key())
    pred = nnx.merge(run.model.head_gdefs[name], head_params)(enc_out, batch["image"].shape[1:3])
    loss, _ = types.task_loss(task, pred, batch, s.loss_cfg)
    return loss + sum((a["aux_loss"] for a in moe_aux), jnp.zeros(())), loss

  @jax.jit
  def step(state, batch):
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (total, loss), grads = grad_fn(state.params["encoder"], state.params["heads"][name])
    grads, _ = optim.clip(grads, s.clip_norm)
    lr = s.lr_schedule(state.step)
    enc, opt_enc = optim.apply(s.tx, grads[0], state.opt_state["encoder"], state.params["encoder"], lr, s.enc_scales)
    head, opt_head = optim.apply(s.tx, grads[1], state.opt_state["heads"][name], state.params["heads"][name],
                                 lr * s.head_lr_mult)
    return {"encoder": enc, "head": head, "opt_encoder": opt_enc, "opt_head": opt_head, "loss": total,
            "task_loss": loss}

  return step(state, batch)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_type_program_equals_per_head_programs_and_leaves_other_heads_untouched():
  run = multitask._Run(_config(f"paradigm=au,smoke,tasks={MIXED}", SMALL), None, "all", registry.resolve(MIXED))
  it = pipeline.make_train_iterator(run.config.data, run.tasks, seed=0)
  state, seen = run.state, set()
  while len(seen) < 4:
    prepared = run.prepare(next(it))
    task = prepared["task"]
    before = jax.device_get(state)  # host copy: the program donates its input state
    ref = _per_head_step(run, jax.device_put(before), prepared["batch"], task)
    state, metrics = run.step(state, prepared)
    after = jax.device_get(state)
    assert metrics["task"] == task.name and int(after.step) == int(before.step) + 1
    assert len(_leaves(ref["opt_encoder"])) == len(_leaves(after.opt_state["encoder"])) > 0
    for a, b in zip(_leaves(ref["encoder"]) + _leaves(ref["opt_encoder"]) + _leaves(ref["head"])
                    + _leaves(ref["opt_head"]) + [ref["loss"], ref["task_loss"]],
                    _leaves(after.params["encoder"]) + _leaves(after.opt_state["encoder"])
                    + _leaves(after.params["heads"][task.name]) + _leaves(after.opt_state["heads"][task.name])
                    + [metrics["loss"], metrics["task_loss"]], strict=True):
      np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    for other in run.tasks:
      if other.name != task.name:  # parameters and optimiser state bit for bit
        for a, b in zip(_leaves(before.params["heads"][other.name]) + _leaves(before.opt_state["heads"][other.name]),
                        _leaves(after.params["heads"][other.name]) + _leaves(after.opt_state["heads"][other.name])):
          np.testing.assert_array_equal(a, b)
    seen.add(task.name)
  # one compiled train program per task type present (2 here), each compiled once
  assert sorted(run._train_programs) == ["classification", "regression"]
  assert all(p._cache_size() == 1 for p in run._train_programs.values())


def test_eval_program_crops_each_head_back():
  run = multitask._Run(_config(f"paradigm=au,smoke,tasks={MIXED}", SMALL), None, "all", registry.resolve(MIXED))
  batch = dict(pipeline.make_eval_batches(run.config.data, registry.get("breast_2cls"))[0])
  for name in ("breast_2cls", "fetal_plane_cls", "fetal_femur", "IUGC"):
    task = registry.get(name)
    b = run.prepare(dict(batch, task_id=np.full_like(batch["task_id"], task.task_id)))["batch"]
    pred, _ = run._eval_program(task.type)(run.state.params, b, run.bound[task.type])
    head = nnx.merge(run.model.head_gdefs[name], run.state.params["heads"][name])
    enc_out, _ = steps.forward_encoder(run.model.enc_gdef, run.state.params["encoder"], run.enc_rest, b, train=False)
    direct = np.asarray(types.of(task).postprocess(head(enc_out, b["image"].shape[1:3])))
    cropped = np.stack([types.of(task).crop(task, p) for p in np.asarray(pred)])
    assert cropped.shape == direct.shape
    np.testing.assert_allclose(cropped, direct, atol=1e-6)
  assert len(run._eval_programs) == 2


def test_mixed_task_batches_are_refused(tmp_path):
  c = _config("paradigm=au,smoke,tasks=breast_2cls", SMALL + ["data.one_task_per_batch=False"])
  with pytest.raises(ConfigError, match="data.one_task_per_batch"):
    multitask.train_and_evaluate(c, str(tmp_path))


def test_smoke_steps_argument_is_honoured():
  for steps_arg, want in ((400, 400), (7, 7), (None, 40)):
    arg = "paradigm=au,smoke" + (f",steps={steps_arg}" if steps_arg else "")
    assert _config(arg).steps_per_task == want
  assert _config("paradigm=au").steps_per_task == 400


def test_groups_from_the_command_line_and_json(tmp_path):
  c = _config("paradigm=cg,smoke,tasks=breast_2cls+breast_3cls+lung_2cls+lung",
              ["groups=breast:breast_2cls+breast_3cls;lungs:lung_2cls+lung"])
  assert [(g, [t.name for t in ts]) for g, ts in multitask.plan_models(c)] == [
      ("breast", ["breast_2cls", "breast_3cls"]), ("lungs", ["lung_2cls", "lung"])]
  path = tmp_path / "groups.json"
  path.write_text(json.dumps({"all_lung": ["lung_2cls", "lung"], "b": "breast_2cls+breast_3cls"}))
  c = _config("paradigm=cg,smoke,tasks=breast_2cls+breast_3cls+lung_2cls+lung", [f"groups={path}"])
  assert [g for g, _ in multitask.plan_models(c)] == ["all_lung", "b"]
  with pytest.raises(ConfigError, match="'groups'.*bad group"):
    multitask.plan_models(_config("paradigm=cg,smoke", ["groups=breast_2cls"]))
  with pytest.raises(ConfigError, match="belong to no group"):
    multitask.plan_models(_config("paradigm=cg,smoke,tasks=breast_2cls+lung", ["groups=b:breast_2cls"]))


def test_data_errors_name_full_config_keys(tmp_path, capsys):
  base = ["--config=configs/m2dino.py:paradigm=au,smoke,tasks=breast_2cls", f"--workdir={tmp_path}",
          *(f"--config.{o}" for o in SMALL)]
  for override, key in (("data.mixture=sized", "data.mixture"), ("data.temperature=0", "data.temperature"),
                        ("data.source.kind=nope", "data.source.kind"),
                        ("data.transforms.train=('flipx',)", "data.transforms")):
    extra = ["--config.data.mixture=temperature"] if key == "data.temperature" else []
    assert main.main([*base, *extra, f"--config.{override}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"config key '{key}" in err[0], err


def test_mesh_rejects_an_axis_that_does_not_divide_a_parameter():
  out = run_with_devices("""
    import jax
    from flax import nnx
    import m2dino_jax.models  # noqa: F401  (lazy variable sharding, as in the trainers)
    from m2dino_jax import mesh as mesh_lib
    from m2dino_jax.errors import ConfigError
    lin = nnx.Linear(6, 4, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                     rngs=nnx.Rngs(0))
    state = nnx.state(lin, nnx.Param)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 4})
    try:
      mesh_lib.state_shardings(state, mesh, mesh_lib.get_rules("fsdp"))
      print("NO ERROR")
    except ConfigError as e:
      print("ERR", e)
    ok = mesh_lib.state_shardings(state, mesh_lib.make_mesh({"data": 2, "fsdp": 2}), mesh_lib.get_rules("fsdp"))
    print("SPEC", [s.spec for s in jax.tree.leaves(ok)])
  """, devices=4)
  err = next(line for line in out.splitlines() if line.startswith(("ERR", "NO ERROR")))
  assert err.startswith("ERR") and "parameter 'kernel'" in err and "fsdp=4" in err and "(6, 4)" in err
  assert "SPEC [P(), P('fsdp',)]" in out  # bias (None axes), kernel


def _children(pid: int) -> list[int]:
  """Child process ids of `pid`, from /proc (no procps needed)."""
  out = []
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      out.append(int(stat.parent.name))
  return out


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  work = tmp_path / "run"
  overrides = ["total_steps=400", "checkpoint.every=1000", "log_every=2", "data.image_size=32",
               "data.source.synthetic_count=16", "data.batch_size=8", "data.eval_batch_size=8", "tensorboard=False"]
  cmd = [sys.executable, "launch/local.py", "--processes", "2", "--devices-per-process", "1", "--",
         "--config=configs/m2dino.py:paradigm=au,smoke,tasks=breast_2cls", f"--workdir={work}",
         *(f"--config.{o}" for o in overrides)]
  launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  log = work / "all" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
    time.sleep(0.1)
  assert log.is_file(), launcher.communicate(timeout=60)
  pids = sorted(_children(launcher.pid))
  assert len(pids) == 2
  envs = {pid: Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in pids}
  second = next(pid for pid in pids if b"M2DINO_PROCESS_ID=1" in envs[pid])
  __import__("os").kill(second, signal.SIGTERM)  # only process 1 is told
  launcher.communicate(timeout=300)
  assert launcher.returncode == 75  # EX_TEMPFAIL: preempted with its checkpoint written
  logs = [(work / "logs" / f"process_{i}.log").read_text() for i in (0, 1)]
  stops = [int(__import__("re").search(r"preempted at step (\d+)", text).group(1)) for text in logs]
  assert stops[0] == stops[1] and stops[0] < 400 and stops[0] % 2 == 0
  assert sorted(p.name for p in (work / "all" / "ckpt").iterdir() if p.name.isdigit()) == [str(stops[0])]
  assert not (work / "all" / "done.json").exists()


LAYERS = {"data": {"train", "report"}, "models": {"train", "report"}, "tasks": {"train", "report"},
          "train": {"report"}}


def test_no_import_runs_back_up_the_data_flow():
  pkg = ROOT / "m2dino_jax"
  bad = []
  for sub, forbidden in LAYERS.items():
    for path in (pkg / sub).rglob("*.py"):
      for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
          names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
          names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
          parts = name.split(".")
          if parts[0] == "m2dino_jax" and len(parts) > 1 and parts[1] in forbidden:
            bad.append(f"{path.relative_to(ROOT)} imports {name}")
  assert not bad, bad
