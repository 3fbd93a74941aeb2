"""The study view of a paradigm comparison: each task's primary metric by clinical group with its data sizes,
summaries per group and per task type, and MoE specialisation per layer (tables; plots in study_plots.py).

Sign convention: a delta is the % change of the primary metric against the baseline (TS), positive = better;
for the lower-is-better metrics (HD, MRE) the sign is inverted (`paradigm.relative_change`). Negative transfer
= a delta below 0. Undefined numbers (NaN) are shown as "n/a" and left out of means and counts.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from m2dino_jax.report.paradigm import Row, _fmt
from m2dino_jax.report.plots import METRIC_UNITS
from m2dino_jax.tasks import registry
from m2dino_jax.tasks.results import Run, specialisation

OTHER = "other"
# axis labels with units, per metric
UNITS = METRIC_UNITS


@dataclasses.dataclass
class Point:
  """One task's primary metric across runs, with its clinical group and data sizes per run."""
  task: str
  type: str
  group: str
  metric: str
  higher_is_better: bool | None
  values: dict[str, float]
  deltas: dict[str, float]
  n_eval: dict[str, float]
  n_train: dict[str, float]


def groups_from_run(run: Run) -> dict[str, list[str]]:
  """{model folder: [tasks]} of a run whose tasks live in WORKDIR/<model>/eval (a CG run's groups)."""
  out: dict[str, list[str]] = {}
  for task, path in run.sources.items():
    model = path.parent.parent.name if path.parent.parent != run.root else run.label
    out.setdefault(model, []).append(task)
  return out


def resolve_groups(runs: list[Run], spec: str | None) -> dict[str, list[str]]:
  """The report's groups: `spec` (registry.parse_groups) when given, else the CG run's models when a run is
  labelled 'cg', else the default preset."""
  if spec:
    return registry.parse_groups(spec)
  cg = next((r for r in runs if r.label == "cg"), None)
  if cg is None:
    return registry.default_groups()
  preset = list(registry.default_groups())  # the CG run's groups in the preset's order where they match
  rank = lambda g: (preset.index(g) if g in preset else len(preset), g)  # noqa: E731
  return dict(sorted(groups_from_run(cg).items(), key=lambda kv: rank(kv[0])))


def points(rows: list[Row], runs: list[Run], groups: dict[str, list[str]]) -> list[Point]:
  """Primary-metric points in group order (groups as given, then 'other'), registry order inside a group."""
  group_of = {t: g for g, members in groups.items() for t in members}
  order = {g: i for i, g in enumerate(groups)}
  out = []
  for r in rows:
    if not r.primary:
      continue
    n_eval = {run.label: run.tasks.get(r.task, {}).get("n", math.nan) for run in runs}
    n_train = {run.label: run.tasks.get(r.task, {}).get("n_train", math.nan) for run in runs}
    out.append(Point(r.task, r.type, group_of.get(r.task, OTHER), r.metric, r.higher_is_better, r.values,
                     r.deltas, n_eval, n_train))
  index = {t.name: t.index for t in registry.TASKS}
  return sorted(out, key=lambda p: (order.get(p.group, len(order)), index.get(p.task, 99), p.task))


@dataclasses.dataclass
class Summary:
  """Deltas of one run over a set of tasks: mean, spread (population std), worst, negative count."""
  mean: float
  spread: float
  worst: float
  worst_task: str
  negative: int
  count: int  # tasks with a defined delta
  total: int  # tasks


def summarise(pts: list[Point], label: str) -> Summary:
  finite = [(p.deltas[label], p.task) for p in pts if label in p.deltas and math.isfinite(p.deltas[label])]
  if not finite:
    return Summary(math.nan, math.nan, math.nan, "", 0, 0, len(pts))
  d = np.array([v for v, _ in finite])
  worst, task = min(finite)
  return Summary(float(d.mean()), float(d.std()), float(worst), task, int((d < 0).sum()), len(finite), len(pts))


def summaries(pts: list[Point], key: str) -> dict[str, dict[str, Summary]]:
  """{group or type: {run label: Summary}} (key 'group' or 'type'), in the order the points come."""
  labels = list(dict.fromkeys(lab for p in pts for lab in p.deltas))
  out: dict[str, dict[str, Summary]] = {}
  for name in dict.fromkeys(getattr(p, key) for p in pts):
    members = [p for p in pts if getattr(p, key) == name]
    out[name] = {lab: summarise(members, lab) for lab in labels}
  return out


def _count(v: float) -> str:
  return "n/a" if v is None or not math.isfinite(v) else str(int(v))


def _summary_table(title: str, by: dict[str, dict[str, Summary]], key_name: str) -> list[str]:
  labels = list(next(iter(by.values())).keys()) if by else []
  if not labels:
    return []
  lines = ["", f"## {title}", "",
           "Δ% of the primary metric vs the baseline: mean ± spread (std over tasks), worst task, tasks with "
           "negative transfer (Δ < 0) of tasks with a defined Δ.", "",
           f"| {key_name} | " + " | ".join(f"{lab}: mean ± spread | {lab}: worst | {lab}: negative"
                                           for lab in labels) + " |",
           "|" + "---|" * (1 + 3 * len(labels))]
  for name, per_label in by.items():
    cells = []
    for lab in labels:
      s = per_label[lab]
      spread = "" if math.isnan(s.spread) else f" ± {s.spread:.2f}"
      cells += [_fmt(s.mean, pct=True) + spread,
                "n/a" if math.isnan(s.worst) else f"{s.worst:+.2f}% ({s.worst_task})",
                f"{s.negative}/{s.count}" + (f" ({s.total - s.count} n/a)" if s.total > s.count else "")]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def specialisation_rows(runs: list[Run]) -> list[tuple[str, list[int], list[float], float]]:
  """[(run[/model], MoE blocks, specialisation per block, specialisation of the summed usage)]."""
  out = []
  for run in runs:
    for moe in run.moe:
      name = run.label if moe.model == run.label else f"{run.label}/{moe.model}"
      per_layer = [specialisation(m) for m in moe.per_layer] if moe.per_layer is not None else []
      out.append((name, list(moe.layers), per_layer, specialisation(moe.usage)))
  return out


def to_markdown(pts: list[Point], runs: list[Run], baseline: str) -> str:
  """The study sections: the per-task table by clinical group (values, Δ, n), summaries by group and by task
  type, and MoE specialisation."""
  labels = [r.label for r in runs]
  delta_labels = list(dict.fromkeys(lab for p in pts for lab in p.deltas))
  delta_note = (f"Δ = % change vs `{baseline}`, positive = better (HD and MRE inverted); " if delta_labels
                else "")
  lines = ["", "# Study view", "",
           f"Primary metric per task by clinical group; {delta_note}n_train = training images (after the data "
           "scale), n = evaluated images; n/a = undefined.", "",
           "| group | task | metric | " + " | ".join(labels) + " | "
           + "".join(f"Δ {lab} | " for lab in delta_labels) + "n_train | n |",
           "|" + "---|" * (5 + len(labels) + len(delta_labels))]
  for p in pts:
    arrow = {True: " ↑", False: " ↓"}.get(p.higher_is_better, "")
    n_train = sorted({_count(v) for v in p.n_train.values()})
    n_eval = sorted({_count(v) for v in p.n_eval.values()})
    cells = [p.group, p.task, p.metric + arrow, *(_fmt(p.values[lab]) for lab in labels),
             *(_fmt(p.deltas.get(lab, math.nan), pct=True) for lab in delta_labels),
             "/".join(n_train), "/".join(n_eval)]
    lines.append("| " + " | ".join(cells) + " |")
  if delta_labels:
    lines += _summary_table("Summary by clinical group", summaries(pts, "group"), "group")
    lines += _summary_table("Summary by task type", summaries(pts, "type"), "type")
  spec = specialisation_rows(runs)
  if spec:
    lines += ["", "## MoE specialisation", "",
              "I(task; expert) / log(min(tasks, experts)) of the eval routing counts, tasks weighted equally: "
              "0 = every task uses the experts alike, 1 = tasks on disjoint experts; n/a with one task.", "",
              "| model | per MoE block | all blocks |", "|---|---|---|"]
    for name, layers, per_layer, total in spec:
      per = ", ".join(f"{b}: {_fmt(v)}" for b, v in zip(layers, per_layer)) if per_layer else "n/a"
      lines.append(f"| {name} | {per} | {_fmt(total)} |")
  return "\n".join(lines) + "\n"
