"""`m2dino scaling fit|allocate|plot|simulate`: the scaling-law study from the command line.

  m2dino scaling simulate --out measurements.jsonl            planted-truth rows (no pretraining needed)
  m2dino scaling fit --measurements FILE --out fits.json      self laws + transfer, bootstrap intervals
  m2dino scaling allocate --fits fits.json --budget B [--floor 0.05] --out allocation.json
  m2dino scaling plot --fits fits.json [--measurements FILE] --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

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


def cmd_simulate(args) -> int:
  from m2dino_jax.scaling import measurements, simulate
  rows, _, _ = simulate.planted_measurements(noise=args.noise, seed=args.seed)
  measurements.write_measurements(args.out, rows)
  print(f"wrote {len(rows)} planted rows (noise {args.noise}) to {args.out}")
  return 0


def cmd_fit(args) -> int:
  from m2dino_jax.scaling import law, measurements, transfer
  arrays = measurements.to_arrays(measurements.read_measurements(args.measurements))
  if args.available:
    given = _ordered(_named_numbers(args.available, "available"), arrays.domains, "available", np.inf)
    arrays = dataclasses.replace(arrays, available=np.where(np.isfinite(given), given, arrays.available))
  fits = transfer.fit_scaling(arrays, n_bootstrap=args.bootstrap, seed=args.seed, delta=args.huber_delta,
                              source=args.source, fit_gamma=args.fit_gamma)
  fits.extra["measurements"] = str(args.measurements)
  law.write_fits(args.out, fits)
  for i, d in enumerate(fits.domains):
    print(f"{d:>12}: E={fits.law.E[i]:.4g} A={fits.law.A[i]:.4g} beta={fits.law.beta[i]:.4g}")
  print(f"wrote {args.out}" + ("" if fits.extra["converged"] else " (WARNING: some fits did not converge)"))
  return 0


def cmd_allocate(args) -> int:
  from m2dino_jax.scaling import allocate, allocation_io, law
  fits = law.read_fits(args.fits)
  importance = (_ordered(_named_numbers(args.weights, "weights"), fits.domains, "weights", 1.0)
                if args.weights else None)
  result = allocate.allocate(fits.law, [args.budget], fits.available, floor=args.floor, weights=importance,
                             relative=args.relative, tol=args.tol, names=fits.domains)
  if not result["converged"][0]:
    raise SolverError(f"allocation did not reach the projected-gradient tolerance {args.tol} "
                      f"(reached {result['pg_norm'][0]:.3g})")
  record = allocation_io.allocation_record(fits.domains, result, 0, args.floor,
                                           {"fits": str(args.fits), "relative": bool(args.relative)})
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


def register(subparsers) -> None:
  p = subparsers.add_parser("scaling", help="transfer-aware scaling laws: fit, allocate, plot",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="scaling_command", metavar="ACTION", required=True)
  fmt = argparse.ArgumentDefaultsHelpFormatter

  s = sub.add_parser("simulate", help="write planted-truth measurements", formatter_class=fmt)
  s.add_argument("--out", required=True)
  s.add_argument("--noise", type=float, default=0.0015, help="relative loss noise")
  s.add_argument("--seed", type=int, default=0)
  s.set_defaults(func=cmd_simulate)

  f = sub.add_parser("fit", help="fit self laws and transfer from measurements", formatter_class=fmt)
  f.add_argument("--measurements", required=True, help="measurements.jsonl")
  f.add_argument("--out", required=True, help="fits.json to write")
  f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for intervals")
  f.add_argument("--seed", type=int, default=0)
  f.add_argument("--huber-delta", type=float, default=0.05, help="Huber scale on log residuals")
  f.add_argument("--source", default="all", choices=("all", "single", "mixture"),
                 help="runs that estimate transfer")
  f.add_argument("--fit-gamma", action="store_true", help="also fit exponents gamma_ij on source data")
  f.add_argument("--available", default="", help="data available per domain, e.g. ct=1e6,mri=4e5")
  f.set_defaults(func=cmd_fit)

  a = sub.add_parser("allocate", help="choose the data mixture for a budget", formatter_class=fmt)
  a.add_argument("--fits", required=True)
  a.add_argument("--budget", type=float, required=True, help="total examples")
  a.add_argument("--floor", type=float, default=0.05, help="minimum fraction of the budget per domain")
  a.add_argument("--weights", default="", help="importance per domain, e.g. ct=1,pet=2 (default equal)")
  a.add_argument("--relative", action="store_true",
                 help="weigh losses relative to the data-proportional mixture's")
  a.add_argument("--tol", type=float, default=1e-9, help="projected-gradient norm tolerance")
  a.add_argument("--out", default="allocation.json")
  a.set_defaults(func=cmd_allocate)

  g = sub.add_parser("plot", help="fits, transfer, allocations, predicted vs measured", formatter_class=fmt)
  g.add_argument("--fits", required=True)
  g.add_argument("--measurements", default="", help="adds data points and predicted-vs-measured")
  g.add_argument("--budgets", default="", help="budgets for the allocation bars (default: 4 log-spaced)")
  g.add_argument("--floor", type=float, default=0.05)
  g.add_argument("--out", required=True, help="folder for the PNGs")
  g.set_defaults(func=cmd_plot)
