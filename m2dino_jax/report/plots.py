"""PNG plots of the paradigm report: primary-metric bars by task type, a delta heatmap, MoE usage heatmaps.

Figures are built with matplotlib's object API (`Figure`, Agg canvas), so nothing touches pyplot's global
state or needs a display; each PNG is written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from m2dino_jax import fileio
from m2dino_jax.report.paradigm import Row
from m2dino_jax.tasks.results import MoeUsage, specialisation

# axis labels with units, per metric (the study figures use the same)
METRIC_UNITS = {"dice": "Dice (0-1)", "hd": "HD (px, original image)", "auc": "AUC (0-1)",
                "accuracy": "accuracy (0-1)", "f1_macro": "macro F1 (0-1)", "f1_weighted": "weighted F1 (0-1)",
                "mcc": "MCC (-1 to 1)", "iou": "box IoU (0-1)", "mre": "MRE (px, original image)"}


def _save(fig: Figure, path) -> Path:
  FigureCanvasAgg(fig)
  fig.tight_layout()
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110)
  return Path(path)


def bars_by_type(rows: list[Row], labels: list[str], path) -> Path:
  """One panel per task type: each task's primary metric as a group of bars, one bar per run."""
  primary = [r for r in rows if r.primary]
  types = list(dict.fromkeys(r.type for r in primary))
  most = max(sum(r.type == t for r in primary) for t in types)
  fig = Figure(figsize=(max(6.0, 2.0 + 0.35 * most * len(labels)), 3.2 * len(types)))
  width = 0.8 / len(labels)
  for i, type_ in enumerate(types):
    ax = fig.add_subplot(len(types), 1, i + 1)
    group = [r for r in primary if r.type == type_]
    x = np.arange(len(group))
    for j, lab in enumerate(labels):
      ax.bar(x + (j - (len(labels) - 1) / 2) * width, [r.values[lab] for r in group], width, label=lab)
    arrow = "higher is better" if group[0].higher_is_better else "lower is better"
    ax.set_title(f"{type_}: {group[0].metric} ({arrow})", fontsize=10)
    ax.set_ylabel(METRIC_UNITS.get(group[0].metric, group[0].metric), fontsize=9)
    ax.set_xticks(x, [r.task for r in group], rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8)
  return _save(fig, path)


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
