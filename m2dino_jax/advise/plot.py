"""The transfer-matrix heatmap of an advice (tasks ordered by group, group boundaries drawn)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m2dino_jax import fileio


def transfer_heatmap(advice: dict, path: Path) -> Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
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
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=120)
  plt.close(fig)
  return path
