"""`m2dino report --runs ts=DIR cg=DIR au=DIR --out DIR`: compare the paradigms' evaluation results.

Writes OUT/report.md and OUT/report.csv (every task's metrics per run, % change vs the baseline signed so
that positive = better) and PNG plots: bars.png (primary metric per task, by task type),
delta_heatmap.png (tasks x runs) and moe_usage_<run>[_<model>].png (tasks x experts) per MoE telemetry file.
"""

from __future__ import annotations

import re
from pathlib import Path

from m2dino_jax import fileio
from m2dino_jax.errors import M2DinoError
from m2dino_jax.report import paradigm, plots
from m2dino_jax.tasks import results


def _parse_runs(specs: list[str]) -> dict[str, Path]:
  runs: dict[str, Path] = {}
  for spec in specs:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
      raise M2DinoError(f"--runs: expected LABEL=DIR (e.g. ts=runs/ts), got '{spec}'")
    if label in runs:
      raise M2DinoError(f"--runs: label '{label}' given twice")
    runs[label] = Path(path)
  return runs


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def make_report(run_dirs: dict[str, Path], out_dir, baseline: str | None = None) -> dict[str, Path]:
  """Loads the runs, writes the markdown + CSV tables and the plots; returns {kind: path}.

  `baseline` (default: 'ts' when given, else no relative changes) must be one of the run labels.
  """
  if not run_dirs:
    raise M2DinoError("--runs: give at least one LABEL=DIR")
  if baseline is None:
    baseline = "ts"
  elif baseline not in run_dirs:
    raise M2DinoError(f"--baseline '{baseline}' is not one of the --runs labels: {', '.join(run_dirs)}")
  runs = [results.load_run(d, label) for label, d in run_dirs.items()]
  labels = [r.label for r in runs]
  rows = paradigm.build_rows(runs, baseline)
  out = Path(out_dir)
  written = {
      "markdown": fileio.write_text(out / "report.md", paradigm.to_markdown(rows, runs, baseline)),
      "csv": fileio.write_text(out / "report.csv", paradigm.to_csv(rows, labels)),
      "bars": plots.bars_by_type(rows, labels, out / "bars.png"),
  }
  heatmap = plots.delta_heatmap(rows, baseline, out / "delta_heatmap.png")
  if heatmap is not None:
    written["delta_heatmap"] = heatmap
  for run in runs:
    for moe in run.moe:
      name = run.label if moe.model == run.label else f"{run.label}/{moe.model}"
      png = out / f"moe_usage_{_safe(name.replace('/', '_'))}.png"
      written[f"moe_usage_{name}"] = plots.usage_heatmap(moe, png, name)
  return written


def run(args) -> int:
  written = make_report(_parse_runs(args.runs), args.out, args.baseline)
  print((Path(args.out) / "report.md").read_text(), end="")
  print("wrote: " + ", ".join(str(p) for p in written.values()))
  return 0


def register(subparsers) -> None:
  p = subparsers.add_parser("report", help="compare TS / CG / AU runs: tables and plots",
                            description="Compare TS / CG / AU runs from their eval files: markdown and "
                            "CSV tables, % change vs the baseline (positive = better) and PNG plots.")
  p.add_argument("--runs", nargs="+", required=True, metavar="LABEL=DIR",
                 help="runs to compare, e.g. ts=runs/ts cg=runs/cg au=runs/au")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--baseline", default=None,
                 help="run label the relative changes are taken against (default: ts, when given)")
  p.set_defaults(func=run)
