"""The per-task metrics table printed on the console (after training, by `m2dino predict --score`).

One block per task type, in the registry's type order, tasks in registry order:

  per-task metrics (au); ↑ higher is better, ↓ lower is better
  segmentation                n  n_train    dice ↑  hd [px] ↓
    fetal_head               20       80    0.8123      12.35
    lung                     10       40    0.5000      40.00
  segmentation: mean of 2 tasks             0.6562      26.17
  classification              n  n_train     auc ↑  accuracy ↑  f1_macro ↑  f1_weighted ↑     mcc ↑
    lung_2cls                10       40       n/a      0.7000      0.4100         0.5800    0.0000
  ...
  hd and mre in px = pixels of the original image; n = evaluated images, n_train = training images
  n/a = undefined (AUC with one class in the labels, ...); means skip n/a

With `baselines` ({task: metrics of its trivial baseline}, `tasks.baselines.for_config`), a "baseline"
column follows the type's primary metric (seg dice, cls auc, det iou, reg mre), each type block ends with
"<type>: beats baseline: k of n tasks" (strictly better primary metric; an undefined one does not beat), and a
footnote says what the baselines are:

  segmentation                n  n_train    dice ↑  baseline  hd [px] ↓
    fetal_head               20       80    0.8123    0.6250      12.35
  segmentation: mean of 1 task              0.8123    0.6250      12.35
  segmentation: beats baseline: 1 of 1 tasks

Conventions: metric columns are the type's standard metrics (`metrics.METRICS_BY_TYPE`) then any other
numbers the results hold, sorted; HD and MRE are in pixels of the original image; NaN (undefined) prints as
"n/a" with a footnote. The type mean is the official summary's "Average <metric>": the unweighted mean over
the type's tasks with n > 0 (n/a skipped). Only task rows are indented by two spaces (headers, means and
footnotes start at column 0), so a reader can pick the rows out.
"""

from __future__ import annotations

import math

from m2dino_jax.tasks import baselines as baseline_lib
from m2dino_jax.tasks import metrics, registry
from m2dino_jax.tasks.results import COUNT_KEYS

UNITS = {"hd": "px", "mre": "px"}
ARROW = {True: "↑", False: "↓"}
NA = "n/a"
NA_WHY = ("AUC with one class in the labels, or a multiclass task missing a class; the official script scores "
          "0.0 there")


def header(metric: str) -> str:
  """'dice ↑', 'hd [px] ↓': the metric's name, unit and better direction."""
  unit = f" [{UNITS[metric]}]" if metric in UNITS else ""
  arrow = ARROW.get(metrics.HIGHER_IS_BETTER.get(metric))
  return f"{metric}{unit}" + (f" {arrow}" if arrow else "")


def cell(v, metric: str = "") -> str:
  """A metric value: 4 decimals (2 for pixel distances), NaN / None as "n/a"."""
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return NA
  return f"{v:.{2 if metric in UNITS else 4}f}"


def _count(v) -> str:
  return NA if v is None or not math.isfinite(v) else str(int(v))


def task_type(task: str, metric_names) -> str:
  """The registry's type for known tasks, else the type whose metrics the task reports."""
  if task in registry.BY_NAME:
    return registry.BY_NAME[task].type
  for type_, names in metrics.METRICS_BY_TYPE.items():
    if names[0] in metric_names:
      return type_
  return "other"


def task_order(task: str):
  """Sort key: registry tasks in registry order, then unknown ones by name."""
  t = registry.BY_NAME.get(task)
  return (0, t.index, task) if t else (1, 0, task)


def type_means(task_metrics: dict[str, dict], type_: str, names: list[str]) -> tuple[dict[str, float], int]:
  """({metric: mean over the type's tasks with n > 0, NaN skipped}, number of those tasks)."""
  rows = [v for t, v in task_metrics.items() if task_type(t, v) == type_ and v.get("n", 1) > 0]
  out = {}
  for name in names:
    finite = [float(v[name]) for v in rows if isinstance(v.get(name), int | float) and math.isfinite(v[name])]
    out[name] = sum(finite) / len(finite) if finite else math.nan
  return out, len(rows)


BASELINE = "baseline"
BASELINE_NOTE = ("baseline = the trivial prediction fitted on the training split, scored with the same official "
                 "metric (seg: most frequent label per pixel; cls: majority class, AUC 0.5; det: mean training box; "
                 "reg: mean training points); beats = strictly better primary metric")


def _primary(type_: str) -> str | None:
  return metrics.METRICS_BY_TYPE[type_][0] if type_ in metrics.METRICS_BY_TYPE else None


def beats_baseline(task_metrics: dict[str, dict], baselines: dict[str, dict]) -> dict[str, tuple[int, int]]:
  """{task type: (tasks whose primary metric is strictly better than their baseline's, tasks with a baseline)};
  an undefined (n/a) metric on either side counts as not beating."""
  out: dict[str, list[int]] = {}
  for task in sorted(task_metrics, key=task_order):
    if task not in baselines:
      continue
    type_ = task_type(task, task_metrics[task])
    if _primary(type_) is None:
      continue
    k_n = out.setdefault(type_, [0, 0])
    k_n[0] += bool(baseline_lib.beats(type_, task_metrics[task], baselines[task]))
    k_n[1] += 1
  return {t: (k, n) for t, (k, n) in out.items()}


def format_table(task_metrics: dict[str, dict], title: str, convention: str = "default",
                 baselines: dict[str, dict] | None = None) -> str:
  """The table of {task: {metric: value, n: count, ...}} (a `results.Run.tasks` or `TaskEvaluator.result()`
  map); `convention` ('default' | 'official', `metrics.CONVENTIONS`) is named in the footnote. `baselines`
  ({task: metrics}) adds the baseline column after the primary metric and the per-type "beats baseline" line."""
  baselines = baselines or {}
  by_type: dict[str, list[str]] = {}
  for task in sorted(task_metrics, key=task_order):
    by_type.setdefault(task_type(task, task_metrics[task]), []).append(task)
  rank = {t: i for i, t in enumerate(registry.TASK_TYPES)}
  width = max([len(t) + 2 for t in task_metrics] + [len(t) for t in by_type] + [14])
  lines = [f"{title}; ↑ higher is better, ↓ lower is better"]
  beaten = beats_baseline(task_metrics, baselines)
  any_na = False
  for type_ in sorted(by_type, key=lambda t: rank.get(t, len(rank))):
    tasks = by_type[type_]
    standard = list(metrics.METRICS_BY_TYPE.get(type_, ()))
    present = {k for t in tasks for k, v in task_metrics[t].items()
               if isinstance(v, int | float) and k not in COUNT_KEYS}
    names = [m for m in standard if m in present] + sorted(present - set(standard))
    counts = [k for k in ("n", "n_train") if any(k in task_metrics[t] for t in tasks)]
    primary = _primary(type_)
    # metric columns as (label, where the value comes from, metric); the baseline follows the primary metric
    cols = []
    for m in names:
      cols.append((header(m), task_metrics, m))
      if m == primary and any(t in baselines for t in tasks):
        cols.append((BASELINE, baselines, m))
    heads = counts + [c[0] for c in cols]
    widths = [max(len(h), 7 if h in counts else 8) for h in heads]
    lines.append(f"{type_:<{width}}" + "".join(f"  {h:>{w}}" for h, w in zip(heads, widths)))
    for task in tasks:
      v = task_metrics[task]
      cells = [_count(v.get(k, math.nan)) for k in counts] + [
          cell(src.get(task, {}).get(m, math.nan), m) for _, src, m in cols]
      any_na |= NA in cells[len(counts):]
      lines.append(f"  {task:<{width - 2}}" + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths)))
    means, k = type_means({t: task_metrics[t] for t in tasks}, type_, names)
    base_means, _ = type_means({t: baselines[t] for t in tasks if t in baselines}, type_, [primary] if primary else [])
    label = f"{type_}: mean of {k} task{'s' if k != 1 else ''}"
    pad = sum(w + 2 for w in widths[:len(counts)])
    lines.append(f"{label:<{width + pad}}" + "".join(
        f"  {cell((means if src is task_metrics else base_means)[m], m):>{w}}"
        for (_, src, m), w in zip(cols, widths[len(counts):])))
    if type_ in beaten:
      k_b, n_b = beaten[type_]
      lines.append(f"{type_}: beats baseline: {k_b} of {n_b} task{'s' if n_b != 1 else ''}")
  units = sorted({m for t in task_metrics.values() for m in t if m in UNITS})
  notes = []
  if units:
    notes.append(f"{' and '.join(units)} in px = pixels of the original image")
  notes.append("n = evaluated images" + (", n_train = training images" if any(
      "n_train" in v for v in task_metrics.values()) else ""))
  lines.append("; ".join(notes))
  if any_na:
    why = (NA_WHY if convention == "default" else "no evaluated images")
    lines.append(f"n/a = undefined ({why}); means skip n/a")
  if beaten:
    lines.append(BASELINE_NOTE)
  if convention == "official":
    lines.append(f"official convention: {metrics.CONVENTION_NOTE['official']}")
  return "\n".join(lines)
