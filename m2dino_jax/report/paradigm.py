"""The paradigm comparison table, built from the eval files of runs (format: `tasks/results.py`).

`build_rows` lines the runs up per task and metric with the relative change against the baseline (TS),
signed so that a positive change is an improvement, also for the lower-is-better metrics HD and MRE.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math

from m2dino_jax.tasks import metrics, registry, table
from m2dino_jax.tasks.results import COUNT_KEYS, Run

# ------------------------------------------------------------------------------------------- the table

@dataclasses.dataclass
class Row:
  """One task's metric across runs; `deltas` holds the sign-corrected % change vs the baseline."""
  task: str
  type: str
  metric: str
  higher_is_better: bool | None
  values: dict[str, float]
  deltas: dict[str, float]
  primary: bool


def relative_change(value: float, base: float, higher_is_better: bool) -> float:
  """100 * (value - base) / |base|, negated for lower-is-better metrics; NaN when undefined."""
  if math.isnan(value) or math.isnan(base) or base == 0:
    return math.nan
  change = 100.0 * (value - base) / abs(base)
  return change if higher_is_better else -change


def build_rows(runs: list[Run], baseline: str = "ts") -> list[Row]:
  """Rows (task, metric) over all runs, in task-type then registry order; metrics in their standard order."""
  labels = [r.label for r in runs]
  base = next((r for r in runs if r.label == baseline), None)
  tasks = sorted({t for r in runs for t in r.tasks}, key=table.task_order)
  rows = []
  for task in tasks:
    names = [k for r in runs for k in r.tasks.get(task, {}) if k not in COUNT_KEYS]
    type_ = table.task_type(task, names)
    standard = list(metrics.METRICS_BY_TYPE.get(type_, ()))
    ordered = [m for m in standard if m in names] + sorted(set(names) - set(standard))
    for metric in ordered:
      hib = metrics.HIGHER_IS_BETTER.get(metric)
      values = {r.label: r.tasks.get(task, {}).get(metric, math.nan) for r in runs}
      deltas = {}
      if base is not None and hib is not None:
        deltas = {lab: relative_change(values[lab], values[baseline], hib)
                  for lab in labels if lab != baseline}
      primary = bool(standard) and metric == standard[0]
      rows.append(Row(task, type_, metric, hib, values, deltas, primary))
  type_rank = {t: i for i, t in enumerate(registry.TASK_TYPES)}
  return sorted(rows, key=lambda r: type_rank.get(r.type, len(type_rank)))  # stable: keeps task order


def type_summary(rows: list[Row]) -> dict[str, dict[str, float]]:
  """Per task type, the mean sign-corrected change of the primary metric per run (NaNs skipped)."""
  out: dict[str, dict[str, float]] = {}
  for type_ in dict.fromkeys(r.type for r in rows):
    prim = [r for r in rows if r.type == type_ and r.primary and r.deltas]
    if not prim:
      continue
    out[type_] = {}
    for lab in prim[0].deltas:
      finite = [r.deltas[lab] for r in prim if not math.isnan(r.deltas[lab])]
      out[type_][lab] = sum(finite) / len(finite) if finite else math.nan
  return out


def _fmt(v: float, pct: bool = False) -> str:
  if math.isnan(v):
    return "n/a"
  return f"{v:+.2f}%" if pct else f"{v:.4f}"


def to_csv(rows: list[Row], labels: list[str]) -> str:
  """One line per (task, metric): values per run (full precision) and deltas vs the baseline in %."""
  delta_labels = list(dict.fromkeys(lab for r in rows for lab in r.deltas))
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["task", "type", "metric", "higher_is_better", *labels,
              *(f"delta_{lab}_pct" for lab in delta_labels)])
  for r in rows:
    hib = "" if r.higher_is_better is None else int(r.higher_is_better)
    w.writerow([r.task, r.type, r.metric, hib, *(repr(r.values[lab]) for lab in labels),
                *(repr(r.deltas.get(lab, math.nan)) for lab in delta_labels)])
  return buf.getvalue()


def to_markdown(rows: list[Row], runs: list[Run], baseline: str) -> str:
  """The report: a table per task type, the mean change per type, and notes on uneven sample counts."""
  labels = [r.label for r in runs]
  delta_labels = list(dict.fromkeys(lab for r in rows for lab in r.deltas))
  lines = ["# Paradigm comparison", ""]
  lines += [f"- `{r.label}`: {r.root} ({len(r.tasks)} tasks)" for r in runs]
  if delta_labels:
    lines += ["", f"Change vs `{baseline}` in %, signed so that positive = better (also for HD and MRE)."]
  else:
    lines += ["", f"No `{baseline}` run was given: no relative changes."]
  header = ["task", "metric", *labels, *(f"Δ {lab} vs {baseline}" for lab in delta_labels)]
  for type_ in dict.fromkeys(r.type for r in rows):
    lines += ["", f"## {type_}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in (r for r in rows if r.type == type_):
      arrow = {True: " ↑", False: " ↓"}.get(r.higher_is_better, "")
      cells = [r.task, r.metric + arrow, *(_fmt(r.values[lab]) for lab in labels),
               *(_fmt(r.deltas.get(lab, math.nan), pct=True) for lab in delta_labels)]
      lines.append("| " + " | ".join(cells) + " |")
  summary = type_summary(rows)
  if summary:
    lines += ["", "## Mean change of the primary metric by task type", "",
              "| type | " + " | ".join(delta_labels) + " |", "|" + "---|" * (len(delta_labels) + 1)]
    for type_, by_label in summary.items():
      lines.append(f"| {type_} | " + " | ".join(_fmt(by_label[lab], pct=True) for lab in delta_labels) + " |")
  notes = []
  for task in dict.fromkeys(r.task for r in rows):
    counts = {r.label: r.tasks[task].get("n") for r in runs if task in r.tasks}
    if len({c for c in counts.values()}) > 1:
      notes.append(f"- {task}: evaluated on different numbers of examples: "
                   + ", ".join(f"{k}={'?' if v is None else int(v)}" for k, v in counts.items()))
    missing = [lab for lab in labels if task not in next(r for r in runs if r.label == lab).tasks]
    if missing:
      notes.append(f"- {task}: missing from {', '.join(missing)}")
  if notes:
    lines += ["", "## Notes", "", *notes]
  return "\n".join(lines) + "\n"
