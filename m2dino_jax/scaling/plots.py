"""Pictures of a scaling study (matplotlib, Agg backend, PNG files).

  fits.png        per-domain log-log self laws, data points and bootstrap bands
  transfer.png    the transfer matrix as a heatmap and as a directed graph (arrow j -> i, width ~ tau_ij)
  hub_island.png  hub score (transfer given) and island score (1 / (1 + transfer received)) per domain
  allocation.png  allocated mixture for several budgets next to the data-proportional one
  predicted.png   predicted vs measured loss over all runs, with Pearson r
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from m2dino_jax import fileio  # noqa: E402
from m2dino_jax.scaling import allocate, transfer  # noqa: E402
from m2dino_jax.scaling.law import Fits, predict_loss, self_loss  # noqa: E402
from m2dino_jax.scaling.measurements import MeasurementArrays  # noqa: E402


def _save(fig, path) -> Path:
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  return Path(path)


def _grid(n: int):
  cols = min(n, 3)
  rows = (n + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
  for ax in axes.ravel()[n:]:
    ax.axis("off")
  return fig, axes.ravel()


def plot_fits(fits: Fits, path, arrays: MeasurementArrays | None = None) -> Path:
  fig, axes = _grid(len(fits.domains))
  bands = fits.extra.get("bands")
  for i, (name, ax) in enumerate(zip(fits.domains, axes)):
    if bands:
      grid = np.asarray(bands["d"][i])
      ax.fill_between(grid, bands["lo"][i], bands["hi"][i], alpha=0.25, label="bootstrap band")
    elif arrays is not None:
      sizes = arrays.data[:, i][arrays.data[:, i] > 0]
      grid = np.geomspace(sizes.min(), sizes.max() * 10, 40)
    else:
      grid = np.geomspace(1e2, 1e7, 40)
    law = fits.law
    ax.plot(grid, self_loss(law, grid[:, None], xp=np)[:, i], "k-",
            label=f"E={law.E[i]:.3g} A={law.A[i]:.3g} beta={law.beta[i]:.3g}")
    if arrays is not None:
      alone = (arrays.data[:, i] > 0) & (np.delete(arrays.data, i, axis=1) == 0).all(axis=1)
      ax.plot(arrays.data[alone, i], arrays.loss[alone, i], "o", ms=4, label="runs on this domain only")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_title(name), ax.set_xlabel("examples D"), ax.set_ylabel("held-out loss")
    ax.legend(fontsize=7)
  return _save(fig, path)


def plot_transfer(fits: Fits, path) -> Path:
  tau = np.asarray(fits.law.tau) * (1.0 - np.eye(len(fits.domains)))
  n = len(fits.domains)
  fig, (ax_map, ax_graph) = plt.subplots(1, 2, figsize=(11, 4.6))
  image = ax_map.imshow(tau, cmap="viridis")
  ax_map.set_xticks(range(n), fits.domains, rotation=45), ax_map.set_yticks(range(n), fits.domains)
  ax_map.set_xlabel("source j"), ax_map.set_ylabel("target i"), ax_map.set_title("tau[i][j]: j helps i")
  for i in range(n):
    for j in range(n):
      if i != j:
        ax_map.text(j, i, f"{tau[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
  fig.colorbar(image, ax=ax_map, fraction=0.046)
  angle = np.linspace(0, 2 * np.pi, n, endpoint=False) + np.pi / 2
  pos = np.stack([np.cos(angle), np.sin(angle)], axis=1)
  hub, island = transfer.hub_island_scores(tau)
  width = 6.0 / max(tau.max(), 1e-12)
  for i in range(n):
    for j in range(n):
      if i != j and tau[i, j] > 0:
        ax_graph.annotate("", xy=pos[i], xytext=pos[j],
                          arrowprops={"arrowstyle": "-|>", "lw": 0.5 + width * tau[i, j], "alpha": 0.6,
                                      "connectionstyle": "arc3,rad=0.15", "shrinkA": 18, "shrinkB": 18})
  ax_graph.scatter(pos[:, 0], pos[:, 1], s=900 * (0.3 + hub / max(hub.max(), 1e-12)), c=island,
                   cmap="coolwarm", vmin=0, vmax=1, zorder=3)
  for k, name in enumerate(fits.domains):
    ax_graph.text(*pos[k], name, ha="center", va="center", zorder=4, fontsize=9)
  ax_graph.set_title("transfer graph (size: hub score, colour: island score)")
  ax_graph.set_xlim(-1.5, 1.5), ax_graph.set_ylim(-1.5, 1.5), ax_graph.axis("off")
  return _save(fig, path)


def plot_hub_island(fits: Fits, path) -> Path:
  hub, island = transfer.hub_island_scores(fits.law.tau)
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
  a.bar(fits.domains, hub), a.set_title("hub score: transfer given, sum_i tau_ij")
  b.bar(fits.domains, island, color="tab:red"), b.set_ylim(0, 1)
  b.set_title("island score: 1 / (1 + transfer received)")
  return _save(fig, path)


def plot_allocation(fits: Fits, path, budgets, floor: float) -> Path:
  result = allocate.allocate(fits.law, budgets, fits.available, floor=floor, names=fits.domains)
  n = len(fits.domains)
  fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(budgets), 4))
  x = np.arange(len(budgets))
  bottom = np.zeros(len(budgets))
  prop = result["proportional_counts"] / result["budgets"][:, None]
  for k in range(n):
    ax.bar(x - 0.2, result["fractions"][:, k], 0.38, bottom=bottom, color=f"C{k}", label=fits.domains[k])
    ax.bar(x + 0.2, prop[:, k], 0.38, bottom=prop[:, :k].sum(1), color=f"C{k}", alpha=0.4)
    bottom += result["fractions"][:, k]
  gain = 1.0 - result["objective"] / result["proportional_objective"]
  ax.set_xticks(x, [f"B={b:.3g}\n{g:+.1%}" for b, g in zip(budgets, gain)])
  ax.set_ylabel("fraction of budget")
  ax.set_title("transfer-aware (solid) vs data-proportional (faded)")
  ax.legend(fontsize=7, loc="upper right")
  return _save(fig, path)


def plot_predicted(fits: Fits, arrays: MeasurementArrays, path) -> tuple[Path, float]:
  pred = np.asarray(predict_loss(fits.law, arrays.data, xp=np))
  r = transfer.pearson_r(pred, arrays.loss)
  fig, ax = plt.subplots(figsize=(4.6, 4.4))
  for k, name in enumerate(fits.domains):
    ax.plot(arrays.loss[:, k], pred[:, k], "o", ms=4, label=name)
  ends = [np.nanmin(arrays.loss), np.nanmax(arrays.loss)]
  ax.plot(ends, ends, "k--", lw=1)
  ax.set_xscale("log"), ax.set_yscale("log")
  ax.set_xlabel("measured loss"), ax.set_ylabel("predicted loss"), ax.set_title(f"Pearson r = {r:.4f}")
  ax.legend(fontsize=7)
  return _save(fig, path), r


def plot_all(fits: Fits, out_dir, *, arrays=None, budgets=None, floor: float = 0.05) -> list[Path]:
  out = Path(out_dir)
  written = [plot_fits(fits, out / "fits.png", arrays), plot_transfer(fits, out / "transfer.png"),
             plot_hub_island(fits, out / "hub_island.png")]
  if budgets is None:
    total = np.sum(fits.available) if np.isfinite(fits.available).all() else 1e6
    budgets = list(np.geomspace(total / 100, total / 2, 4))
  written.append(plot_allocation(fits, out / "allocation.png", budgets, floor))
  if arrays is not None:
    written.append(plot_predicted(fits, arrays, out / "predicted.png")[0])
  return written
