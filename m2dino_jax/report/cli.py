"""`m2dino report --runs ts=DIR cg=DIR au=DIR --out DIR`: compare the paradigms' evaluation results.
`m2dino report --sweep DIR --out DIR`: the same per training fraction of a data-scale sweep, and the change
against data size over all fractions; `--sweep DIR1 DIR2 ...` (one sweep per seed) adds the spread over seeds.

Writes OUT/report.md and OUT/report.csv (every task's metrics per run, % change vs the baseline signed so
that positive = better) and PNG plots: bars.png (primary metric per task, by task type),
delta_heatmap.png (tasks x runs), moe_usage_<run>[_<model>].png (tasks x experts) per MoE telemetry file,
and the study figures (study_plots.py): fig2_absolute.png, fig3_delta.png, delta_vs_size.png. report.md
ends with the study view (study.py): tasks by clinical group with n_train and n, summaries per group and
per type (mean, spread, worst, negative transfer) and MoE specialisation per block. Groups: --groups
(a preset, 'name:task+task;...' or a JSON file), else the CG run's models, else the 'paper' preset.
A sweep report adds OUT/scale.md, OUT/scale.csv (one line per fraction, task and run), delta_vs_size.png
over all fractions and scale_curve.png, with each fraction's full report in OUT/frac<F>/.
"""

from __future__ import annotations

from pathlib import Path

from m2dino_jax.errors import M2DinoError
from m2dino_jax.report import compare, sweep_report

make_report = compare.make_report


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


def run(args) -> int:
  if bool(args.runs) == bool(args.sweep):
    raise M2DinoError("report: give either --runs LABEL=DIR ... or --sweep DIR")
  if args.sweep and len(args.sweep) > 1:
    written = sweep_report.make_seeds_report([Path(s) for s in args.sweep], args.out, args.baseline, args.groups)
    print((Path(args.out) / "seeds.md").read_text(), end="")
  elif args.sweep:
    written = sweep_report.make_sweep_report(Path(args.sweep[0]), args.out, args.baseline, args.groups)
    print((Path(args.out) / "scale.md").read_text(), end="")
  else:
    written = make_report(_parse_runs(args.runs), args.out, args.baseline, args.groups)
    print((Path(args.out) / "report.md").read_text(), end="")
  print("wrote: " + ", ".join(str(p) for p in written.values()))
  return 0


def register(subparsers) -> None:
  p = subparsers.add_parser("report", help="compare TS / CG / AU runs: tables and plots",
                            description="Compare TS / CG / AU runs from their eval files: markdown and "
                            "CSV tables, % change vs the baseline (positive = better) and PNG plots.")
  p.add_argument("--runs", nargs="+", metavar="LABEL=DIR",
                 help="runs to compare, e.g. ts=runs/ts cg=runs/cg au=runs/au")
  p.add_argument("--sweep", nargs="+", default=None, metavar="DIR",
                 help="a data-scale sweep folder (configs/m2dino.py:scale) instead of --runs; several folders "
                 "(one per seed) add seeds.md: each seed's mean change and the spread over seeds")
  p.add_argument("--groups", default=None,
                 help="clinical groups: a preset (paper, organ, type), 'name:task+task;...' or a JSON file "
                 "(default: the CG run's models, else 'paper')")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--baseline", default=None,
                 help="run label the relative changes are taken against (default: ts, when given)")
  p.set_defaults(func=run)
