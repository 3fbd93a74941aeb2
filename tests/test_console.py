"""What a user reads on the console and in TensorBoard: the per-task table, TensorBoard tags, the progress
line's rate and ETA, the help of every command and the error for a mistyped task name."""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest

from m2dino_jax import cli, configlib
from m2dino_jax.errors import ConfigError
from m2dino_jax.tasks import registry, table
from m2dino_jax.train import loop
from m2dino_jax.train.multitask import trainer

NAN = math.nan
RESULTS = {
    "fetal_head": {"dice": 0.8, "hd": 12.0, "n": 20.0, "n_train": 80.0, "n_train_available": 100.0},
    "lung": {"dice": 0.5, "hd": 41.0, "n": 10.0, "n_train": 40.0, "n_train_available": 100.0},
    "lung_2cls": {"auc": NAN, "accuracy": 0.7, "f1_macro": 0.4, "f1_weighted": 0.6, "mcc": 0.0, "n": 10.0,
                  "n_train": 40.0},
    "breast_2cls": {"auc": 0.6, "accuracy": 0.5, "f1_macro": 0.3, "f1_weighted": 0.5, "mcc": 0.2, "n": 12.0,
                    "n_train": 40.0},
    "fetal_femur": {"mre": 7.25, "n": 8.0, "n_train": 30.0},
}


# ----------------------------------------------------------------------------------------- per-task table

def _rows(text: str) -> dict[str, list[str]]:
  """{first cell: cells} of the table's lines (task rows are indented, the others are not)."""
  return {ln.split()[0]: re.split(r"\s{2,}", ln.strip()) for ln in text.splitlines() if ln.strip()}


def test_table_counts_units_direction_na_and_type_means():
  text = table.format_table(RESULTS, "per-task metrics (au)")
  lines = text.splitlines()
  assert "↑ higher is better, ↓ lower is better" in lines[0]
  seg_header = next(ln for ln in lines if ln.startswith("segmentation "))
  assert re.split(r"\s{2,}", seg_header.strip()) == ["segmentation", "n", "n_train", "dice ↑", "hd [px] ↓"]
  reg_header = next(ln for ln in lines if ln.startswith("regression "))
  assert reg_header.split()[-3:] == ["mre", "[px]", "↓"]
  rows = _rows(text)
  assert rows["fetal_head"] == ["fetal_head", "20", "80", "0.8000", "12.00"]  # HD in px with 2 decimals
  assert rows["lung_2cls"][:4] == ["lung_2cls", "10", "40", "n/a"]  # NaN AUC -> n/a
  assert "nan" not in text.lower().replace("n/a", "")
  # type means as the official summary: unweighted over the type's tasks, n/a skipped
  seg_mean = next(ln for ln in lines if ln.startswith("segmentation: mean of 2 tasks"))
  assert seg_mean.split()[-2:] == ["0.6500", "26.50"]
  cls_mean = next(ln for ln in lines if ln.startswith("classification: mean of 2 tasks"))
  assert cls_mean.split()[-5:] == ["0.6000", "0.6000", "0.3500", "0.5500", "0.1000"]  # AUC: breast_2cls only
  # footnotes: units, counts and what n/a means; only task rows are indented
  assert any("px = pixels of the original image" in ln for ln in lines)
  assert any(ln.startswith("n/a = undefined") and "0.0" in ln for ln in lines)
  in_order = sorted((t for t in registry.TASKS if t.name in RESULTS),
                    key=lambda t: (registry.TASK_TYPES.index(t.type), t.index))  # by type, then registry order
  assert [ln.split()[0] for ln in lines if ln.startswith("  ")] == [t.name for t in in_order]


def test_table_without_na_has_no_na_footnote_and_official_names_its_convention():
  ok = {k: v for k, v in RESULTS.items() if k != "lung_2cls"}
  assert "n/a" not in table.format_table(ok, "t")
  assert "official convention" in table.format_table(ok, "t", convention="official")


BASELINES = {
    "fetal_head": {"dice": 0.625, "hd": 30.0, "n": 20},
    "lung": {"dice": 0.6, "hd": 20.0, "n": 10},
    "lung_2cls": {"auc": 0.5, "accuracy": 0.7, "n": 10},
    "breast_2cls": {"auc": 0.5, "accuracy": 0.5, "n": 12},
    "fetal_femur": {"mre": 9.0, "n": 8},
}


def test_table_baseline_column_follows_the_primary_metric_and_counts_wins():
  text = table.format_table(RESULTS, "per-task metrics (au)", baselines=BASELINES)
  lines = text.splitlines()
  rows = _rows(text)
  seg_header = next(ln for ln in lines if ln.startswith("segmentation "))
  assert re.split(r"\s{2,}", seg_header.strip()) == ["segmentation", "n", "n_train", "dice ↑", "baseline",
                                                       "hd [px] ↓"]
  assert rows["fetal_head"] == ["fetal_head", "20", "80", "0.8000", "0.6250", "12.00"]
  assert rows["lung_2cls"][3:6] == ["n/a", "0.5000", "0.7000"]  # baseline right after AUC, before accuracy
  assert rows["fetal_femur"][3:] == ["7.25", "9.00"]  # pixel metric: 2 decimals
  seg_mean = next(ln for ln in lines if ln.startswith("segmentation: mean of 2 tasks"))
  assert seg_mean.split()[-3:] == ["0.6500", "0.6125", "26.50"]  # (0.625 + 0.6) / 2
  # dice 0.8 > 0.625, 0.5 < 0.6; AUC 0.6 > 0.5, n/a does not beat; MRE 7.25 < 9 (lower is better)
  assert "segmentation: beats baseline: 1 of 2 tasks" in lines
  assert "classification: beats baseline: 1 of 2 tasks" in lines
  assert "regression: beats baseline: 1 of 1 task" in lines
  assert any(ln.startswith("baseline = the trivial prediction fitted on the training split") for ln in lines)
  assert table.beats_baseline(RESULTS, BASELINES) == {"segmentation": (1, 2), "classification": (1, 2),
                                                      "regression": (1, 1)}
  # a task without a baseline is left out of the count and shows n/a in the column
  partial = {k: v for k, v in BASELINES.items() if k != "lung"}
  assert "segmentation: beats baseline: 1 of 1 task" in table.format_table(RESULTS, "t", baselines=partial)
  assert _rows(table.format_table(RESULTS, "t", baselines=partial))["lung"][4] == "n/a"
  # without baselines the table is unchanged
  assert table.format_table(RESULTS, "t", baselines={}) == table.format_table(RESULTS, "t")
  assert "baseline" not in table.format_table(RESULTS, "t")


def test_trainer_prints_the_shared_table(tmp_path, capsys):
  from m2dino_jax.tasks import results
  results.write_eval(tmp_path / "eval", 5, "au", RESULTS)
  trainer.print_table(results.load_run(tmp_path, "au"))
  out = capsys.readouterr().out
  assert out.strip() == table.format_table(results.load_run(tmp_path, "au").tasks, "per-task metrics (au)")


# ------------------------------------------------------------------------------------------- TensorBoard

def test_tensorboard_tags_per_task_without_counts(tmp_path):
  train = {"task": "lung", "loss": 1.5, "grad_norm": 2.0, "lr": 1e-3}
  assert loop.tb_scalars(train) == {"train/lung/loss": 1.5, "train/lung/grad_norm": 2.0, "train/lr": 1e-3}
  assert loop.tb_scalars({"loss": 1.0}) == {"train/loss": 1.0}  # single-task trainers (dino, mae)
  evals = {"score": 0.5, "lung/dice": 0.7, "lung/n": 10.0, "lung/n_train": 40.0, "lung/n_train_available": 50.0,
           "lung/hd": NAN}
  assert loop.tb_scalars(evals, "eval/") == {"eval/score": 0.5, "eval/lung/dice": 0.7}

  class FakeTB:
    calls = []

    def add_scalar(self, tag, value, step):
      self.calls.append((tag, value, step))

  writer = loop.MetricWriter(tmp_path, tensorboard=False)
  writer.tb = FakeTB()
  writer.write(3, train)
  writer.write(4, evals, prefix="eval/")
  assert FakeTB.calls == [("train/lung/loss", 1.5, 3), ("train/lung/grad_norm", 2.0, 3), ("train/lr", 1e-3, 3),
                          ("eval/score", 0.5, 4), ("eval/lung/dice", 0.7, 4)]
  lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines[0] == {"step": 3, **train}  # metrics.jsonl keeps its format (keys as given)
  assert lines[1]["eval/lung/n"] == 10.0 and lines[1]["step"] == 4


def test_loop_knows_nothing_about_tasks():
  """The loop's tags come from generic conventions: string entries of a train line are its labels, and keys named
  `n` / `n_<what>` are counts; the eval-file counts follow that convention and no metric name is taken for one."""
  import ast
  import inspect

  from m2dino_jax.tasks import metrics, results
  tree = ast.parse(inspect.getsource(loop))
  imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
  imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
  assert not [m for m in imported if m and m.startswith("m2dino_jax.tasks")], imported
  assert all(loop.is_count(k) and loop.is_count(f"lung/{k}") for k in results.COUNT_KEYS)
  assert not [k for k in metrics.HIGHER_IS_BETTER if loop.is_count(k)]
  assert loop.tb_scalars({"phase": "warmup", "loss": 1.0, "lr": 0.1, "n_seen": 4.0}) == {
      "train/warmup/loss": 1.0, "train/lr": 0.1}


# ---------------------------------------------------------------------------------------- progress line

def test_progress_rate_excludes_compile_time(tmp_path, capsys):
  """Step 1 takes 100 s (compilation), every later step 1 s: the first estimate must be within 2x."""
  now = [0.0]
  compile_s, step_s, total, every = 100.0, 1.0, 50, 10

  def step_fn(state, batch):
    now[0] += compile_s if state == 0 else step_s
    return state + 1, {"loss": 0.5}

  writer = loop.MetricWriter(tmp_path, tensorboard=False)
  loop.run(state=0, batches=iter(range(total)), step_fn=step_fn, start_step=0, total_steps=total, writer=writer,
           log_every=every, clock=lambda: now[0])
  lines = [ln for ln in capsys.readouterr().err.splitlines() if "step/s" in ln]
  first = lines[0]
  assert f" {every}/{total} " in first
  rate = float(re.search(r"([\d.]+) step/s", first).group(1))
  m, s = map(int, re.search(r"ETA (\d+):(\d+)", first).groups())
  truth = (total - every) * step_s
  assert truth / 2 <= m * 60 + s <= truth * 2
  assert 0.5 / step_s <= rate <= 2 / step_s
  # the plain since-start average would be 10 steps / 109 s: an ETA 10x too long
  assert (total - every) / (every / (compile_s + (every - 1) * step_s)) > 2 * truth


def test_progress_moving_average_forgets_a_slow_stretch():
  now = [0.0]
  p = loop.Progress(100, every=1, window=2, clock=lambda: now[0])
  p.enabled = True
  p.step_done(1)
  for step in range(2, 8):
    now[0] += 50.0 if step == 3 else 1.0  # one slow step (e.g. a second task type compiling)
    p.update(step)
  assert p.rate == pytest.approx(1.0)  # the window no longer holds the slow step


# ------------------------------------------------------------------------------------------- help texts

def _walk(parser, path=("m2dino",)):
  yield path, parser
  for _, choices, _ in cli.subcommands(parser):
    for name, sub in choices.items():
      yield from _walk(sub, (*path, name))


def test_every_subcommand_and_option_has_help():
  parser = cli.build_parser([])
  seen, problems = 0, []
  for path, p in _walk(parser):
    for _, choices, helps in cli.subcommands(p):
      for name, sub in choices.items():
        if not (helps.get(name) or "").strip():
          problems.append(f"{' '.join(path)} {name}: no one-line help")
        if not (sub.description or "").strip():
          problems.append(f"{' '.join(path)} {name}: no description")
    formatter = p._get_formatter()
    for action in p._actions:
      if isinstance(action, argparse._HelpAction | argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
        continue
      seen += 1
      name = "/".join(action.option_strings) or action.dest
      if not (action.help or "").strip():
        problems.append(f"{' '.join(path)} {name}: no help")
        continue
      text = formatter._expand_help(action)
      if "(default: None)" in text or text.count("(default") > 1:
        problems.append(f"{' '.join(path)} {name}: doubled or empty default: {text!r}")
  assert seen > 150  # every command was walked (bench, eval, scaling, ...)
  assert not problems, "\n".join(problems)


def test_help_shows_real_defaults_once(capsys):
  with pytest.raises(SystemExit):
    cli.main(["predict", "--help"])
  out = capsys.readouterr().out
  assert "(default: 8)" in re.sub(r"\s+", " ", out) and "default: None" not in out


# ----------------------------------------------------------------------------------- mistyped task names

def test_mistyped_task_names_the_key_and_suggests_the_closest():
  config = configlib.load_config("configs/m2dino.py:paradigm=au,smoke,tasks=breast_2cl", [])
  with pytest.raises(ConfigError) as e:
    trainer.plan_models(config)
  assert e.value.key == "tasks"
  assert "unknown task 'breast_2cl'; did you mean 'breast_2cls'" in str(e.value)
  with pytest.raises(ConfigError, match=r"config key 'loss.task_weights'.*did you mean 'fetal_head'"):
    trainer._task_weights("fetal_haed=2", registry.resolve("fetal_head"))
  with pytest.raises(ConfigError, match=r"config key 'groups'.*did you mean 'lung'"):
    registry.parse_groups("a:lungg")
  with pytest.raises(ConfigError) as e:
    registry.get("zzz_not_a_task")
  assert "did you mean" not in str(e.value) and "known: FUGC" in str(e.value)


def test_mistyped_task_on_the_command_line_is_one_line(tmp_path, capsys):
  from m2dino_jax import main
  code = main.main(["--config=configs/m2dino.py:paradigm=au,smoke,tasks=fetal_haed", f"--workdir={tmp_path}"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1
  assert "'tasks'" in err and "did you mean 'fetal_head'" in err


def test_predict_score_prints_the_shared_table(tmp_path, monkeypatch, capsys):
  from m2dino_jax.infer import challenge, predict
  monkeypatch.setattr(predict, "predict_submission", lambda *a, **k: {t: int(v["n"]) for t, v in RESULTS.items()})
  monkeypatch.setattr(challenge, "score", lambda *a, **k: RESULTS)
  assert cli.main(["predict", "--workdir", str(tmp_path), "--data-root", str(tmp_path), "--out", str(tmp_path),
                   "--score"]) == 0
  out = capsys.readouterr().out
  assert table.format_table(RESULTS, "official metrics", convention="official") in out
