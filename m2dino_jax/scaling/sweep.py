"""`m2dino scaling sweep`: the 3D MAE pretrainings the scaling method needs, the fit, the allocations, the
strategies trained and fine-tuned, and a report (the measured half of the study; `compare` is the planted one).

Stages (every run in its own folder WORKDIR/runs/RUN; a finished run, with done.json, is not retrained, so an
interrupted sweep resumes where it stopped):
  1. design    per domain, pretraining on that domain alone at each of `sweep.sizes` volumes (self laws; their
               losses on the other domains are single-source transfer), and `sweep.mixtures` Dirichlet(2)
               mixtures at each of `sweep.mixture_budgets` -> rows in WORKDIR/measurements.jsonl
  2. fit       self laws + transfer (transfer.fit_scaling) -> WORKDIR/fits.json. With `sweep.E = auto` a
               domain's floor E is fitted only where its points identify it (>= 3 sizes, the loss falls beyond
               its scatter, the free fit converges), else held at 0 (the paper's pure power law); the report's
               self-law table gives per domain the drop, the log-log slope +- its standard error, E, A, beta
               and the RMS log residual, and a warning names each domain whose loss does not fall with data
               (runs too short for the data size to matter) instead of a silent non-converged fit
  3. allocate  every strategy (strategies.py) at each held-out budget `sweep.budgets`, rounded to whole volumes
               -> WORKDIR/allocations/STRATEGY_B.json
  4. train     each allocation pretrained -> rows in WORKDIR/strategy_measurements.jsonl
  5. finetune  each strategy's run at the largest budget, and a random-init control, on each downstream task
               (`sweep.downstream`, e.g. 'abd_ct:segmentation,brain_t1:classification')
  6. report    WORKDIR/report.json and report.md: measured held-out loss per strategy and domain, gains of
               transfer_aware in %, predicted vs measured (r, MAPE) per domain and pooled, downstream Dice / AUC.

Data units are training volumes: a run's `data[domain]` is the number of distinct volumes of that domain it
trained on (the first N), sampled in proportion to N (mixture 'size'); every run takes the same number of steps.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np

from m2dino_jax import fileio
from m2dino_jax.errors import ConfigError, SolverError

FOCUS = "transfer_aware"


def _names(text, key) -> list[str]:
  out = [s.strip() for s in str(text).split(",") if s.strip()]
  if not out:
    raise ConfigError(key, "empty list")
  return out


def _ints(text, key) -> list[int]:
  try:
    out = [int(float(s)) for s in _names(text, key)]
  except ValueError:
    raise ConfigError(key, f"expected comma-separated numbers, got {text!r}") from None
  if any(v <= 0 for v in out):
    raise ConfigError(key, f"every value must be > 0, got {out}")
  return out


def _named_ints(text, key, domains) -> dict[str, int]:
  out = {}
  for item in _names(text, key):
    name, sep, value = item.partition("=")
    if not sep or name.strip() not in domains:
      raise ConfigError(key, f"bad entry {item!r}; use domain=N for domains {domains}")
    out[name.strip()] = int(value)
  return out


def round_counts(x, available) -> np.ndarray:
  """Whole volumes summing to round(sum x): floors, then the largest remainders, never above `available`."""
  x = np.minimum(np.asarray(x, np.float64), available)
  total = min(int(round(x.sum())), int(np.sum(available)))
  out = np.floor(x).astype(int)
  order = np.argsort(-(x - out), kind="stable")
  while out.sum() < total:
    for i in order:
      if out.sum() >= total:
        break
      if out[i] < available[i]:
        out[i] += 1
  return out


class Plan:
  """The sweep's settings, checked: domains, availability, the design grid, budgets, strategies, tasks."""

  def __init__(self, config):
    s = config.sweep
    from m2dino_jax.scaling import strategies
    self.domains = _names(s.domains, "sweep.domains")
    avail = _named_ints(s.available, "sweep.available", self.domains) if s.available else {}
    default = config.pretrain.data.per_domain - config.pretrain.data.heldout
    self.available = np.array([avail.get(d, default) for d in self.domains], int)
    if (self.available <= 0).any():
      raise ConfigError("sweep.available", f"every domain needs > 0 training volumes, got {self.available}")
    self.sizes = _ints(s.sizes, "sweep.sizes")
    self.mixture_budgets = _ints(s.mixture_budgets, "sweep.mixture_budgets") if s.mixture_budgets else []
    self.per_budget = int(s.mixtures)
    self.budgets = _ints(s.budgets, "sweep.budgets")
    total = int(self.available.sum())
    for key, values in (("sweep.budgets", self.budgets), ("sweep.mixture_budgets", self.mixture_budgets)):
      if any(b > total for b in values):
        raise ConfigError(key, f"{values} exceed the {total} training volumes available")
    self.strategies = _names(s.strategies, "sweep.strategies")
    bad = [n for n in self.strategies if n not in strategies.STRATEGIES]
    if bad or FOCUS not in self.strategies:
      raise ConfigError("sweep.strategies", f"{bad or 'missing ' + FOCUS}; known: {strategies.STRATEGIES} "
                        f"(must include {FOCUS})")
    self.tasks = []
    for item in _names(s.downstream, "sweep.downstream") if s.downstream else []:
      dom, sep, task = item.partition(":")
      if not sep or task not in ("segmentation", "classification") or dom not in self.domains:
        raise ConfigError("sweep.downstream", f"bad entry {item!r}; use domain:segmentation|classification")
      self.tasks.append((dom, task))

  def design(self, seed: int) -> list[tuple[str, np.ndarray]]:
    """(run id, volumes per domain) of the design runs."""
    n, runs = len(self.domains), []
    for j, d in enumerate(self.domains):
      for size in sorted({min(s, int(self.available[j])) for s in self.sizes}):
        x = np.zeros(n, int)
        x[j] = size
        runs.append((f"single-{d}-{size}", x))
    rng = np.random.default_rng(seed)
    for b in self.mixture_budgets:
      for k in range(self.per_budget):
        runs.append((f"mix-{b}-{k}", round_counts(rng.dirichlet(np.full(n, 2.0)) * b, self.available)))
    return runs


def _pretrain_config(config, plan: Plan, counts, run_id: str, measurements: Path):
  c = copy.deepcopy(config.pretrain)
  heldout = c.data.heldout
  with c.unlocked():
    c.data.domains = ",".join(plan.domains)
    c.data.phantom_counts = ",".join(f"{d}={int(a) + heldout}" for d, a in zip(plan.domains, plan.available))
    c.data.budget = ",".join(f"{d}={int(v)}" for d, v in zip(plan.domains, counts))
    c.data.mixture = "size"
    c.run_id = run_id
    c.measurements = str(measurements)
  return c


def _finetune_config(config, domain: str, task: str, init_from: str):
  c = copy.deepcopy(config.finetune)
  with c.unlocked():
    c.task, c.data.domain, c.init_from = task, domain, init_from
  return c


def _fingerprint(c: dict) -> dict:
  """The settings a finished run must share with the run the sweep asks for (else it is a different run)."""
  return {"data": {k: c["data"].get(k) for k in ("domains", "domain", "budget", "phantom_counts", "phantom_size",
                                                 "crop")},
          "model": c["model"], "total_steps": c["total_steps"], "seed": c["seed"], "task": c.get("task"),
          "init_from": c.get("init_from")}


def _check_same_run(run_dir: Path, config) -> None:
  """A finished run must have been trained with the settings asked for now (else the sweep's settings changed)."""
  saved = run_dir / "config.json"
  if (run_dir / "done.json").is_file() and saved.is_file():
    had, want = _fingerprint(fileio.read_json(saved, "run config")), _fingerprint(json.loads(config.to_json()))
    if had != want:
      diff = sorted(k for k in set(had) | set(want) if had.get(k) != want.get(k))
      raise ConfigError("sweep", f"{run_dir} was trained with other {', '.join(diff)} settings than the sweep asks "
                        "for now; use a new --workdir or delete that run")


def _pretrain(config, plan, counts, run_id, workdir: Path, meas: Path, cache: dict) -> dict:
  from m2dino_jax.train import mae
  run_dir = workdir / "runs" / run_id
  c = _pretrain_config(config, plan, counts, run_id, meas)
  _check_same_run(run_dir, c)
  if not (run_dir / "done.json").is_file():
    print(f"[sweep] pretraining {run_id}: " + ", ".join(f"{d}={v}" for d, v in zip(plan.domains, counts) if v),
          file=sys.stderr)
  mae.train_and_evaluate(c, str(run_dir), cache)
  return fileio.read_json(run_dir / "done.json", "run result")["heldout_loss"]


def _finetune(config, domain, task, init_from, run_id, workdir: Path, cache: dict) -> dict:
  from m2dino_jax.train import mae_finetune
  run_dir = workdir / "finetune" / run_id
  c = _finetune_config(config, domain, task, init_from)
  _check_same_run(run_dir, c)
  if not (run_dir / "done.json").is_file():
    print(f"[sweep] fine-tuning {run_id}", file=sys.stderr)
  mae_finetune.train_and_evaluate(c, str(run_dir), cache)
  done = fileio.read_json(run_dir / "done.json", "fine-tune result")
  key = "mean_dice" if task == "segmentation" else "auc"
  return {"metric": key, "value": done[key], **({"dice": done["dice"]} if "dice" in done else {})}


def _metrics(pred: np.ndarray, meas: np.ndarray, domains) -> dict:
  """Pearson r and MAPE, pooled and per domain, of predicted vs measured losses (runs, domains)."""
  ok = np.isfinite(pred) & np.isfinite(meas)  # a target no run informs is predicted inf: left out
  ape = np.where(ok, np.abs(pred - meas) / np.where(ok, meas, 1.0), np.nan)

  def r(a, b):
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    return float(np.corrcoef(a, b)[0, 1]) if a.size >= 2 and np.std(a) > 0 and np.std(b) > 0 else None

  return {"pooled_r": r(pred, meas), "pooled_mape": float(np.nanmean(ape)),
          "per_domain_r": {d: r(pred[:, i], meas[:, i]) for i, d in enumerate(domains)},
          "per_domain_mape": {d: float(np.nanmean(ape[:, i])) for i, d in enumerate(domains)}}


def run_sweep(config, workdir) -> dict:
  """Runs (or resumes) the whole sweep; returns the report (also written to WORKDIR/report.json / .md)."""
  from m2dino_jax.scaling import compare, law, measurements, strategies, study, transfer
  from m2dino_jax.scaling.cli import _e_for, _e_mode
  workdir = Path(workdir)
  plan = Plan(config)
  cache: dict = {}
  s = config.sweep
  fileio.write_text(workdir / "sweep_config.json", config.to_json_best_effort(indent=2))

  # 1. design runs
  meas_path = workdir / "measurements.jsonl"
  design = plan.design(s.seed)
  for run_id, counts in design:
    _pretrain(config, plan, counts, run_id, workdir, meas_path, cache)
  rows = [r for r in measurements.read_measurements(meas_path) if r.run_id in {rid for rid, _ in design}]
  arrays = measurements.to_arrays(rows, plan.domains)

  # 2. fit
  e_mode = _e_for(_e_mode(s.E), plan.domains)
  fits = transfer.fit_scaling(arrays, n_bootstrap=s.bootstrap, seed=s.seed, e_mode=e_mode)
  fits.extra["measurements"] = str(meas_path)
  law.write_fits(workdir / "fits.json", fits)
  for line in fit_warnings(plan.domains, fits.extra):
    print(f"[sweep] warning: {line}", file=sys.stderr)
  fitted = law.Law(*(np.asarray(a, np.float64) for a in fits.law))
  design_pred = np.asarray(law.predict_loss(fitted, arrays.data, xp=np))

  # 3-4. allocate every strategy at every budget, train the allocations
  strat_meas = workdir / "strategy_measurements.jsonl"
  counts, measured, errors, run_of = {}, {}, {}, {}  # run_of[(strategy, B)]: the run that trained it

  def train(name, b, x):
    """Trains an allocation once: a strategy that allocates the same volumes as an earlier one shares its run."""
    same = next((r for (n, bb), r in run_of.items() if bb == b and np.array_equal(counts[n][plan.budgets.index(b)],
                                                                                   x) and n != name), None)
    run_of[(name, b)] = same or f"{name}-{b}"
    loss = _pretrain(config, plan, x, run_of[(name, b)], workdir, strat_meas, cache)
    return [loss[d] for d in plan.domains]

  for name in plan.strategies:
    try:
      raw = strategies.strategy_counts(name, fitted, plan.budgets, plan.available.astype(float), floor=s.floor,
                                       temperature=s.temperature, names=plan.domains)
    except SolverError as e:
      errors[name] = str(e)
      print(f"[sweep] {name}: {e}", file=sys.stderr)
      continue
    counts[name] = np.stack([round_counts(x, plan.available) for x in raw])
    for b, x_raw, x in zip(plan.budgets, raw, counts[name]):
      fileio.write_json(workdir / "allocations" / f"{name}_{b}.json", strategies.allocation_file(
          plan.domains, name, b, x_raw, floor=s.floor, extra={"volumes": {d: int(v) for d, v in zip(plan.domains, x)}}))
    measured[name] = np.array([train(name, b, x) for b, x in zip(plan.budgets, counts[name])])
  if FOCUS not in measured:
    raise SolverError(f"the {FOCUS} allocation failed ({errors.get(FOCUS)}); nothing to compare")

  # 5. fine-tune each strategy's largest-budget run (and a random-init control) on the downstream tasks
  downstream = {}
  top = plan.budgets[-1]
  for domain, task in plan.tasks:
    key = f"{domain}:{task}"
    done = {}  # strategies sharing a pretraining share its fine-tune
    for name in measured:
      run = run_of[(name, top)]
      if run not in done:
        done[run] = _finetune(config, domain, task, str(workdir / "runs" / run), f"{run}-{domain}-{task}", workdir,
                              cache)
    downstream[key] = {name: done[run_of[(name, top)]] for name in measured}
    downstream[key]["random_init"] = _finetune(config, domain, task, "", f"random-{domain}-{task}", workdir, cache)

  # 6. report
  budgets = np.asarray(plan.budgets, float)
  predicted = {n: np.asarray(law.predict_loss(fitted, c.astype(float), xp=np)) for n, c in counts.items()}
  pred_all = np.concatenate([predicted[n] for n in measured])
  meas_all = np.concatenate([measured[n] for n in measured])
  gains = {}
  for base in measured:
    if base != FOCUS:
      g = compare.gains(measured[FOCUS], measured[base], fitted.E)
      gains[base] = compare._jsonable({k: g[k] for k in ("per_domain", "per_domain_mean", "mean", "aggregate",
                                                         "headline_max")})
      gains[base]["headline_domain"] = plan.domains[int(g["headline_domain"])]
  report = {
      "domains": plan.domains, "budgets": plan.budgets, "strategies": list(measured), "errors": errors,
      "available": plan.available.tolist(), "design_runs": len(design), "fit": study.fit_summary(fits),
      "volumes": {n: c.tolist() for n, c in counts.items()},
      "runs": {n: [run_of[(n, b)] for b in plan.budgets] for n in measured},
      "measured": {n: v.tolist() for n, v in measured.items()},
      "predicted": {n: v.tolist() for n, v in predicted.items()},
      "mean_loss": {n: v.mean(axis=1).tolist() for n, v in measured.items()},
      "gains": gains,
      "prediction": {"strategies": _metrics(pred_all, meas_all, plan.domains),
                     "design": _metrics(design_pred, arrays.loss, plan.domains)},
      "downstream": downstream,
  }
  if budgets.size >= compare.MIN_SLOPE_BUDGETS:
    report["slopes"] = {n: compare.log_slopes(budgets, v).tolist() for n, v in measured.items()}
  fileio.write_json(workdir / "report.json", report)
  fileio.write_text(workdir / "report.md", report_markdown(report))
  if s.plots:
    from m2dino_jax.scaling import plots
    plots.plot_all(fits, workdir / "plots", arrays=arrays, budgets=plan.budgets, floor=s.floor)
  return report


def fit_warnings(domains, extra: dict) -> list[str]:
  """One line per domain whose law the design runs do not support (flat, floor dropped, not converged)."""
  out = []
  support = extra.get("self_law_support") or [{}] * len(domains)
  auto = extra.get("E_auto") or [None] * len(domains)
  for d, s, a in zip(domains, support, auto):
    if s.get("sizes") and not s.get("decreasing"):
      out.append(f"{d}: the held-out loss does not fall with data beyond its scatter (drop {100 * s['drop']:.2f}% "
                 f"from {s['sizes'][0]:g} to {s['sizes'][-1]:g} volumes); its law is not informative: train longer "
                 "(pretrain.total_steps) or spread sweep.sizes")
    elif a and a["E"] == "none":
      out.append(f"{d}: floor E held at 0 ({a['reason']})")
  for d in extra.get("domains_not_converged") or []:
    out.append(f"{d}: the fit did not converge")
  return out


def _f(v, pct=False) -> str:
  if v is None or (isinstance(v, float) and not np.isfinite(v)):
    return "-"
  return f"{100 * v:+.1f}%" if pct else f"{v:.4g}"


def report_markdown(r: dict) -> str:
  doms = r["domains"]
  fit = r["fit"]
  out = ["# 3D MAE scaling sweep", "",
         f"{r['design_runs']} design runs; fit converged: {fit.get('converged')}; "
         f"available volumes: " + ", ".join(f"{d}={a}" for d, a in zip(doms, r["available"])), "",
         "## Self laws L = E + A D^-beta (design runs on one domain)", "",
         "| domain | sizes | mean loss per size | drop | log-log slope | E | A | beta | E mode | RMS log residual |",
         "|---" * 10 + "|"]
  support = fit.get("self_law_support") or [{}] * len(doms)
  auto = fit.get("E_auto") or [None] * len(doms)
  for i, d in enumerate(doms):
    s = support[i]
    slope = "-" if s.get("slope") is None else _f(s["slope"]) + ("" if s.get("slope_se") is None else
                                                               f" +- {s['slope_se']:.2g}")
    mode = auto[i]["E"] if auto[i] else ("free" if fit.get("E_mode") == "free" else "fixed")
    out.append(f"| {d} | {' '.join(f'{v:g}' for v in s.get('sizes', []))} | "
               f"{' '.join(_f(v) for v in s.get('mean_loss', []))} | {_f(s.get('drop'), True)} | {slope} | "
               f"{_f(fit['E'][i])} | {_f(fit['A'][i])} | {_f(fit['beta'][i])} | {mode} | "
               f"{_f(s.get('rms_log_residual'))} |")
  warnings = fit_warnings(doms, fit)
  out += [""] + [f"- warning: {w}" for w in warnings] + ([""] if warnings else [])
  for k, b in enumerate(r["budgets"]):
    out += [f"## Held-out reconstruction loss at budget {b} volumes (measured / predicted)", "",
            "| strategy | " + " | ".join(doms) + " | mean | volumes |", "|---" * (len(doms) + 3) + "|"]
    for n in r["strategies"]:
      m, p = r["measured"][n][k], r["predicted"][n][k]
      out.append(f"| {n} | " + " | ".join(f"{_f(a)} / {_f(b_)}" for a, b_ in zip(m, p)) +
                 f" | {_f(float(np.mean(m)))} | {' '.join(str(v) for v in r['volumes'][n][k])} |")
    out.append("")
  out += [f"## Gains of {FOCUS} (1 - L_{FOCUS} / L_base, averaged over budgets)", "",
          "| baseline | " + " | ".join(doms) + " | mean | mean loss (last budget) |", "|---" * (len(doms) + 3) + "|"]
  for base, g in r["gains"].items():
    out.append(f"| {base} | " + " | ".join(_f(v, True) for v in g["per_domain_mean"]) +
               f" | {_f(g['mean'], True)} | {_f(g['aggregate'][-1], True)} |")
  out += ["", "## Predicted vs measured (fitted law)", "", "| runs | pooled r | pooled MAPE | " +
          " | ".join(f"r {d}" for d in doms) + " |", "|---" * (len(doms) + 3) + "|"]
  for name, m in r["prediction"].items():
    out.append(f"| {name} | {_f(m['pooled_r'])} | {_f(m['pooled_mape'])} | " +
               " | ".join(_f(m["per_domain_r"][d]) for d in doms) + " |")
  if r["downstream"]:
    out += ["", "## Downstream fine-tuning (largest budget)", "", "| task | " +
            " | ".join(list(r["strategies"]) + ["random_init"]) + " |", "|---" * (len(r["strategies"]) + 2) + "|"]
    for key, res in r["downstream"].items():
      metric = next(iter(res.values()))["metric"]
      out.append(f"| {key} ({metric}) | " + " | ".join(_f(res[n]["value"]) for n in
                                                         list(r["strategies"]) + ["random_init"]) + " |")
  if r["errors"]:
    out += ["", "## Strategies that failed", ""] + [f"- {n}: {e}" for n, e in r["errors"].items()]
  return "\n".join(out) + "\n"


def cmd_sweep(args) -> int:
  from m2dino_jax import configlib
  config = configlib.load_config(args.config, args.set or [])
  run_sweep(config, args.workdir)
  print((Path(args.workdir) / "report.md").read_text())
  print(f"wrote {Path(args.workdir) / 'report.json'} and report.md")
  return 0


def register(sub, fmt) -> None:
  w = sub.add_parser("sweep", help="3D MAE pretraining grid -> fit -> allocations -> strategies -> report",
                     formatter_class=fmt, description=__doc__.split("\n\n")[0])
  w.add_argument("--config", required=True, help="configs/scaling3d.py[:smoke]")
  w.add_argument("--workdir", required=True, help="folder for runs/, measurements, fits, allocations, report")
  w.add_argument("--set", action="append", metavar="KEY=VALUE",
                 help="config override, e.g. --set sweep.sizes=2,4,8 --set pretrain.total_steps=200 (repeatable)")
  w.set_defaults(func=cmd_sweep)

