"""Study figures: the paper's Fig. 2 and Fig. 3 analogues and the paradigm change against data size.

  fig2_absolute.png   each task's primary metric per run, one panel per task type, tasks grouped by
                      clinical group (shaded bands, group names on top), n_train / n under each task,
                      chance lines where one exists (AUC 0.5), values on the bars and n/a
                      as hatched n/a bars (plots.value_bars)
  fig3_delta.png      Δ% vs the baseline per task and run, grouped by clinical group (positive = better,
                      HD / MRE inverted); n/a marked
  delta_vs_size.png   Δ% against training images per task (log x), one panel per run, one point per task
                      (and data fraction, for a sweep), a least-squares trend line Δ = a + b log10(n) per type
  scale_curve.png     (sweep) mean Δ% of each run against the training fraction, per task type
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from m2dino_jax.report import plots
from m2dino_jax.report.plots import _save
from m2dino_jax.report.study import UNITS, Point
from m2dino_jax.tasks import registry

TYPE_COLOURS = {registry.SEGMENTATION: "tab:blue", registry.CLASSIFICATION: "tab:orange",
                registry.DETECTION: "tab:green", registry.REGRESSION: "tab:red"}
DELTA_LABEL = "Δ primary metric vs {base} (%)\npositive = better (HD, MRE inverted)"


def _unit(metric: str) -> str:
  return UNITS.get(metric, metric)


def _group_bands(ax, pts: list[Point], horizontal: bool = False) -> None:
  """Alternating shaded bands behind the tasks of each clinical group, with the group's name."""
  start = 0
  groups = list(dict.fromkeys(p.group for p in pts))
  for i, g in enumerate(groups):
    n = sum(p.group == g for p in pts)
    lo, hi = start - 0.5, start + n - 0.5
    if horizontal:
      if i % 2 == 0:
        ax.axhspan(lo, hi, color="0.93", zorder=0)
      ax.text(1.0, (lo + hi) / 2, f" {g}", transform=ax.get_yaxis_transform(), va="center", ha="left",
              fontsize=8, fontweight="bold")
    else:
      if i % 2 == 0:
        ax.axvspan(lo, hi, color="0.93", zorder=0)
      ax.text((lo + hi) / 2, 1.0, g, transform=ax.get_xaxis_transform(), va="bottom", ha="center", fontsize=8,
              fontweight="bold")
    start += n


def _n_label(p: Point) -> str:
  def one(d):
    vals = sorted({int(v) for v in d.values() if v is not None and math.isfinite(v)})
    return "/".join(map(str, vals)) or "n/a"
  return f"{p.task}\nn_train={one(p.n_train)} n={one(p.n_eval)}"


def fig2_absolute(pts: list[Point], labels: list[str], path) -> Path:
  """Fig. 2 analogue: absolute primary metric per task and run, by task type, grouped by clinical group."""
  rank = {t: i for i, t in enumerate(registry.TASK_TYPES)}
  types = sorted(dict.fromkeys(p.type for p in pts), key=lambda t: rank.get(t, len(rank)))
  most = max(sum(p.type == t for p in pts) for t in types)
  fig = Figure(figsize=(max(7.0, 2.5 + 0.45 * most * max(2, len(labels))), 3.8 * len(types)))
  width = 0.8 / len(labels)
  for i, type_ in enumerate(types):
    ax = fig.add_subplot(len(types), 1, i + 1)
    group = [p for p in pts if p.type == type_]
    x = np.arange(len(group))
    metric = group[0].metric
    _group_bands(ax, group)
    values = [p.values.get(lab, math.nan) for p in group for lab in labels]
    height = plots.na_bar_height(values)
    for j, lab in enumerate(labels):
      plots.value_bars(ax, x + (j - (len(labels) - 1) / 2) * width, [p.values.get(lab, math.nan) for p in group],
                       width, label=lab, metric=metric, na_height=height, color=f"C{j}")
    plots.chance_line(ax, metric)
    ax.set_ylabel(f"{_unit(metric)}\n({plots.direction(group[0].higher_is_better)})", fontsize=9)
    ax.set_title(f"{type_}", fontsize=10, pad=18)
    ax.set_xticks(x, [_n_label(p) for p in group], rotation=30, ha="right", fontsize=7)
    plots.bar_legend(ax, labels, metric, any(math.isnan(v) for v in values))
  return _save(fig, path)


def fig3_delta(pts: list[Point], baseline: str, path) -> Path | None:
  """Fig. 3 analogue: Δ% vs the baseline per task (rows, grouped by clinical group) and run (bars)."""
  pts = [p for p in pts if p.deltas]
  if not pts:
    return None
  labels = list(pts[0].deltas)
  fig = Figure(figsize=(8.0, 1.5 + 0.3 * len(pts) * max(1, len(labels) / 2)))
  ax = fig.add_subplot()
  y = np.arange(len(pts))[::-1].astype(float)
  height = 0.8 / len(labels)
  _group_bands(ax, list(reversed(pts)), horizontal=True)
  for j, lab in enumerate(labels):
    d = np.array([p.deltas.get(lab, math.nan) for p in pts], float)
    ys = y + ((len(labels) - 1) / 2 - j) * height
    ax.barh(ys, np.nan_to_num(d), height, label=lab, zorder=2)
    for yi, v in zip(ys, d):
      if math.isnan(v):
        ax.text(0, yi, " n/a", va="center", ha="left", fontsize=7)
  ax.axvline(0, color="k", linewidth=0.8)
  ax.set_yticks(y, [f"{p.task} ({p.metric})" for p in pts], fontsize=7)
  ax.set_xlabel(DELTA_LABEL.format(base=baseline), fontsize=9)
  ax.set_title(f"relative change vs {baseline} by clinical group", fontsize=10)
  ax.legend(fontsize=7, loc="lower right")
  return _save(fig, path)


def _log_x(ax) -> None:
  ax.set_xscale("log")
  ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def trend(xs, ys) -> tuple[float, float] | None:
  """(a, b) of the least-squares line y = a + b log10(x), or None with < 2 distinct finite x."""
  xs, ys = np.asarray(xs, float), np.asarray(ys, float)
  ok = np.isfinite(xs) & np.isfinite(ys) & (xs > 0)
  if len(np.unique(xs[ok])) < 2:
    return None
  b, a = np.polyfit(np.log10(xs[ok]), ys[ok], 1)
  return float(a), float(b)


def delta_vs_size(points_by_label: dict[str, list[tuple[str, str, float, float]]], baseline: str, path) -> Path | None:
  """Δ% vs training images (log x): {run label: [(task, type, n_train, delta), ...]}, one panel per label."""
  labels = [lab for lab, pts in points_by_label.items()
            if any(math.isfinite(n) and n > 0 and math.isfinite(d) for _, _, n, d in pts)]
  if not labels:
    return None
  fig = Figure(figsize=(5.5 * len(labels), 4.2))
  for i, lab in enumerate(labels):
    ax = fig.add_subplot(1, len(labels), i + 1)
    pts = [(t, ty, n, d) for t, ty, n, d in points_by_label[lab] if math.isfinite(n) and n > 0 and math.isfinite(d)]
    for type_ in dict.fromkeys(ty for _, ty, _, _ in pts):
      xs = [n for _, ty, n, _ in pts if ty == type_]
      ys = [d for _, ty, _, d in pts if ty == type_]
      colour = TYPE_COLOURS.get(type_, "tab:gray")
      ax.scatter(xs, ys, s=18, color=colour, label=type_, zorder=3)
      line = trend(xs, ys)
      if line is not None:
        grid = np.geomspace(min(xs), max(xs), 20)
        ax.plot(grid, line[0] + line[1] * np.log10(grid), color=colour, linewidth=1.2)
    ax.axhline(0, color="k", linewidth=0.8)
    _log_x(ax)
    ax.set_xlabel("training images per task (log scale)", fontsize=9)
    ax.set_ylabel(DELTA_LABEL.format(base=baseline), fontsize=9)
    ax.set_title(f"{lab} vs {baseline}: change against data size", fontsize=10)
    ax.legend(fontsize=7)
  return _save(fig, path)


def scale_curve(table: dict[str, dict[float, dict[str, float]]], baseline: str, path) -> Path | None:
  """(sweep) mean Δ% vs training fraction: {run label: {fraction: {type or 'all': mean delta}}}."""
  labels = [lab for lab in table if table[lab]]
  if not labels:
    return None
  fig = Figure(figsize=(5.5 * len(labels), 4.0))
  for i, lab in enumerate(labels):
    ax = fig.add_subplot(1, len(labels), i + 1)
    fractions = sorted(table[lab])
    keys = list(dict.fromkeys(k for f in fractions for k in table[lab][f]))
    for key in keys:
      ys = [table[lab][f].get(key, math.nan) for f in fractions]
      style = dict(color="k", linewidth=2.0) if key == "all" else dict(color=TYPE_COLOURS.get(key, "tab:gray"))
      ax.plot(fractions, ys, marker="o", label=key, **style)
    ax.axhline(0, color="k", linewidth=0.8, linestyle=":")
    _log_x(ax)
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.set_xlabel("training fraction per task (log scale)", fontsize=9)
    ax.set_ylabel("mean " + DELTA_LABEL.format(base=baseline), fontsize=9)
    ax.set_title(f"{lab} vs {baseline}", fontsize=10)
    ax.legend(fontsize=7)
  return _save(fig, path)
