"""The eval-file format of trained runs: what trainers write and reports read (below both).

  WORKDIR/eval/STEP.json = {"step": int, "paradigm": "ts" | "cg" | "au",
                            "tasks": {task_name: {metric: value, ..., "n": count}}}

  Metric names are those of `m2dino_jax.tasks.metrics` (dice, hd, auc, accuracy, f1_macro, f1_weighted,
  mcc, iou, mre); an undefined value (e.g. AUC with one class present) is written as null. Lists or
  objects next to the metrics (e.g. per-class values) are kept in the file and skipped by the report.
  TS and CG train several models: each model is a sub-run with its own WORKDIR/<model_name>/eval/STEP.json
  (a task must be evaluated by one model only). An eval folder may also hold `best.json` (a copy of, or a
  symlink to, the best STEP.json); the reader then uses it, and otherwise the latest STEP.

  MoE telemetry, next to the eval file of the same step:
  WORKDIR[/<model_name>]/eval/STEP_moe.json = {"experts": E, "layers": [block indices], "tasks": [names],
                                               "usage": [[...] per task] (tasks x experts, summed over
                                               the MoE layers: tokens routed to each expert)}

`load_run` merges every model's chosen eval file under a run folder into one {task: metrics} map.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from m2dino_jax import fileio
from m2dino_jax.errors import DataError, M2DinoError

PARADIGMS = ("ts", "cg", "au")
BEST_NAME = "best.json"
_STEP_FILE = re.compile(r"^(\d+)\.json$")


# --------------------------------------------------------------------------------------------- writing

def _jsonable(value):
  """Plain JSON: NumPy scalars to Python numbers, NaN to null, recursively through lists and dicts."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if hasattr(value, "tolist"):  # NumPy scalars and arrays
    return _jsonable(value.tolist())
  if isinstance(value, float) and math.isnan(value):
    return None
  return value


def write_eval(eval_dir, step: int, paradigm: str, task_metrics: dict[str, dict]) -> Path:
  """Writes eval_dir/STEP.json atomically (NaN -> null); `task_metrics` is {task: TaskEvaluator.result()}."""
  if paradigm not in PARADIGMS:
    raise ValueError(f"paradigm '{paradigm}' not in {PARADIGMS}")
  tasks = _jsonable(dict(task_metrics))
  for values in tasks.values():
    if values.get("n") is not None:
      values["n"] = int(values["n"])
  return fileio.write_json(Path(eval_dir) / f"{int(step)}.json",
                           {"step": int(step), "paradigm": paradigm, "tasks": tasks})


def write_best(eval_dir, step: int) -> Path:
  """Copies eval_dir/STEP.json to best.json (a copy, not a symlink, so that it survives file transfers)."""
  src = Path(eval_dir) / f"{int(step)}.json"
  return fileio.write_text(Path(eval_dir) / BEST_NAME, src.read_text())


def write_moe_usage(eval_dir, step: int, experts: int, layers, tasks, usage) -> Path:
  """Writes eval_dir/STEP_moe.json: `usage` is tasks x experts routed-token counts summed over `layers`."""
  usage = [[float(u) for u in row] for row in usage]
  if len(usage) != len(tasks) or any(len(row) != experts for row in usage):
    raise ValueError(f"usage must be {len(tasks)} tasks x {experts} experts")
  return fileio.write_json(Path(eval_dir) / f"{int(step)}_moe.json",
                           {"experts": int(experts), "layers": [int(i) for i in layers],
                            "tasks": list(tasks), "usage": usage})


# --------------------------------------------------------------------------------------------- reading

@dataclasses.dataclass
class MoeUsage:
  """One model's tasks x experts routing counts."""
  model: str
  path: Path
  experts: int
  layers: list[int]
  tasks: list[str]
  usage: list[list[float]]


@dataclasses.dataclass
class Run:
  """One paradigm's results: {task: {metric: value}}, where each task came from, and MoE telemetry."""
  label: str
  root: Path
  tasks: dict[str, dict[str, float]]
  sources: dict[str, Path]
  moe: list[MoeUsage]


def _read_json(path: Path):
  return fileio.read_json(path, "eval file")


def read_eval_file(path) -> dict:
  """Reads and checks one STEP.json; null metric values become NaN, list / object values are dropped."""
  path = Path(path)
  obj = _read_json(path)
  if not isinstance(obj, dict) or not isinstance(obj.get("tasks"), dict):
    raise DataError(path, "expected an object with a 'tasks' object")
  if not isinstance(obj.get("step"), int):
    raise DataError(path, "expected an integer 'step'")
  tasks = {}
  for name, values in obj["tasks"].items():
    if not isinstance(values, dict):
      raise DataError(path, f"task '{name}': expected an object of metric values")
    clean = {}
    for k, v in values.items():
      if v is None:
        v = math.nan
      if isinstance(v, list | dict):
        continue  # structured extras (per-class values) are not table cells
      if not isinstance(v, int | float) or isinstance(v, bool):
        raise DataError(path, f"task '{name}' metric '{k}': expected a number or null, got {v!r}")
      clean[k] = float(v)
    tasks[name] = clean
  return {"step": obj["step"], "paradigm": obj.get("paradigm"), "tasks": tasks}


def read_moe_file(path, model: str) -> MoeUsage:
  path = Path(path)
  obj = _read_json(path)
  try:
    experts, tasks, usage = int(obj["experts"]), list(obj["tasks"]), obj["usage"]
    layers = [int(i) for i in obj.get("layers", [])]
  except (KeyError, TypeError, ValueError):
    raise DataError(path, "expected 'experts', 'tasks' and 'usage' (tasks x experts)") from None
  if len(usage) != len(tasks) or any(len(row) != experts for row in usage):
    raise DataError(path, f"'usage' must be {len(tasks)} tasks x {experts} experts")
  return MoeUsage(model, path, experts, layers, tasks, [[float(u) for u in row] for row in usage])


def _chosen_eval_file(eval_dir: Path) -> Path | None:
  """best.json when present, else the STEP.json with the largest STEP, else None."""
  if (eval_dir / BEST_NAME).exists():
    return eval_dir / BEST_NAME
  steps = [(int(m.group(1)), p) for p in eval_dir.iterdir() if (m := _STEP_FILE.match(p.name))]
  return max(steps)[1] if steps else None


def load_run(root, label: str) -> Run:
  """Merges the chosen eval file of every model under `root` (root/eval and root/*/eval)."""
  root = Path(root)
  if not root.is_dir():
    raise M2DinoError(f"run '{label}': directory {root} does not exist")
  eval_dirs = [(None, root / "eval")] + [(d.name, d / "eval") for d in sorted(root.iterdir()) if d.is_dir()]
  run = Run(label, root, {}, {}, [])
  for model, eval_dir in eval_dirs:
    if not eval_dir.is_dir() or (path := _chosen_eval_file(eval_dir)) is None:
      continue
    data = read_eval_file(path)
    if label in PARADIGMS and data["paradigm"] not in (None, label):
      raise DataError(path, f"paradigm '{data['paradigm']}' but the run was given as '{label}'")
    for task, values in data["tasks"].items():
      if task in run.tasks:
        raise DataError(path, f"task '{task}' is also evaluated in {run.sources[task]}")
      run.tasks[task], run.sources[task] = values, path
    moe_path = eval_dir / f"{data['step']}_moe.json"
    if moe_path.exists():
      run.moe.append(read_moe_file(moe_path, model or label))
  if not run.tasks:
    raise M2DinoError(f"run '{label}': no eval files (eval/STEP.json or <model>/eval/STEP.json) "
                      f"with tasks under {root}")
  return run
