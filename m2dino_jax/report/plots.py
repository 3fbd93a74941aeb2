"""PNG plots of the paradigm report: primary-metric bars by task type, a delta heatmap, MoE usage heatmaps.

Figures are built with matplotlib's object API (`Figure`, Agg canvas), so nothing touches pyplot's global
state or needs a display; each PNG is written atomically.

Bar conventions (`value_bars`, shared with the study figures): each bar carries its value; y labels name the
metric with its unit and better direction; a dashed line marks chance where one exists independent of the
data (`CHANCE`: AUC 0.5, MCC 0); an undefined value (NaN, "n/a") is a hollow hatched "n/a bar" with the
text "n/a", never a bar of height 0; tick labels carry the evaluated images per task (n, "a/b" when runs
differ).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from m2dino_jax import fileio
from m2dino_jax.report.paradigm import Row
from m2dino_jax.tasks.results import MoeUsage, specialisation

# axis labels with units, per metric (the study figures use the same)
METRIC_UNITS = {"dice": "Dice (0-1)", "hd": "HD (px, original image)", "auc": "AUC (0-1)",
                "accuracy": "accuracy (0-1)", "f1_macro": "macro F1 (0-1)", "f1_weighted": "weighted F1 (0-1)",
                "mcc": "MCC (-1 to 1)", "iou": "box IoU (0-1)", "mre": "MRE (px, original image)"}
# the value a predictor without information scores, where one exists independent of the data
CHANCE = {"auc": 0.5, "mcc": 0.0}
NA_HATCH = "///"
NA_LABEL = "_n/a"  # n/a bars' label (a leading '_' keeps them out of legends)


def value_text(v: float, metric: str) -> str:
  """A bar's value: 1 decimal for pixel distances (HD, MRE), 2 otherwise."""
  return f"{v:.1f}" if "px" in METRIC_UNITS.get(metric, "") else f"{v:.2f}"


def value_bars(ax, xs, values, width: float, *, label: str, metric: str, na_height: float,
               color: str | None = None) -> None:
  """Bars at `xs` with their values written on them; NaN values as hollow hatched "n/a bars" of height
  `na_height` carrying the text "n/a" (so n/a never reads as 0). Give each run its `color` (e.g. 'C0'), so
  a run with no finite bar in a panel keeps its colour in the legend."""
  xs, vals = np.asarray(xs, float), np.asarray(values, float)
  ok = np.isfinite(vals)
  bars = ax.bar(xs[ok], vals[ok], width, label=label, color=color, zorder=2)
  ax.bar_label(bars, labels=[value_text(v, metric) for v in vals[ok]], fontsize=6, padding=1)
  if not ok.all():
    ax.bar(xs[~ok], np.full((~ok).sum(), na_height), width, fill=False, hatch=NA_HATCH, edgecolor="0.55",
           linewidth=0.6, label=NA_LABEL, zorder=2)
    for x in xs[~ok]:
      ax.text(x, na_height / 2, "n/a", rotation=90, ha="center", va="center", fontsize=8, color="0.2",
              bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})


def na_bar_height(values) -> float:
  """Height of the n/a bars of a panel: its largest finite value (1.0 when none)."""
  finite = [abs(v) for v in values if math.isfinite(v)]
  return max(finite) if finite and max(finite) > 0 else 1.0


def chance_line(ax, metric: str) -> None:
  if metric in CHANCE:
    ax.axhline(CHANCE[metric], color="k", linestyle="--", linewidth=1, zorder=3)


def bar_legend(ax, labels: list[str], metric: str, any_na: bool) -> None:
  """The legend of a `value_bars` panel: one colour per run ('C0', 'C1', ...), the chance line and the n/a
  n/a bar when drawn (built from proxies, so a run without a finite bar keeps its entry)."""
  handles = [Patch(facecolor=f"C{j}", label=lab) for j, lab in enumerate(labels)]
  if metric in CHANCE:
    handles.append(Line2D([], [], color="k", linestyle="--", linewidth=1, label=f"chance ({CHANCE[metric]:g})"))
  if any_na:
    handles.append(Patch(fill=False, hatch=NA_HATCH, edgecolor="0.55", label="n/a (undefined)"))
  ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def direction(higher_is_better: bool | None) -> str:
  return {True: "higher is better", False: "lower is better"}.get(higher_is_better, "")


def n_text(counts) -> str:
  """'n=12', or 'n=10/12' when the runs evaluated different numbers, 'n=n/a' when unknown."""
  vals = sorted({int(v) for v in counts if v is not None and math.isfinite(v)})
  return "n=" + ("/".join(map(str, vals)) or "n/a")


def eval_counts(runs) -> dict[str, list[float]]:
  """{task: [n of each run that evaluated it]} from `results.Run`s."""
  out: dict[str, list[float]] = {}
  for run in runs:
    for task, values in run.tasks.items():
      out.setdefault(task, []).append(values.get("n", math.nan))
  return out


def _save(fig: Figure, path) -> Path:
  FigureCanvasAgg(fig)
  fig.tight_layout()
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110)
  return Path(path)


def bars_figure(rows: list[Row], labels: list[str], counts: dict[str, list[float]] | None = None) -> Figure:
  """One panel per task type: each task's primary metric as a group of bars, one bar per run, by the bar
  conventions of the module docstring; `counts` ({task: [n per run]}, `eval_counts`) labels the ticks."""
  primary = [r for r in rows if r.primary]
  types = list(dict.fromkeys(r.type for r in primary))
  most = max(sum(r.type == t for r in primary) for t in types)
  fig = Figure(figsize=(max(6.0, 2.0 + 0.45 * most * len(labels)), 3.4 * len(types)))
  width = 0.8 / len(labels)
  for i, type_ in enumerate(types):
    ax = fig.add_subplot(len(types), 1, i + 1)
    group = [r for r in primary if r.type == type_]
    metric = group[0].metric
    x = np.arange(len(group))
    values = [r.values[lab] for r in group for lab in labels]
    height = na_bar_height(values)
    for j, lab in enumerate(labels):
      value_bars(ax, x + (j - (len(labels) - 1) / 2) * width, [r.values[lab] for r in group], width, label=lab,
                 metric=metric, na_height=height, color=f"C{j}")
    chance_line(ax, metric)
    ax.set_title(f"{type_}: {metric} ({direction(group[0].higher_is_better)})", fontsize=10)
    ax.set_ylabel(METRIC_UNITS.get(metric, metric), fontsize=9)
    ticks = [f"{r.task}\n{n_text((counts or {}).get(r.task, []))}" if counts is not None else r.task for r in group]
    ax.set_xticks(x, ticks, rotation=30, ha="right", fontsize=7)
    ax.margins(y=0.12)
    bar_legend(ax, labels, metric, any(math.isnan(v) for v in values))
  return fig


def bars_by_type(rows: list[Row], labels: list[str], path, counts: dict[str, list[float]] | None = None) -> Path:
  """bars.png: `bars_figure` written atomically."""
  return _save(bars_figure(rows, labels, counts), path)


def _heatmap(ax, data: np.ndarray, row_names, col_names, *, cmap, vmin, vmax, fmt: str):
  image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
  ax.set_xticks(range(len(col_names)), col_names, fontsize=8)
  ax.set_yticks(range(len(row_names)), row_names, fontsize=8)
  for (i, j), v in np.ndenumerate(data):
    r, g, b, _ = image.cmap(image.norm(v)) if math.isfinite(v) else (1, 1, 1, 1)
    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # white text on dark cells
    ax.text(j, i, "n/a" if math.isnan(v) else format(v, fmt), ha="center", va="center", fontsize=7,
            color="white" if dark else "black")
  return image


def delta_heatmap(rows: list[Row], baseline: str, path) -> Path | None:
  """Tasks x runs heatmap of the primary metric's % change vs the baseline (positive = better)."""
  primary = [r for r in rows if r.primary and r.deltas]
  if not primary:
    return None
  labels = list(primary[0].deltas)
  data = np.array([[r.deltas[lab] for lab in labels] for r in primary], float)
  finite = np.abs(data[np.isfinite(data)])
  limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
  fig = Figure(figsize=(2.0 + 1.3 * len(labels), 1.5 + 0.32 * len(primary)))
  ax = fig.add_subplot()
  image = _heatmap(ax, data, [f"{r.task} ({r.metric})" for r in primary], labels,
                   cmap="RdBu", vmin=-limit, vmax=limit, fmt="+.1f")
  ax.set_title(f"primary metric: % change vs {baseline} (positive = better)", fontsize=10)
  fig.colorbar(image, ax=ax, label="%")
  return _save(fig, path)


def usage_heatmap(moe: MoeUsage, path, name: str | None = None) -> Path:
  """Tasks x experts heatmap of the share of each task's routed tokens that went to each expert."""
  usage = np.asarray(moe.usage, float)
  totals = usage.sum(axis=1, keepdims=True)
  share = np.divide(usage, totals, out=np.full_like(usage, np.nan), where=totals > 0)
  fig = Figure(figsize=(2.5 + 0.55 * moe.experts, 1.5 + 0.32 * len(moe.tasks)))
  ax = fig.add_subplot()
  image = _heatmap(ax, share, moe.tasks, [str(e) for e in range(moe.experts)], cmap="viridis",
                   vmin=0.0, vmax=float(np.nanmax(share)) if np.isfinite(share).any() else 1.0, fmt=".2f")
  ax.set_xlabel("expert")
  layers = ", ".join(map(str, moe.layers)) or "?"
  score = specialisation(usage)
  score = "n/a" if math.isnan(score) else f"{score:.2f}"
  ax.set_title(f"{name or moe.model}: share of routed tokens per expert\n(summed over MoE blocks {layers}; "
               f"specialisation {score})", fontsize=10)
  fig.colorbar(image, ax=ax, label="share")
  return _save(fig, path)
