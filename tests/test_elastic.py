"""Elastic runs: a P-process run equals a 1-process run, and checkpoints move between meshes and process counts.

Fast tests: the pipeline's global batches do not depend on the process count; the data iterator state
written by 2 processes restores on 1 (and disagreeing states are refused); an 8-device fsdp checkpoint restores
on a 2-device data-parallel mesh with equal values in the target's shardings. The slow tests run the real
trainer through launch/local.py: 2 processes x 4 devices against 1 process x 8 devices (loss curve and final
state); then an fsdp run written by 2 processes resumed by 1 under dp and one written by 1 resumed by 2, and
each of those dp runs (at step 3) resumed back under fsdp on the other process count (dp 1 -> 2 and 2 -> 1);
every resumed run's steps, final state and saved data iterator states (the global position) equal the
uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

from m2dino_jax.data import pipeline
from m2dino_jax.train import distributed
from tests.test_pipeline import TASKS, _config, _sources
from tests.util import ROOT, run_with_devices


def _iterator(p: int, count: int, batch: int = 4):
  cfg = _config(batch_size=batch, mixture="uniform")
  return pipeline.make_train_iterator(cfg, list(TASKS), seed=0, sources=_sources(), process_index=p,
                                      process_count=count)


def _assert_batches_equal(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_global_batches_do_not_depend_on_the_process_count():
  one = _iterator(0, 1)
  ref = [next(one) for _ in range(5)]
  for count in (2, 4):
    its = [_iterator(p, count) for p in range(count)]
    for k in range(5):
      parts = [next(it) for it in its]
      assert all(len(part["image"]) == 4 // count for part in parts)
      _assert_batches_equal({key: np.concatenate([q[key] for q in parts]) for key in parts[0]}, ref[k])
    states = [it.get_state() for it in its]
    assert all(s == states[0] for s in states) and states[0] == one.get_state()
  assert len({int(b["task_id"][0]) for b in ref}) > 1  # the mixture really switches tasks


def test_iterator_state_of_two_processes_restores_on_one(tmp_path):
  two = [_iterator(p, 2) for p in range(2)]
  for _ in range(3):
    for it in two:
      next(it)
  for p, it in enumerate(two):
    (tmp_path / f"process_{p}-of-2.json").write_text(json.dumps(it.get_state()))
  ref = _iterator(0, 1)
  want = [next(ref) for _ in range(5)][3:]
  restored = distributed.ElasticIteratorHandler().restore(epath.Path(tmp_path), item=_iterator(0, 1))
  for w in want:
    _assert_batches_equal(next(restored), w)
  # states that differ (a per-process pipeline) cannot be re-split: refused, not silently mixed
  next(two[1])
  (tmp_path / "process_1-of-2.json").write_text(json.dumps(two[1].get_state()))
  with pytest.raises(ValueError, match="2 processes saved different data iterator states"):
    distributed.ElasticIteratorHandler().restore(epath.Path(tmp_path), item=_iterator(0, 1))


def test_fsdp_checkpoint_on_8_devices_restores_on_2_device_dp():
  out = run_with_devices("""
    import jax, numpy as np, tempfile
    from m2dino_jax import configlib
    from m2dino_jax.tasks import registry
    from m2dino_jax.train import checkpointing, multitask
    def build(extra):
      c = configlib.load_config("configs/m2dino.py:paradigm=au,smoke,tasks=breast_2cls",
                                ["data.image_size=32", "data.batch_size=8"] + extra)
      return multitask._Run(c, None, "all", registry.resolve(c.tasks))
    a = build(["sharding=fsdp", "mesh.data=1", "mesh.fsdp=-1"])
    state = a.state.replace(step=a.state.step + 7)
    d = tempfile.mkdtemp()
    ck = checkpointing.Checkpointer(d, async_save=False)
    ck.save(7, state)
    ck.close()
    b = build(["sharding=dp", "mesh_devices=2", "seed=1"])
    before = jax.device_get(b.state)
    restored = checkpointing.Checkpointer(d).restore(b.state)
    want, got = jax.device_get(state), jax.device_get(restored)
    la, lb, l0 = jax.tree.leaves(want), jax.tree.leaves(got), jax.tree.leaves(before)
    print("LEAVES", len(la), len(lb))
    print("MAXDIFF", max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(la, lb)))
    print("SEED_DIFF", max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(la, l0)))
    print("STEP", int(got.step))
    w = state.params["encoder"]["blocks"][0]["mlp"]["up"]["kernel"]
    r = restored.params["encoder"]["blocks"][0]["mlp"]["up"]["kernel"]
    print("SOURCE", len(w.sharding.device_set), w.sharding.spec)
    print("TARGET", len(r.sharding.device_set), r.sharding.spec)
    same = jax.tree.map(lambda x, y: x.sharding == y.sharding, b.state, restored)
    print("SAME_SHARDINGS", all(jax.tree.leaves(same)))
  """, devices=8)
  vals = dict(line.split(" ", 1) for line in out.splitlines() if line.split(" ", 1)[0].isupper())
  n = vals["LEAVES"].split()
  assert n[0] == n[1] and int(n[0]) > 50
  assert float(vals["MAXDIFF"]) == 0.0 and float(vals["SEED_DIFF"]) > 1e-3 and vals["STEP"] == "7"
  assert vals["SOURCE"] == "8 P('fsdp',)" and vals["TARGET"] == "2 P()"
  assert vals["SAME_SHARDINGS"] == "True"


# ------------------------------------------------------------------------------------------- real runs (slow)

TASKS_ARG = "breast_2cls+fetal_femur"
OVERRIDES = ["total_steps=4", "checkpoint.every=2", "log_every=1", "data.image_size=32",
             "data.source.synthetic_count=16", "data.batch_size=8", "data.eval_batch_size=8", "tensorboard=False",
             "optim.eps=1e-6"]  # eps: Adam turns reassociation noise in ~0 gradients into lr-sized steps
FSDP = ["sharding=fsdp", "mesh.data=1", "mesh.fsdp=-1"]
DP = ["sharding=dp", "mesh.data=-1", "mesh.fsdp=1"]


def _train(workdir, processes: int, extra: list[str]) -> str:
  """Runs the trainer on `processes` x (8 / processes) CPU devices; returns process 0's log."""
  args = [f"--config=configs/m2dino.py:paradigm=au,smoke,tasks={TASKS_ARG}", f"--workdir={workdir}",
          *(f"--config.{o}" for o in OVERRIDES + extra)]
  if processes == 1:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "m2dino_jax.main", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr
  proc = subprocess.run([sys.executable, "launch/local.py", "--processes", str(processes), "--devices-per-process",
                         str(8 // processes), "--", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
  logs = [(workdir / "logs" / f"process_{i}.log").read_text() for i in range(processes)]
  assert proc.returncode == 0, "\n".join(log[-3000:] for log in logs)
  return logs[0]


def _losses(workdir) -> dict[int, tuple[str, float]]:
  """{step: (task, loss)} of the train lines of metrics.jsonl (a resumed run's later lines win)."""
  rows = [json.loads(line) for line in (workdir / "all" / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: (r["task"], r["loss"]) for r in rows if "task" in r}


def _state(workdir, step: int):
  """The saved train state on this process's one device (whatever mesh wrote it)."""
  import orbax.checkpoint as ocp
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    path = (workdir / "all" / "ckpt" / str(step) / "state").resolve()
    meta = ckptr.metadata(path).item_metadata.tree
    like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    return jax.device_get(ckptr.restore(path, like))


def _max_diff(a, b) -> float:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 50
  return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()) for x, y in zip(la, lb))


def _rewind(src, dst, step: int):
  """A copy of run `src` as it was at checkpoint `step` (later checkpoints, metrics and the done marker removed)."""
  shutil.copytree(src, dst)
  for p in (dst / "all" / "ckpt").iterdir():
    if p.name.isdigit() and int(p.name) > step:
      shutil.rmtree(p)
  (dst / "all" / "done.json").unlink()
  metrics = dst / "all" / "metrics.jsonl"
  kept = [line for line in metrics.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
  metrics.write_text("".join(line + "\n" for line in kept))


def _data_states(workdir, step: int) -> dict[str, dict]:
  """{file: state} of the data iterator saved with checkpoint `step` (one process_I-of-N.json per process)."""
  folder = workdir / "all" / "ckpt" / str(step) / "data"
  return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("process_*-of-*.json"))}


def _assert_resumed_equal(ref, work, processes: int, steps: tuple[int, ...]):
  """Steps `steps` of the resumed run `work` (on `processes` processes) equal the uninterrupted run `ref`: the
  same task and loss, the same final state, and the data iterator at the same global position: every one of
  the resumed run's processes saved the state the reference run's processes saved."""
  want, got = _losses(ref), _losses(work)
  assert sorted(got) == [1, 2, 3, 4]
  assert [got[s][0] for s in steps] == [want[s][0] for s in steps]
  assert max(abs(got[s][1] - want[s][1]) for s in steps) <= 1e-5
  assert _max_diff(_state(ref, 4), _state(work, 4)) <= 1e-5
  ref_data, got_data = _data_states(ref, 4), _data_states(work, 4)
  assert sorted(got_data) == [f"process_{i}-of-{processes}.json" for i in range(processes)]
  ref_states = list(ref_data.values())
  assert all(s == ref_states[0] for s in ref_states) and all(s == ref_states[0] for s in got_data.values())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """1 process x 8 devices and 2 processes x 4 devices, fsdp over 8, the same config and seed."""
  root = tmp_path_factory.mktemp("elastic")
  out = {"one": root / "one", "two": root / "two"}
  _train(out["one"], 1, FSDP)
  _train(out["two"], 2, FSDP)
  return out


@pytest.mark.slow
def test_two_processes_equal_one_process(runs):
  one, two = _losses(runs["one"]), _losses(runs["two"])
  assert sorted(one) == sorted(two) == [1, 2, 3, 4]
  assert [one[s][0] for s in one] == [two[s][0] for s in one]  # the same task at every step
  assert len({one[s][0] for s in one}) == 2
  assert max(abs(one[s][1] - two[s][1]) for s in one) <= 1e-5
  assert _max_diff(_state(runs["one"], 4), _state(runs["two"], 4)) <= 1e-5


@pytest.fixture(scope="module")
def dp_resumed(runs, tmp_path_factory):
  """(written, processes) -> the fsdp run `written` rewound to step 2 and resumed under dp on `processes`
  processes (checkpoints every step, so the dp run leaves one at step 3 for the dp -> fsdp case); made once."""
  made = {}

  def get(written: str, processes: int):
    if (written, processes) not in made:
      work = tmp_path_factory.mktemp("dp") / f"{written}-to-{processes}"
      _rewind(runs[written], work, 2)
      log = _train(work, processes, DP + ["resume_policy=override", "checkpoint.every=1"])  # a changed mesh is
      assert "resumed from step 2" in log  # accepted only on request
      made[written, processes] = work
    return made[written, processes]
  return get


@pytest.mark.slow
@pytest.mark.parametrize("written,resumed", [("two", 1), ("one", 2)])
def test_resume_on_another_process_count_and_preset(runs, dp_resumed, written, resumed):
  """A checkpoint (fsdp) written by 2 processes resumes on 1 (and 1 -> 2) under dp, at the same global data
  position: steps 3-4, the final state and the saved data iterator states equal the uninterrupted run's."""
  _assert_resumed_equal(runs[written], dp_resumed(written, resumed), resumed, (3, 4))


@pytest.mark.slow
@pytest.mark.parametrize("written,resumed", [("one", 1), ("two", 2)], ids=["dp2-fsdp1", "dp1-fsdp2"])
def test_resume_dp_checkpoint_into_fsdp_on_another_process_count(runs, dp_resumed, tmp_path, written, resumed):
  """The other direction: a dp checkpoint (step 3 of the dp runs above, written by 2 processes, or by 1)
  resumes under fsdp on 1 process (or 2): step 4, the final state and the data iterator states equal the
  uninterrupted run's. The fsdp programs are the base runs' (the same global mesh), so they come from the
  compilation cache."""
  dp_run = dp_resumed(written, 3 - resumed)
  work = tmp_path / "resumed"
  _rewind(dp_run, work, 3)
  log = _train(work, resumed, FSDP + ["resume_policy=override"])
  assert "resumed from step 3" in log
  _assert_resumed_equal(runs[written], work, resumed, (4,))
