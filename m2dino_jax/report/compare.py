"""One paradigm comparison, from run folders to the written report (tables, study view, plots)."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from m2dino_jax import fileio
from m2dino_jax.errors import M2DinoError
from m2dino_jax.report import paradigm, plots, study, study_plots
from m2dino_jax.tasks import results


@dataclasses.dataclass
class Analysis:
  runs: list[results.Run]
  rows: list[paradigm.Row]
  points: list[study.Point]
  baseline: str

  @property
  def labels(self) -> list[str]:
    return [r.label for r in self.runs]


def analyse(run_dirs: dict[str, Path], baseline: str | None = None, groups: str | None = None) -> Analysis:
  """Loads the runs and lines them up: rows per (task, metric) and primary-metric points by group."""
  if not run_dirs:
    raise M2DinoError("--runs: give at least one LABEL=DIR")
  if baseline is None:
    baseline = "ts"
  elif baseline not in run_dirs:
    raise M2DinoError(f"--baseline '{baseline}' is not one of the --runs labels: {', '.join(run_dirs)}")
  runs = [results.load_run(d, label) for label, d in run_dirs.items()]
  rows = paradigm.build_rows(runs, baseline)
  return Analysis(runs, rows, study.points(rows, runs, study.resolve_groups(runs, groups)), baseline)


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def size_points(pts: list[study.Point]) -> dict[str, list[tuple]]:
  """{run label: [(task, type, n_train of that run, delta)]} for study_plots.delta_vs_size."""
  out: dict[str, list[tuple]] = {}
  for p in pts:
    for lab, d in p.deltas.items():
      out.setdefault(lab, []).append((p.task, p.type, p.n_train.get(lab, math.nan), d))
  return out


def write_report(a: Analysis, out_dir) -> dict[str, Path]:
  """report.md (tables + study view), report.csv and the PNG plots; returns {kind: path}."""
  out, labels, baseline = Path(out_dir), a.labels, a.baseline
  markdown = paradigm.to_markdown(a.rows, a.runs, baseline) + study.to_markdown(a.points, a.runs, baseline)
  written = {
      "markdown": fileio.write_text(out / "report.md", markdown),
      "csv": fileio.write_text(out / "report.csv", paradigm.to_csv(a.rows, labels)),
      "bars": plots.bars_by_type(a.rows, labels, out / "bars.png", plots.eval_counts(a.runs)),
      "fig2_absolute": study_plots.fig2_absolute(a.points, labels, out / "fig2_absolute.png"),
  }
  optional = {
      "delta_heatmap": plots.delta_heatmap(a.rows, baseline, out / "delta_heatmap.png"),
      "fig3_delta": study_plots.fig3_delta(a.points, baseline, out / "fig3_delta.png"),
      "delta_vs_size": study_plots.delta_vs_size(size_points(a.points), baseline, out / "delta_vs_size.png"),
  }
  written.update({k: v for k, v in optional.items() if v is not None})
  for run in a.runs:
    for moe in run.moe:
      name = run.label if moe.model == run.label else f"{run.label}/{moe.model}"
      png = out / f"moe_usage_{_safe(name.replace('/', '_'))}.png"
      written[f"moe_usage_{name}"] = plots.usage_heatmap(moe, png, name)
  return written


def make_report(run_dirs: dict[str, Path], out_dir, baseline: str | None = None,
                groups: str | None = None) -> dict[str, Path]:
  """Loads the runs, writes the markdown + CSV tables and the plots; returns {kind: path}.

  `baseline` (default: 'ts' when given, else no relative changes) must be one of the run labels; `groups`
  a group spec (`study.resolve_groups`).
  """
  return write_report(analyse(run_dirs, baseline, groups), out_dir)
