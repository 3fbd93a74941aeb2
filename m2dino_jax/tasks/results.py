"""The eval-file format of trained runs: what trainers write and reports read (below both).

  WORKDIR/eval/STEP.json = {"step": int, "paradigm": "ts" | "cg" | "au",
                            "tasks": {task_name: {metric: value, ..., "n": count, "n_train": count,
                                                  "n_train_available": count}},
                            "data": {"train_fraction": f, "max_train_per_task": k, ...}}   (optional)

  Metric names are those of `m2dino_jax.tasks.metrics` (dice, hd, auc, accuracy, f1_macro, f1_weighted,
  mcc, iou, mre); `COUNT_KEYS` are example counts, not metrics: n (evaluated), n_train (trained on, after
  the data scale) and n_train_available (the task's train split before it); "data" records the data-scale
  knobs of the run. An undefined value (e.g. AUC with one class present) is written as null. Lists or
  objects next to the metrics (e.g. per-class values) are kept in the file and skipped by the report.
  TS and CG train several models: each model is a sub-run with its own WORKDIR/<model_name>/eval/STEP.json
  (a task must be evaluated by one model only). An eval folder may also hold `best.json` (a copy of, or a
  symlink to, the best STEP.json); the reader then uses it, and otherwise the latest STEP.

  MoE telemetry, next to the eval file of the same step:
  WORKDIR[/<model_name>]/eval/STEP_moe.json = {"experts": E, "layers": [block indices], "tasks": [names],
                                               "usage": [[...] per task] (tasks x experts, summed over
                                               the MoE layers: tokens routed to each expert),
                                               "usage_per_layer": [layers x tasks x experts] (optional)}

`load_run` merges every model's chosen eval file under a run folder into one {task: metrics} map.
`specialisation(usage)` scores how task-specific the routing is (see there).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np

from m2dino_jax import fileio
from m2dino_jax.errors import DataError, M2DinoError

PARADIGMS = ("ts", "cg", "au")
COUNT_KEYS = ("n", "n_train", "n_train_available")
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


def write_eval(eval_dir, step: int, paradigm: str, task_metrics: dict[str, dict], data: dict | None = None) -> Path:
  """Writes eval_dir/STEP.json atomically (NaN -> null); `task_metrics` is {task: TaskEvaluator.result()}
  (plus counts `COUNT_KEYS`), `data` the run's data-scale knobs."""
  if paradigm not in PARADIGMS:
    raise ValueError(f"paradigm '{paradigm}' not in {PARADIGMS}")
  tasks = _jsonable(dict(task_metrics))
  for values in tasks.values():
    for key in COUNT_KEYS:
      if values.get(key) is not None:
        values[key] = int(values[key])
  obj = {"step": int(step), "paradigm": paradigm, "tasks": tasks}
  if data is not None:
    obj["data"] = _jsonable(dict(data))
  return fileio.write_json(Path(eval_dir) / f"{int(step)}.json", obj)


def write_best(eval_dir, step: int) -> Path:
  """Copies eval_dir/STEP.json to best.json (a copy, not a symlink, so that it survives file transfers)."""
  src = Path(eval_dir) / f"{int(step)}.json"
  return fileio.write_text(Path(eval_dir) / BEST_NAME, src.read_text())


def write_moe_usage(eval_dir, step: int, experts: int, layers, tasks, usage, per_layer=None) -> Path:
  """Writes eval_dir/STEP_moe.json: `usage` is tasks x experts routed-token counts summed over `layers`;
  `per_layer` (optional) the same per layer, layers x tasks x experts."""
  usage = [[float(u) for u in row] for row in usage]
  if len(usage) != len(tasks) or any(len(row) != experts for row in usage):
    raise ValueError(f"usage must be {len(tasks)} tasks x {experts} experts")
  obj = {"experts": int(experts), "layers": [int(i) for i in layers], "tasks": list(tasks), "usage": usage}
  if per_layer is not None:
    per_layer = [[[float(u) for u in row] for row in layer] for layer in per_layer]
    if len(per_layer) != len(obj["layers"]) or any(np.shape(m) != (len(tasks), experts) for m in per_layer):
      raise ValueError(f"per_layer must be {len(obj['layers'])} layers x {len(tasks)} tasks x {experts} experts")
    obj["usage_per_layer"] = per_layer
  return fileio.write_json(Path(eval_dir) / f"{int(step)}_moe.json", obj)


def specialisation(usage) -> float:
  """How task-specific routing is: the mutual information between task and expert, I(T; E), over
  log(min(T, E)), with every task weighted equally (each task's row normalised to a distribution, so large
  eval sets do not dominate). 0 = every task uses the experts alike; 1 = the expert tells the task (T <= E:
  tasks on disjoint experts) or the task tells the expert (T >= E, top-1). NaN with < 2 tasks or experts
  or a task with no routed tokens."""
  u = np.asarray(usage, np.float64)
  if u.ndim != 2 or min(u.shape) < 2 or (u.sum(axis=1) <= 0).any():
    return math.nan
  p_e_t = u / u.sum(axis=1, keepdims=True)           # p(e | t)
  p_e = p_e_t.mean(axis=0)                            # p(e), tasks uniform

  def entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())

  mi = entropy(p_e) - float(np.mean([entropy(row) for row in p_e_t]))
  return max(0.0, mi) / math.log(min(u.shape))


# --------------------------------------------------------------------------------------------- reading

@dataclasses.dataclass
class MoeUsage:
  """One model's tasks x experts routing counts (summed over layers, and per layer when recorded)."""
  model: str
  path: Path
  experts: int
  layers: list[int]
  tasks: list[str]
  usage: list[list[float]]
  per_layer: list[list[list[float]]] | None = None


@dataclasses.dataclass
class Run:
  """One paradigm's results: {task: {metric: value}}, where each task came from, MoE telemetry and the
  data-scale knobs (`data`, from the eval files; {} when they hold none)."""
  label: str
  root: Path
  tasks: dict[str, dict[str, float]]
  sources: dict[str, Path]
  moe: list[MoeUsage]
  data: dict = dataclasses.field(default_factory=dict)


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
  data = obj.get("data") if isinstance(obj.get("data"), dict) else {}
  return {"step": obj["step"], "paradigm": obj.get("paradigm"), "tasks": tasks, "data": data}


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
  per_layer = obj.get("usage_per_layer")
  if per_layer is not None:
    try:
      per_layer = np.asarray(per_layer, np.float64)
    except (TypeError, ValueError):
      raise DataError(path, "'usage_per_layer' must be layers x tasks x experts numbers") from None
    if per_layer.shape != (len(layers), len(tasks), experts):
      raise DataError(path, f"'usage_per_layer' must be {len(layers)} layers x {len(tasks)} tasks x "
                      f"{experts} experts, got {per_layer.shape}")
    per_layer = per_layer.tolist()
  return MoeUsage(model, path, experts, layers, tasks, [[float(u) for u in row] for row in usage], per_layer)


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
    run.data = run.data or data["data"]
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
