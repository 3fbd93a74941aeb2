"""Plots of an advice's task transfer: the matrix as a heatmap (tasks ordered by group, group boundaries drawn) and
as a directed graph of its strongest entries (tasks on a circle by group, an arrow j -> i for the transfer of a step
on j to the held-out loss of i: blue helps, red hurts, width by magnitude)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m2dino_jax import fileio


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: Path) -> Path:
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=120)
  fig.clf()
  return path


def graph_edges(advice: dict, top: int | None = None) -> list[tuple[str, str, float]]:
  """The `top` (default 2 x tasks) largest off-diagonal transfers by magnitude as (source j, target i, value),
  strongest first; ties keep the matrix order."""
  tasks = advice["tasks"]
  m = np.asarray(advice["transfer"], dtype=float)
  entries = [(tasks[j], tasks[i], float(m[i, j])) for i in range(len(tasks)) for j in range(len(tasks))
             if i != j and m[i, j] != 0 and np.isfinite(m[i, j])]
  entries.sort(key=lambda e: -abs(e[2]))
  return entries[:2 * len(tasks) if top is None else top]


def transfer_graph(advice: dict, path: Path, top: int | None = None) -> Path:
  plt = _pyplot()
  order = [t for members in advice["groups"].values() for t in members]
  angles = np.linspace(0, 2 * np.pi, len(order), endpoint=False) + np.pi / 2
  pos = {t: (np.cos(a), np.sin(a)) for t, a in zip(order, angles)}
  edges = graph_edges(advice, top)
  lim = max([abs(v) for *_, v in edges] + [1e-9])
  fig, ax = plt.subplots(figsize=(7, 7))
  colours = plt.get_cmap("tab10")
  for k, g in enumerate(advice["groups"]):
    xy = np.array([pos[t] for t in advice["groups"][g]])
    ax.scatter(xy[:, 0], xy[:, 1], s=160, color=colours(k % 10), zorder=3, label=g)
  for src, dst, v in edges:
    ax.annotate("", xy=pos[dst], xytext=pos[src], zorder=2,
                arrowprops=dict(arrowstyle="-|>", color="tab:blue" if v > 0 else "tab:red", alpha=0.75,
                                lw=0.5 + 3.5 * abs(v) / lim, shrinkA=9, shrinkB=9, connectionstyle="arc3,rad=0.12"))
  for t, (x, y) in pos.items():
    ax.text(1.2 * x, 1.2 * y, t, ha="center", va="center", fontsize=7)
  ax.set_title(f"strongest {len(edges)} transfers j -> i (blue helps, red hurts; width = |transfer|, max {lim:.3g})",
               fontsize=8)
  ax.legend(title="group", fontsize=7, loc="lower right", bbox_to_anchor=(1.12, -0.05))
  ax.set_xlim(-1.45, 1.45)
  ax.set_ylim(-1.35, 1.35)
  ax.set_aspect("equal")
  ax.axis("off")
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return path


def transfer_heatmap(advice: dict, path: Path) -> Path:
  plt = _pyplot()
  tasks = advice["tasks"]
  order = [t for members in advice["groups"].values() for t in members]
  idx = [tasks.index(t) for t in order]
  m = np.asarray(advice["transfer"])[np.ix_(idx, idx)]
  lim = max(1e-9, float(np.abs(m).max()))
  fig, ax = plt.subplots(figsize=(1.5 + 0.35 * len(order), 1.2 + 0.35 * len(order)))
  im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim)
  ax.set_xticks(range(len(order)), order, rotation=90, fontsize=7)
  ax.set_yticks(range(len(order)), order, fontsize=7)
  ax.set_xlabel("source task j (one step)")
  ax.set_ylabel("target task i (held-out loss)")
  edge = 0
  for members in advice["groups"].values():
    ax.add_patch(plt.Rectangle((edge - 0.5, edge - 0.5), len(members), len(members), fill=False, lw=1.5))
    edge += len(members)
  fig.colorbar(im, ax=ax, label="transfer j -> i (units of i's own step)")
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return path
