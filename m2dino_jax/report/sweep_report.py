"""The report of a data-scale sweep (train/multitask/sweep.py): the paradigm change against data size.

Reads SWEEP/sweep.json ({"runs": [{"fraction", "paradigm", "path"}]}), writes each fraction's full paradigm
report to OUT/frac<F>/ and, over all fractions:
  scale.md          mean Δ% of the primary metric vs the baseline per fraction and run, overall and per task
                    type and clinical group, with negative-transfer counts
  scale.csv         one line per (fraction, task, run): group, type, metric, value, Δ%, n_train, n
  delta_vs_size.png Δ% against training images, every (task, fraction) a point, trend per task type
  scale_curve.png   mean Δ% against the training fraction per run, overall and per task type
  scale.json        the curve's numbers: {"baseline", "fractions", "mean_delta_pct": {run: {fraction: {all|type: Δ%}}}}

Several sweeps of the same plan (one per seed: `make_seeds_report`) get their own reports in OUT/<sweep name>/ and
seeds.md / seeds.csv: per fraction and run, the mean Δ% over all tasks (and per task type) of each seed, their
mean and standard deviation, so a difference between paradigms can be read against the seed-to-seed spread.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from m2dino_jax import fileio
from m2dino_jax.errors import DataError, M2DinoError
from m2dino_jax.report import compare, study, study_plots
from m2dino_jax.report.paradigm import _fmt

INDEX = "sweep.json"


def load_sweep(root: Path) -> dict[float, dict[str, Path]]:
  """{fraction: {paradigm: run folder}} of the finished runs (a run folder that does not exist is left out)."""
  index = root / INDEX
  if not index.is_file():
    raise M2DinoError(f"--sweep: {index} does not exist (train with configs/m2dino.py:scale)")
  obj = fileio.read_json(index, "sweep index")
  try:
    entries = [(float(r["fraction"]), str(r["paradigm"]), root / r["path"]) for r in obj["runs"]]
  except (KeyError, TypeError, ValueError):
    raise DataError(index, "expected {'runs': [{'fraction', 'paradigm', 'path'}, ...]}") from None
  out: dict[float, dict[str, Path]] = {}
  for fraction, paradigm, path in entries:
    if path.is_dir():
      out.setdefault(fraction, {})[paradigm] = path
  if not out:
    raise M2DinoError(f"--sweep: no run folder of {index} exists yet")
  return dict(sorted(out.items()))


def _mean(values) -> float:
  finite = [v for v in values if math.isfinite(v)]
  return sum(finite) / len(finite) if finite else math.nan


def make_sweep_report(root: Path, out_dir, baseline: str | None = None, groups: str | None = None) -> dict:
  out = Path(out_dir)
  analyses = {}
  written: dict[str, Path] = {}
  for fraction, run_dirs in load_sweep(Path(root)).items():
    a = compare.analyse(run_dirs, baseline, groups)
    analyses[fraction] = a
    for kind, path in compare.write_report(a, out / f"frac{fraction:g}").items():
      written[f"frac{fraction:g}/{kind}"] = path
  base = next(iter(analyses.values())).baseline
  labels = list(dict.fromkeys(lab for a in analyses.values() for p in a.points for lab in p.deltas))
  pooled: dict[str, list[tuple]] = {}
  curve: dict[str, dict[float, dict[str, float]]] = {lab: {} for lab in labels}
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["fraction", "task", "group", "type", "metric", "run", "value", "delta_pct", "n_train", "n"])
  lines = ["# Paradigm change against data size", "",
           f"Mean Δ% of the primary metric vs `{base}` (positive = better, HD and MRE inverted) per training "
           "fraction; in brackets the tasks with negative transfer (Δ < 0) of those with a defined Δ; n/a = "
           "undefined.", ""]
  sections = {"all": lambda p: "all", "type": lambda p: p.type, "group": lambda p: p.group}
  tables = {k: {} for k in sections}
  for fraction, a in analyses.items():
    for p in a.points:
      for lab in a.labels:
        w.writerow([fraction, p.task, p.group, p.type, p.metric, lab, repr(p.values.get(lab, math.nan)),
                    repr(p.deltas.get(lab, math.nan)), _int(p.n_train.get(lab)), _int(p.n_eval.get(lab))])
    for lab, pts in compare.size_points(a.points).items():
      pooled.setdefault(lab, []).extend(pts)
    for kind, key in sections.items():
      for name in dict.fromkeys(key(p) for p in a.points):
        members = [p for p in a.points if key(p) == name]
        tables[kind].setdefault(name, {})[fraction] = {lab: study.summarise(members, lab) for lab in labels}
    for lab in labels:
      curve[lab][fraction] = {"all": _mean(p.deltas.get(lab, math.nan) for p in a.points)}
      for type_ in dict.fromkeys(p.type for p in a.points):
        curve[lab][fraction][type_] = _mean(p.deltas.get(lab, math.nan) for p in a.points if p.type == type_)
  fractions = list(analyses)
  for kind, title in (("all", "All tasks"), ("type", "By task type"), ("group", "By clinical group")):
    lines += [f"## {title}", "", f"| {kind} | run | " + " | ".join(f"{f:g}" for f in fractions) + " |",
              "|" + "---|" * (2 + len(fractions))]
    for name, per_fraction in tables[kind].items():
      for lab in labels:
        cells = []
        for f in fractions:
          s = per_fraction.get(f, {}).get(lab)
          cells.append("n/a" if s is None else f"{_fmt(s.mean, pct=True)} ({s.negative}/{s.count})")
        lines.append(f"| {name} | {lab} | " + " | ".join(cells) + " |")
    lines.append("")
  written["scale_md"] = fileio.write_text(out / "scale.md", "\n".join(lines))
  written["scale_json"] = fileio.write_json(out / "scale.json", {
      "baseline": base, "fractions": fractions,
      "mean_delta_pct": {lab: {f"{f:g}": v for f, v in per.items()} for lab, per in curve.items()}})
  written["scale_csv"] = fileio.write_text(out / "scale.csv", buf.getvalue())
  for kind, path in (("delta_vs_size", study_plots.delta_vs_size(pooled, base, out / "delta_vs_size.png")),
                     ("scale_curve", study_plots.scale_curve(curve, base, out / "scale_curve.png"))):
    if path is not None:
      written[kind] = path
  return written


def _int(v) -> str:
  return "" if v is None or not math.isfinite(v) else str(int(v))


def make_seeds_report(roots: list[Path], out_dir, baseline: str | None = None, groups: str | None = None) -> dict:
  """One sweep report per root (OUT/<root name>/) and seeds.md / seeds.csv over the roots (module docstring)."""
  out = Path(out_dir)
  names = [Path(r).name for r in roots]
  if len(set(names)) != len(names):
    raise M2DinoError(f"report --sweep: the sweep folders need distinct names (one per seed), got {names}")
  written: dict[str, Path] = {}
  curves = {}
  for root, name in zip(roots, names):
    for kind, path in make_sweep_report(Path(root), out / name, baseline, groups).items():
      written[f"{name}/{kind}"] = path
    curves[name] = fileio.read_json(out / name / "scale.json", "sweep summary")
  bases = {c["baseline"] for c in curves.values()}
  if len(bases) != 1:
    raise M2DinoError(f"report --sweep: the sweeps have different baselines {sorted(bases)}")
  cells: dict[tuple, dict[str, float]] = {}  # (fraction, run, all|type) -> {sweep: mean Δ%}
  for name, c in curves.items():
    for lab, per in c["mean_delta_pct"].items():
      for fraction, by_key in per.items():
        for key, v in by_key.items():
          cells.setdefault((fraction, lab, key), {})[name] = v
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["fraction", "run", "tasks", "mean_delta_pct", "std_delta_pct", "seeds", *names])
  lines = ["# Paradigm change over seeds", "",
           f"Mean Δ% of the primary metric vs `{bases.pop()}` over all tasks (positive = better, HD and MRE inverted) "
           f"per seed ({', '.join(names)}), then the mean ± standard deviation over the seeds.", "",
           "| fraction | run | tasks | " + " | ".join(names) + " | mean ± sd |", "|" + "---|" * (4 + len(names))]
  for (fraction, lab, key), per_seed in cells.items():
    values = [per_seed.get(n, math.nan) for n in names]
    finite = [v for v in values if math.isfinite(v)]
    mean = _mean(finite)
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite)) if finite else math.nan
    w.writerow([fraction, lab, key, repr(mean), repr(sd), len(finite), *map(repr, values)])
    spread = "n/a" if math.isnan(sd) else f"{sd:.2f}%"
    lines.append(f"| {fraction} | {lab} | {key} | " + " | ".join(_fmt(v, pct=True) for v in values)
                 + f" | {_fmt(mean, pct=True)} ± {spread} |")
  written["seeds_md"] = fileio.write_text(out / "seeds.md", "\n".join(lines) + "\n")
  written["seeds_csv"] = fileio.write_text(out / "seeds.csv", buf.getvalue())
  return written
