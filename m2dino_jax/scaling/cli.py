"""`m2dino scaling simulate|fit|allocate|plot|compare`: the scaling-law study from the command line.

  m2dino scaling simulate [--law law.json|example:six_domain] --out measurements.jsonl   planted-truth rows
  m2dino scaling fit --measurements FILE --out fits.json [--E free|none|fixed:V]   self laws + transfer
  m2dino scaling allocate --fits fits.json --budget B [--floor 0.05] [--strategy S] --out allocation.json
  m2dino scaling plot --fits fits.json [--measurements FILE] --out DIR
  m2dino scaling compare --law example:six_domain --budgets 5e3,...,4e4 --out DIR   strategies on measured loss
  m2dino scaling compare --measurements FILE --out DIR   the same report from real runs' rows ('strategy' rows)
  m2dino scaling sweep --config configs/scaling3d.py:smoke --workdir DIR   3D MAE pretraining grid, end to end
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from m2dino_jax.cli import HelpFormatter, RawHelpFormatter, int_at_least
from m2dino_jax.errors import ConfigError, SolverError


def _named_numbers(text: str, key: str) -> dict[str, float]:
  """'ct=1e6,mri=2e5' -> {'ct': 1e6, 'mri': 2e5}."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, sep, value = part.partition("=")
    try:
      if not sep or not name:
        raise ValueError
      out[name.strip()] = float(value)
    except ValueError:
      raise ConfigError(key, f"expected name=number[,name=number...], got {part!r}") from None
  return out


def _budgets(text: str) -> list[float]:
  try:
    return [float(b) for b in text.split(",") if b.strip()]
  except ValueError:
    raise ConfigError("budgets", f"expected comma-separated numbers, got {text!r}") from None


def _ordered(mapping: dict[str, float], domains, key: str, default: float) -> np.ndarray:
  unknown = sorted(set(mapping) - set(domains))
  if unknown:
    raise ConfigError(key, f"unknown domain(s) {unknown}; domains are {list(domains)}")
  return np.array([mapping.get(d, default) for d in domains], np.float64)


def _e_mode(text: str):
  """--E: 'free', 'none' (E = 0), 'auto', 'fixed:V' / 'fixed:ct=V,...' (unnamed domains fitted) or
  'prior:MU,SD' (free E with a Gaussian prior: powerlaw.EPrior)."""
  if text in ("free", "none", "auto"):
    return text
  if text.startswith("prior:"):
    from m2dino_jax.scaling.powerlaw import EPrior
    parts = text.removeprefix("prior:").split(",")
    try:
      mu, sd = (float(p) for p in parts)
    except ValueError:
      raise ConfigError("E", f"expected prior:MU,SD (two numbers), got {text!r}") from None
    if not (np.isfinite(mu) and mu >= 0 and np.isfinite(sd) and sd > 0):
      raise ConfigError("E", f"prior:MU,SD needs MU >= 0 and SD > 0, got {text!r}")
    return EPrior(mu, sd)
  if text.startswith("fixed:"):
    value = text.removeprefix("fixed:")
    try:
      return float(value)
    except ValueError:
      return _named_numbers(value, "E")
  raise ConfigError("E", f"expected free, none, auto, fixed:V, fixed:name=V,... or prior:MU,SD, got {text!r}")


def _e_for(mode, domains):
  return _ordered(mode, domains, "E", np.nan) if isinstance(mode, dict) else mode


def cmd_simulate(args) -> int:
  from m2dino_jax.scaling import lawfile, measurements, simulate
  if args.law:
    planted = lawfile.read_law(args.law)
    noise = planted.noise if args.noise is None else args.noise
    rows = simulate.law_measurements(planted, seed=args.seed, noise=noise)
  else:
    noise = simulate.PLANTED_NOISE if args.noise is None else args.noise
    rows, _, _ = simulate.planted_measurements(noise=noise, seed=args.seed)
  measurements.write_measurements(args.out, rows)
  print(f"wrote {len(rows)} planted rows (noise {noise}) to {args.out}")
  return 0


def cmd_fit(args) -> int:
  from m2dino_jax.scaling import law, measurements, transfer
  arrays = measurements.to_arrays(measurements.read_measurements(args.measurements))
  if args.available:
    given = _ordered(_named_numbers(args.available, "available"), arrays.domains, "available", np.inf)
    over = arrays.data > given[None, :] * (1 + 1e-9)  # (runs, domains)
    if over.any():
      first = {d: int(np.flatnonzero(over[:, i])[0]) for i, d in enumerate(arrays.domains) if over[:, i].any()}
      detail = "; ".join(f"{d}: run {arrays.run_ids[k]!r} trained on {arrays.data[k, arrays.domains.index(d)]:g} "
                         f"> {given[arrays.domains.index(d)]:g} ({int(over[:, arrays.domains.index(d)].sum())} "
                         "run(s) over)" for d, k in first.items())
      raise ConfigError("available", f"runs in {args.measurements} trained on more data than stated for "
                        f"{sorted(first)}: {detail}")
    arrays = dataclasses.replace(arrays, available=np.where(np.isfinite(given), given, arrays.available))
  fits = transfer.fit_scaling(arrays, n_bootstrap=args.bootstrap, seed=args.seed, delta=args.huber_delta,
                              source=args.source, fit_gamma=args.fit_gamma,
                              e_mode=_e_for(_e_mode(args.E), arrays.domains))
  fits.extra["measurements"] = str(args.measurements)
  law.write_fits(args.out, fits)
  corr = fits.extra.get("e_beta_correlation") or [None] * len(fits.domains)
  auto = fits.extra.get("E_auto") or [None] * len(fits.domains)
  for i, d in enumerate(fits.domains):
    c = "" if corr[i] is None else f" corr(E,beta)={corr[i]:+.2f}"
    a = "" if auto[i] is None else f" [E {auto[i]['E']}: {auto[i]['reason']}]"
    print(f"{d:>12}: E={fits.law.E[i]:.4g} A={fits.law.A[i]:.4g} beta={fits.law.beta[i]:.4g}{c}{a}")
  print("tau[target][source]:\n" + "\n".join(
      f"{d:>12} <- " + " ".join(f"{t:7.3g}" for t in row) for d, row in zip(fits.domains, fits.law.tau)))
  if args.bootstrap:
    print(f"bootstrap: {fits.extra['bootstrap_dropped']} of {args.bootstrap} resamples dropped (not converged)")
  print(f"wrote {args.out}")
  if not fits.extra["converged"]:
    print(f"m2dino scaling fit: error: {not_converged_message(fits.extra)} "
          f"(written to {args.out} with converged: false)", file=sys.stderr)
    return NOT_CONVERGED
  return 0


NOT_CONVERGED = 3  # exit code of `fit` and `compare` when the point fit did not converge (files still written)


def not_converged_message(fit: dict) -> str:
  """One line for a fit that did not converge: which parts, and how many bootstrap resamples were dropped.
  `fit` is Fits.extra or study.fit_summary (both carry these keys)."""
  what = fit.get("domains_not_converged") or "the transfer rows (tau)"
  dropped = "" if not fit.get("n_bootstrap") else (f"; {fit.get('bootstrap_dropped', 0)} of {fit['n_bootstrap']} "
                                                   "bootstrap resamples dropped (not converged)")
  return f"fits did not converge for {what}{dropped}"


def cmd_allocate(args) -> int:
  from m2dino_jax.scaling import allocate, allocation_io, law, strategies
  fits = law.read_fits(args.fits)
  if args.available:
    given = _ordered(_named_numbers(args.available, "available"), fits.domains, "available", np.inf)
    fits = fits._replace(available=np.where(np.isfinite(given), given, fits.available))
  if args.strategy != "transfer_aware":
    counts = strategies.strategy_counts(args.strategy, fits.law, [args.budget], fits.available, floor=args.floor,
                                        temperature=args.temperature, names=fits.domains)[0]
    record = strategies.allocation_file(fits.domains, args.strategy, args.budget, counts, floor=args.floor,
                                        extra={"fits": str(args.fits), "temperature": args.temperature})
    allocation_io.write_allocation(args.out, record)
    print(json.dumps({"weights": record["weights"]}))
    print(f"wrote {args.out}")
    return 0
  importance = (_ordered(_named_numbers(args.weights, "weights"), fits.domains, "weights", 1.0)
                if args.weights else None)
  result = allocate.allocate(fits.law, [args.budget], fits.available, floor=args.floor, weights=importance,
                             relative=args.relative, tol=args.tol, names=fits.domains)
  if not result["converged"][0]:
    raise SolverError(f"allocation did not reach the projected-gradient tolerance {args.tol} "
                      f"(reached {result['pg_norm'][0]:.3g})")
  record = allocation_io.allocation_record(fits.domains, result, 0, args.floor,
                                           {"strategy": "transfer_aware", "fits": str(args.fits),
                                            "relative": bool(args.relative)})
  allocation_io.write_allocation(args.out, record)
  print(json.dumps({"weights": record["weights"], "objective": record["objective"],
                    "proportional_objective": record["proportional"]["objective"]}))
  print(f"wrote {args.out}")
  return 0


def cmd_plot(args) -> int:
  from m2dino_jax.scaling import law, measurements, plots
  fits = law.read_fits(args.fits)
  arrays = None
  if args.measurements:
    arrays = measurements.to_arrays(measurements.read_measurements(args.measurements), fits.domains)
  budgets = _budgets(args.budgets) if args.budgets else None
  written = plots.plot_all(fits, args.out, arrays=arrays, budgets=budgets, floor=args.floor)
  for path in written:
    print(f"wrote {path}")
  return 0


def _compare_measurements(args):
  """compare --measurements: the report from real (or written) rows; see study.compare_from_rows."""
  from m2dino_jax.scaling import measurements, study
  planted_only = [o for o, v in (("--b-max", args.b_max), ("--no-transfer", args.no_transfer),
                                 ("--noise", args.noise is not None), ("--write-rows", args.write_rows)) if v]
  if planted_only:
    raise ConfigError("measurements", f"{planted_only} need a planted truth (--law), not measured rows")
  rows = measurements.read_measurements(args.measurements)
  e_mode = _e_for(_e_mode(args.E), list(rows[0].data))
  report = study.compare_from_rows(rows, path=args.measurements, n_bootstrap=args.bootstrap, seed=args.seed,
                                   e_mode=e_mode)
  return report, {}, None


def cmd_compare(args) -> int:
  from m2dino_jax import fileio
  from m2dino_jax.scaling import compare_report, lawfile, measurements, strategies, study
  out = Path(args.out)
  if args.measurements:
    report, counts, ex = _compare_measurements(args)
    budgets = report["budgets"]
  else:
    planted = lawfile.read_law(args.law)
    if args.no_transfer:
      planted = lawfile.without_transfer(planted)
    if args.noise is not None:
      planted = dataclasses.replace(planted, noise=args.noise)
    budgets = _budgets(args.budgets)
    floors = [f / 100 for f in _budgets(args.floors)] if args.floors else []
    e_mode = _e_for(_e_mode(args.E), planted.domains)
    rows = [] if args.write_rows else None
    report, counts = study.run_compare(planted, budgets, seed=args.seed, n_bootstrap=args.bootstrap,
                                       e_mode=e_mode, temperature=args.temperature, floors=floors, rows_out=rows)
    ex = None
    if args.b_max:
      ex = study.run_extrapolation(planted, args.b_max, seed=args.seed, n_bootstrap=args.bootstrap)
    for name, c in counts.items():
      for b, x in zip(budgets, c):
        fileio.write_json(out / "allocations" / f"{name}_{b:.0f}.json",
                          strategies.allocation_file(planted.domains, name, b, x, floor=planted.floor))
    if rows is not None:
      measurements.write_measurements(args.write_rows, rows)
      print(f"wrote {len(rows)} rows ({len(rows) - report['rows']} strategy runs) to {args.write_rows}")
  fileio.write_json(out / "report.json", {"compare": report, "extrapolation": ex})
  written = compare_report.write_all(report, out, ex)
  g = report["vs"].get("data_proportional")
  if g:
    agg = np.asarray(g["aggregate"])
    print(f"transfer_aware vs data_proportional: mean-loss gain {agg.min():.1%} to {agg.max():.1%}; "
          f"headline {g['headline_max']:.1%} ({g['headline_domain']})")
  t = report["transfer"]
  print("no hub/island: transfer ~0 (max fitted tau {:.3g})".format(t["max_tau"]) if t["negligible"] else
        f"hub {t['hub']}, island {t['island']}")
  for path in written:
    print(f"wrote {path}")
  print(f"wrote {out / 'report.json'} and {len(counts) * len(budgets)} allocation files")
  if not report["fit"]["converged"]:
    print(f"m2dino scaling compare: error: {not_converged_message(report['fit'])}; every allocation above "
          f"comes from that fit (report written to {out} with converged: false)", file=sys.stderr)
    return NOT_CONVERGED
  return 0


def register(subparsers) -> None:
  p = subparsers.add_parser("scaling", help="transfer-aware scaling laws: fit, allocate, plot, compare, sweep",
                            description=__doc__, formatter_class=RawHelpFormatter)
  sub = p.add_subparsers(dest="scaling_command", metavar="ACTION", required=True)
  fmt = HelpFormatter
  law_help = "law file (law.json) or example:six_domain; see m2dino_jax/scaling/lawfile.py"
  e_help = ("the floor E of each self law: free (fitted), none (E = 0, the paper's pure power law), auto "
            "(free where a domain's points identify it, else 0), fixed:V or fixed:name=V,..., or prior:MU,SD "
            "(free, plus the penalty (delta^2/2) ((E-MU)/SD)^2 on the Huber objective; see scaling/powerlaw.py)")

  s = sub.add_parser("simulate", help="write planted-truth measurements", formatter_class=fmt)
  s.add_argument("--out", required=True, help="measurements.jsonl to write")
  s.add_argument("--law", default="", help=law_help + " (default: the built-in 3-domain law)")
  s.add_argument("--noise", type=float, default=None,
                 help="relative loss noise (default: the law file's, or 0.0015 for the built-in law)")
  s.add_argument("--seed", type=int, default=0, help="random seed of the noise and mixtures")
  s.set_defaults(func=cmd_simulate)

  f = sub.add_parser("fit", help="fit self laws and transfer from measurements", formatter_class=fmt)
  f.add_argument("--measurements", required=True, help="measurements.jsonl")
  f.add_argument("--out", required=True, help="fits.json to write")
  f.add_argument("--bootstrap", type=int_at_least(0), default=200, help="bootstrap resamples for intervals")
  f.add_argument("--seed", type=int, default=0, help="random seed of the bootstrap")
  f.add_argument("--huber-delta", type=float, default=0.05, help="Huber scale on log residuals")
  f.add_argument("--source", default="all", choices=("all", "single", "mixture"),
                 help="runs that estimate transfer")
  f.add_argument("--fit-gamma", action="store_true", help="also fit exponents gamma_ij on source data")
  f.add_argument("--available", default="", help="data available per domain, e.g. ct=1e6,mri=4e5")
  f.add_argument("--E", default="free", help=e_help)
  f.set_defaults(func=cmd_fit)

  a = sub.add_parser("allocate", help="choose the data mixture for a budget", formatter_class=fmt)
  a.add_argument("--fits", required=True, help="fits.json from `scaling fit`")
  a.add_argument("--budget", type=float, required=True, help="total examples")
  a.add_argument("--floor", type=float, default=0.05, help="minimum fraction of the budget per domain")
  a.add_argument("--weights", default="", help="importance per domain, e.g. ct=1,pet=2 (default equal)")
  a.add_argument("--relative", action="store_true",
                 help="weigh losses relative to the data-proportional mixture's")
  a.add_argument("--available", default="",
                 help="data available per domain, e.g. ct=1e6,mri=4e5 (overrides the fits file's)")
  a.add_argument("--strategy", default="transfer_aware", choices=strategies_names(),
                 help="allocation strategy (see m2dino_jax/scaling/strategies.py)")
  a.add_argument("--temperature", type=float, default=3.0, help="T of the temperature strategy")
  a.add_argument("--tol", type=float, default=1e-9, help="projected-gradient norm tolerance")
  a.add_argument("--out", default="allocation.json", help="allocation.json to write")
  a.set_defaults(func=cmd_allocate)

  g = sub.add_parser("plot", help="fits, transfer, allocations, predicted vs measured", formatter_class=fmt)
  g.add_argument("--fits", required=True, help="fits.json from `scaling fit`")
  g.add_argument("--measurements", default="", help="adds data points and predicted-vs-measured")
  g.add_argument("--budgets", default="", help="budgets for the allocation bars (default: 4 log-spaced)")
  g.add_argument("--floor", type=float, default=0.05, help="minimum fraction of the budget per domain")
  g.add_argument("--out", required=True, help="folder for the PNGs")
  g.set_defaults(func=cmd_plot)

  c = sub.add_parser("compare", help="strategies on measured loss: gains, slopes, floor sweep, extrapolation",
                     formatter_class=fmt)
  truth = c.add_mutually_exclusive_group(required=True)
  truth.add_argument("--law", help=law_help + ": strategies allocated from a fit and 'trained' by this truth")
  truth.add_argument("--measurements",
                     help="measurements.jsonl of real runs: rows with 'strategy' are the runs compared (grouped by "
                          "strategy and budget), the others fit the law (see scaling/measurements.py); budgets come "
                          "from the rows, no floor sweep")
  c.add_argument("--write-rows", default="",
                 help="with --law: also write the study's rows (design runs + one row per strategy and budget) as "
                      "measurements.jsonl, which --measurements reads back")
  c.add_argument("--budgets", default="5e3,7.5e3,1e4,1.5e4,2e4,2.5e4,3e4,4e4",
                 help="total budgets to compare at (>= 4 for slopes)")
  c.add_argument("--floors", default="2.5,5,7.5,10,12.5", help="floor sweep, percent of the budget ('' = none)")
  c.add_argument("--temperature", type=float, default=3.0, help="T of the temperature strategy")
  c.add_argument("--b-max", type=float, default=0.0,
                 help="extrapolation: fit on runs up to this budget, predict at 2-10x (0 = skip)")
  c.add_argument("--E", default="free", help=e_help)
  c.add_argument("--bootstrap", type=int_at_least(0), default=64, help="bootstrap resamples of the fits")
  c.add_argument("--noise", type=float, default=None, help="relative loss noise (default: the law file's)")
  c.add_argument("--no-transfer", action="store_true", help="remove all transfer from the truth (a control)")
  c.add_argument("--seed", type=int, default=0, help="random seed of simulation and measurement")
  c.add_argument("--out", required=True, help="folder for report.md, report.json, PNGs and allocations/")
  c.set_defaults(func=cmd_compare)

  from m2dino_jax.scaling import sweep
  sweep.register(sub, fmt)


def strategies_names():
  from m2dino_jax.scaling.strategies import STRATEGIES
  return STRATEGIES
