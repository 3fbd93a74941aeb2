"""The data-scale sweep: one paradigm set (e.g. TS / CG / AU) at several training-data fractions, one command.

  python -m m2dino_jax.main --config=configs/m2dino.py:scale,smoke --workdir=runs/scale
  m2dino report --sweep runs/scale --out runs/scale/report

`config.sweep.fractions` (e.g. '0.1,0.3,1.0') and `config.sweep.paradigms` (default 'ts,cg,au'; 'advised' adds
the groups and weights of `config.advice`, an advice.json from `m2dino advise fit`): for each fraction, each
paradigm trains into WORKDIR/frac<F>/<paradigm>/ with `data.train_fraction = F` and every other knob as
configured. The subsets are those of `data.pipeline.train_subset`: the same examples for every
paradigm at a fraction, nested across fractions. WORKDIR/sweep.json indexes the runs; a rerun skips the
models already finished and resumes the interrupted one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

from m2dino_jax import fileio
from m2dino_jax.advise import adviceio
from m2dino_jax.errors import ConfigError
from m2dino_jax.tasks import results as results_lib
from m2dino_jax.train import loop

INDEX = "sweep.json"


def parse_fractions(spec) -> list[float]:
  try:
    fractions = [float(f) for f in str(spec).replace(";", ",").split(",") if f.strip()]
  except ValueError:
    raise ConfigError("sweep.fractions", f"'{spec}': expected a comma list of fractions, e.g. 0.1,0.3,1.0") from None
  if not fractions or any(not 0 < f <= 1 for f in fractions) or len(set(fractions)) != len(fractions):
    raise ConfigError("sweep.fractions", f"'{spec}': distinct fractions in (0, 1] expected")
  return sorted(fractions)


ADVISED = "advised"


def parse_paradigms(spec, advice: str = "") -> list[str]:
  paradigms = [p.strip() for p in str(spec).split(",") if p.strip()]
  allowed = (*results_lib.PARADIGMS, ADVISED)
  bad = [p for p in paradigms if p not in allowed]
  if not paradigms or bad or len(set(paradigms)) != len(paradigms):
    raise ConfigError("sweep.paradigms", f"'{spec}': a comma list of distinct {allowed}")
  if ADVISED in paradigms and not advice:
    raise ConfigError("advice", f"sweep.paradigms '{spec}' has '{ADVISED}': give advice=PATH (`m2dino advise fit`)")
  return paradigms


def label(fraction: float) -> str:
  return f"frac{fraction:g}"


def plan(config) -> list[tuple[float, str, object]]:
  """[(fraction, paradigm, config)] of the sweep, fractions ascending; each config a modified copy."""
  out = []
  for fraction in parse_fractions(config.sweep.fractions):
    for paradigm in parse_paradigms(config.sweep.paradigms, config.get("advice", "")):
      sub = config.copy_and_resolve_references()
      if paradigm == ADVISED:
        adviceio.apply(sub, config.advice)
      else:
        sub.paradigm = paradigm
      sub.data.train_fraction = fraction
      sub.sweep.fractions = ""
      out.append((fraction, paradigm, sub))
  return out


def run(config, workdir: str, train_fn) -> str:
  """Trains the sweep with `train_fn(config, workdir) -> status` (the multi-task trainer's entry)."""
  root = Path(workdir)
  runs = plan(config)
  index = {"fractions": sorted({f for f, _, _ in runs}), "paradigms": list(dict.fromkeys(p for _, p, _ in runs)),
           "runs": [{"fraction": f, "paradigm": p, "path": f"{label(f)}/{p}"} for f, p, _ in runs]}
  root.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    fileio.write_json(root / INDEX, index)
  for fraction, paradigm, sub in runs:
    print(f"[sweep] train_fraction={fraction:g} paradigm={paradigm}", file=sys.stderr)
    if train_fn(sub, str(root / label(fraction) / paradigm)) == loop.PREEMPTED:
      return loop.PREEMPTED
  return loop.COMPLETED
