"""M2DINO multi-task training end to end: paradigms, learning on simulator data, exact resume,
sharded equality, report and predict."""

import csv
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from m2dino_jax import cli, configlib
from m2dino_jax.data import pipeline
from m2dino_jax.tasks import metrics, registry
from m2dino_jax.tasks import results as report_files
from m2dino_jax.train import checkpointing, multitask
from tests.util import ROOT, run_with_devices

FOUR = "fetal_head+breast_2cls+thyroid_nodule_det+fetal_femur"
SMALL = ["--config.data.image_size=32", "--config.data.source.synthetic_count=16", "--config.data.batch_size=4",
         "--config.data.eval_batch_size=8", "--config.tensorboard=False"]


def _config(arg, overrides=()):
  return configlib.load_config(f"configs/m2dino.py:{arg}", [o.removeprefix("--config.") for o in overrides])


def test_plan_models_and_budget_rule():
  c = _config("paradigm=cg,smoke,tasks=" + FOUR)
  plan = {name: [t.name for t in ts] for name, ts in multitask.plan_models(c)}
  assert plan == {"Fetal": ["fetal_femur", "fetal_head"], "Breast": ["breast_2cls"],
                  "Thyroid": ["thyroid_nodule_det"]}
  assert not multitask.moe_enabled(_config("paradigm=ts,smoke")) and multitask.moe_enabled(c)
  ts = multitask.plan_models(_config("paradigm=ts,smoke,tasks=" + FOUR))
  assert [len(t) for _, t in ts] == [1, 1, 1, 1]
  # the same total number of batches for every paradigm
  for p in ("ts", "cg", "au"):
    cfg = _config(f"paradigm={p},smoke,tasks={FOUR},steps=7")
    assert sum(multitask._total_steps(cfg, len(t)) for _, t in multitask.plan_models(cfg)) == 28


def _baselines(config, tasks):
  """Trivial predictors: all-background masks, mean train box / points, constant class scores."""
  out = {}
  for task in tasks:
    train = pipeline.load_sources(config.data, [task], "train")[task.name]
    val = [pipeline.as_record(r) for r in pipeline.load_sources(config.data, [task], "val")[task.name]]
    ev = metrics.TaskEvaluator(task)
    if task.type == registry.SEGMENTATION:
      for r in val:
        ev.add(np.zeros_like(r.mask), r.mask)
    elif task.type == registry.DETECTION:
      mean = np.mean([pipeline.as_record(r).box for r in train], axis=0)
      for r in val:
        ev.add(mean, r.box)
    elif task.type == registry.REGRESSION:
      mean = np.mean([pipeline.as_record(r).points for r in train], axis=0)
      for r in val:
        ev.add(mean, r.points)
    else:
      continue
    out[task.name] = ev.result()
  return out


@pytest.fixture(scope="module")
def au_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("au")
  args = ["train", f"--config=configs/m2dino.py:paradigm=au,smoke,tasks={FOUR},steps=100", f"--workdir={workdir}",
          "--config.tensorboard=False", "--config.log_every=25"]
  assert cli.main(args) == 0
  return workdir


def test_smoke_au_beats_trivial_baselines(au_run):
  config = _config(f"paradigm=au,smoke,tasks={FOUR}")
  run = report_files.load_run(au_run, "au")
  base = _baselines(config, registry.resolve(FOUR))
  got = run.tasks
  # margins: Dice +0.3 over the empty mask (which scores 0), AUC > 0.6, IoU +0.02 over the mean box, MRE 5% lower
  assert got["fetal_head"]["dice"] > base["fetal_head"]["dice"] + 0.3
  assert got["breast_2cls"]["auc"] > 0.6
  assert got["thyroid_nodule_det"]["iou"] > base["thyroid_nodule_det"]["iou"] + 0.02
  assert got["fetal_femur"]["mre"] < 0.95 * base["fetal_femur"]["mre"]
  usage = json.loads(sorted((au_run / "all" / "eval").glob("*_moe.json"))[0].read_text())
  assert usage["tasks"] == [t.name for t in registry.resolve(FOUR)] and len(usage["usage"][0]) == 4
  assert np.sum(usage["usage"]) > 0


def _run_cli(args, expect=0, crash_at=None):
  entry = ["-m", "m2dino_jax.main"] if crash_at is None else ["tests/crash_run.py", str(crash_at)]
  proc = subprocess.run([sys.executable, *entry, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == expect, proc.stderr[-3000:]
  return proc


def _final_state(workdir, step):
  return checkpointing.restore_params(workdir / "all" / "ckpt" / str(step) / "state")


RESUME = ["--config=configs/m2dino.py:paradigm=au,smoke,tasks=breast_2cls", "--config.total_steps=8",
          "--config.checkpoint.every=2", "--config.log_every=1", *SMALL]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  ref = tmp_path_factory.mktemp("ref")
  _run_cli([*RESUME, f"--workdir={ref}"])
  return jax.tree.leaves(_final_state(ref, 8))


def _assert_same(ref_leaves, state):
  leaves = jax.tree.leaves(state)
  assert len(ref_leaves) == len(leaves) > 20
  for a, b in zip(ref_leaves, leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_after_crash_is_bit_identical(tmp_path, reference_run):
  crashed = tmp_path / "crash"
  _run_cli([*RESUME, f"--workdir={crashed}"], expect=17, crash_at=5)
  assert not (crashed / "all" / "done.json").exists()
  proc = _run_cli([*RESUME, f"--workdir={crashed}"])
  assert "resumed from step 4" in proc.stderr
  _assert_same(reference_run, _final_state(crashed, 8))
  steps = [json.loads(line)["step"] for line in (crashed / "all" / "metrics.jsonl").read_text().splitlines()
           if "task" in json.loads(line)]
  assert steps == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # step 5 ran twice: once before the crash, once after resume


def test_sigterm_checkpoints_and_resumes_exactly(tmp_path, reference_run):
  import signal
  import time
  work = tmp_path / "term"
  proc = subprocess.Popen([sys.executable, "-m", "m2dino_jax.main", *RESUME, f"--workdir={work}",
                           "--config.checkpoint.every=100"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  log = work / "all" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 75, err[-2000:]  # EX_TEMPFAIL: restart wrappers rerun, which resumes
  m = __import__("re").search(r"preempted at step (\d+)", err)
  assert m, err[-2000:]
  stopped = int(m.group(1))
  assert 2 <= stopped < 8 and (work / "all" / "ckpt" / str(stopped)).is_dir()  # no periodic save before 100
  resumed = _run_cli([*RESUME, f"--workdir={work}", "--config.checkpoint.every=100"])
  assert f"resumed from step {stopped}" in resumed.stderr
  _assert_same(reference_run, _final_state(work, 8))


def test_sharded_train_step_equals_single_device():
  """Three train steps on 8 devices (fsdp; expert parallel) equal one device. Adam divides by sqrt(v) + eps,
  which turns float-reassociation noise in near-zero gradients into lr-sized updates; eps = 1e-6 keeps the
  comparison about the sharded computation (losses are compared too)."""
  out = run_with_devices(f"""
    import jax, numpy as np
    from m2dino_jax import configlib
    from m2dino_jax.tasks import registry
    from m2dino_jax.train import multitask
    from m2dino_jax.data import pipeline
    small = {[o.removeprefix("--config.") for o in SMALL[:3]]!r}
    def run(mesh, preset, devices, backend):
      c = configlib.load_config("configs/m2dino.py:paradigm=au,smoke,tasks=fetal_head+breast_2cls",
                                small + ["data.batch_size=8", "optim.eps=1e-6", "moe.backend=" + backend,
                                         "sharding=" + preset, "mesh_devices=%d" % devices]
                                + ["mesh.%s=%d" % kv for kv in mesh.items()])
      r = multitask._Run(c, None, "all", registry.resolve(c.tasks))
      it = map(r.prepare, pipeline.make_train_iterator(c.data, r.tasks, seed=0))
      state, losses = r.state, []
      for _ in range(3):
        state, m = r.step(state, next(it))
        losses.append(m["loss"])
      return jax.device_get({{"enc": state.params["encoder"], "heads": state.params["heads"], "loss": losses}})
    ref = run(dict(data=1), "dp", 1, "dense")
    cases = [(dict(data=2, fsdp=4), "fsdp", "dense"), (dict(data=2, expert=4), "ep", "expert_parallel")]
    for mesh, preset, backend in cases:
      got = run(mesh, preset, 8, backend)
      pairs = zip(jax.tree.leaves(ref), jax.tree.leaves(got))
      diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in pairs)
      print(preset, "MAXDIFF", diff)
  """, timeout=400)
  diffs = [float(line.split("MAXDIFF")[1]) for line in out.splitlines() if "MAXDIFF" in line]
  assert len(diffs) == 2 and max(diffs) <= 1e-5, out


def test_report_and_predict_from_smoke_runs(au_run, tmp_path):
  runs = {"au": au_run}
  for p in ("ts", "cg"):
    runs[p] = tmp_path / p
    assert cli.main(["train", f"--config=configs/m2dino.py:paradigm={p},smoke,tasks={FOUR},steps=4",
                     f"--workdir={runs[p]}", *SMALL, "--config.data.image_size=64"]) == 0
  out = tmp_path / "report"
  assert cli.main(["report", "--runs", *(f"{k}={v}" for k, v in runs.items()), "--out", str(out)]) == 0
  rows = list(csv.DictReader(open(out / "report.csv")))
  checked = 0
  for p, root in runs.items():
    tasks = report_files.load_run(root, p).tasks
    for row in rows:
      if row["task"] in tasks and row["metric"] in tasks[row["task"]] and row.get(p):
        assert float(row[p]) == pytest.approx(tasks[row["task"]][row["metric"]], rel=1e-12)
        checked += 1
  assert checked >= 3 * 8
  assert (out / "report.md").is_file() and (out / "bars.png").read_bytes()[:4] == b"\x89PNG"
  # predict with the AU run on simulator images written as PNG
  from PIL import Image

  from m2dino_jax.data import sonosynth
  img_dir = tmp_path / "imgs"
  img_dir.mkdir()
  for i, rec in enumerate(sonosynth.generate("fetal_head", 2, seed=11, size=80)):
    Image.fromarray(rec.image).save(img_dir / f"case{i}.png")
  pred_dir = tmp_path / "pred"
  assert cli.main(["predict", "--workdir", str(au_run), "--task", "fetal_head", "--input", str(img_dir),
                   "--out", str(pred_dir)]) == 0
  mask = np.asarray(Image.open(pred_dir / "masks" / "fetal_head" / "case0.png"))
  assert mask.shape == (80, 80) and set(np.unique(mask)) <= {0, 1} and mask.any()
  for task in ("fetal_femur", "breast_2cls"):
    assert cli.main(["predict", "--workdir", str(au_run), "--task", task, "--input", str(img_dir),
                     "--out", str(pred_dir)]) == 0
  # the official format: a list of records with image_path (as given) and task_id, flat point lists
  reg = json.loads((pred_dir / "regression_predictions.json").read_text())
  assert isinstance(reg, list) and len(reg) == 2
  pts = next(e for e in reg if e["image_path"] == str(img_dir / "case1.png"))
  assert pts["task_id"] == "fetal_femur" and len(pts["predicted_points_pixels"]) == 4
  assert np.allclose(np.array(pts["predicted_points_pixels"]) / 80, pts["predicted_points_normalized"])
  cls = json.loads((pred_dir / "classification_predictions.json").read_text())
  assert [e["task_id"] for e in cls] == ["breast_2cls"] * 2
  assert all(e["predicted_class"] == int(np.argmax(e["predicted_probs"])) for e in cls)
  assert all(abs(sum(e["predicted_probs"]) - 1) < 1e-5 for e in cls)


def test_router_jitter_trains_deterministically():
  """MoE router jitter (a stateful stream) is reseeded from the step key: runs repeat exactly, and the noise
  changes the loss."""
  from m2dino_jax.data import pipeline as pl

  def losses(jitter):
    c = _config("paradigm=au,smoke,tasks=breast_2cls", SMALL[:3] + [f"--config.moe.jitter={jitter}"])
    r = multitask._Run(c, None, "all", registry.resolve(c.tasks))
    it = map(r.prepare, pl.make_train_iterator(c.data, r.tasks, seed=0))
    state, out = r.state, []
    for _ in range(2):
      state, m = r.step(state, next(it))
      out.append(float(m["loss"]))
    return out

  a, b = losses(0.5), losses(0.5)
  assert a == b and np.all(np.isfinite(a))
  assert a != losses(0.0)
