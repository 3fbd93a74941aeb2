"""The comparison's pictures and markdown report (reads the report dicts of study.py; computes nothing new).

  strategies.png     measured mean loss against total budget, one line per strategy (log-log)
  gains.png          per-domain measured gain of transfer-aware over data-proportional against budget
  slopes.png         Fig. 4 analogue: per-domain slope -dlog L/dlog B, bars per strategy
  floor_sweep.png    Fig. 5 analogue: transfer-aware shares (middle budget) and measured mean loss per floor
  extrapolation.png  predicted vs measured held-out loss: fitted range (circles) vs extrapolated (triangles),
                     and MAPE against budget / B_max
  report.md          the numbers behind them
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from m2dino_jax import fileio  # noqa: E402
from m2dino_jax.scaling.plots import _save  # noqa: E402


def plot_strategies(report, path) -> Path:
  fig, ax = plt.subplots(figsize=(5.4, 4))
  for s, v in report["mean_loss"].items():
    ax.plot(report["budgets"], v, "o-", ms=3, label=s)
  ax.set_xscale("log"), ax.set_yscale("log")
  ax.set_xlabel("total budget B (examples)"), ax.set_ylabel("measured mean held-out loss")
  ax.set_title("strategies on measured loss"), ax.legend(fontsize=7)
  return _save(fig, path)


def plot_gains(report, path, baseline="data_proportional") -> Path:
  g = report["vs"][baseline]
  per = np.asarray(g["per_domain"])
  fig, ax = plt.subplots(figsize=(5.6, 4))
  for i, d in enumerate(report["domains"]):
    ax.plot(report["budgets"], 100 * per[:, i], "o-", ms=3, label=d)
  ax.plot(report["budgets"], 100 * np.asarray(g["aggregate"]), "k--", lw=2, label="mean loss")
  ax.axhline(0, color="grey", lw=0.8)
  ax.set_xscale("log"), ax.set_xlabel("total budget B (examples)")
  ax.set_ylabel(f"gain over {baseline} (%)"), ax.set_title(f"{report['focus']} vs {baseline}, measured")
  ax.legend(fontsize=7)
  return _save(fig, path)


def plot_slopes(report, path) -> Path:
  slopes = report["slopes"]
  n, k = len(report["domains"]), len(slopes)
  fig, ax = plt.subplots(figsize=(1.2 + 1.1 * n, 4))
  width = 0.8 / k
  for j, (s, v) in enumerate(slopes.items()):
    ax.bar(np.arange(n) + (j - (k - 1) / 2) * width, v, width, label=s)
  ax.set_xticks(range(n), report["domains"], rotation=30)
  ax.set_ylabel("slope -d log L / d log B"), ax.set_title("per-domain loss-vs-budget slopes (Fig. 4 analogue)")
  ax.legend(fontsize=7)
  return _save(fig, path)


def plot_floor_sweep(sweep, domains, path) -> Path:
  floors = np.asarray(sweep["floors"])
  shares = np.asarray(sweep["shares"])  # (floors, budgets, domains)
  mid = shares[:, shares.shape[1] // 2]
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
  bottom = np.zeros(len(floors))
  for i, d in enumerate(domains):
    a.bar(100 * floors, mid[:, i], 1.8, bottom=bottom, label=d)
    bottom += mid[:, i]
  a.set_xlabel("floor (% of budget)"), a.set_ylabel("share of budget (middle budget)")
  a.set_title("transfer-aware shares by floor"), a.legend(fontsize=7)
  b.plot(100 * floors, sweep["mean_loss"], "o-")
  b.set_xlabel("floor (% of budget)"), b.set_ylabel("measured mean loss (all budgets)")
  b.set_title(f"measured optimum: {100 * sweep['best_floor']:.1f}%")
  return _save(fig, path)


def plot_extrapolation(ex, path) -> Path:
  mode = ex["chosen"]
  entry = ex["laws"][mode]
  factor = np.repeat(ex["factors"], ex["runs_per_factor"])
  pred, meas = np.asarray(entry["predicted"]), np.asarray(ex["measured"])
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  for mask, marker, label in ((factor <= 1, "o", "fitted range"), (factor > 1, "^", "extrapolated")):
    a.plot(meas[mask].ravel(), pred[mask].ravel(), marker, ms=4, alpha=0.7, label=label)
  ends = [np.nanmin(meas), np.nanmax(meas)]
  a.plot(ends, ends, "k--", lw=1)
  a.set_xscale("log"), a.set_yscale("log"), a.legend(fontsize=7)
  a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor log labels overlap
  a.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  a.set_xlabel("measured held-out loss"), a.set_ylabel("predicted loss")
  a.set_title(f"law E={mode}: held-out r = {entry['held_out']['pooled_r']:.4f}")
  for m, e in ex["laws"].items():
    b.plot(ex["factors"], 100 * np.asarray(e["mape_by_factor"]), "o-", label=f"E {m}")
  b.axvline(1.0, color="grey", lw=0.8)
  b.set_xscale("log"), b.set_xlabel("budget / B_max"), b.set_ylabel("MAPE (%)"), b.legend(fontsize=7)
  b.set_title("prediction error in and out of the fitted range")
  return _save(fig, path)


def _pct(v) -> str:
  return f"{100 * v:.1f}%"


def hub_island_line(t) -> str:
  if t.get("negligible"):
    return (f"No hub/island: transfer ~0 (every fitted |tau| < {t['negligible_below']:g}; largest "
            f"{t['max_tau']:.3g}), so the names would only pick out noise.")
  return f"Hub (fitted tau): **{t['hub']}**; island: **{t['island']}**."


def _multipliers(report) -> list[str]:
  """Per-budget multiplier over the baseline, flagging those whose matching budget lies beyond the tested ones."""
  g = report["vs"].get(report["baseline"])
  if not g:
    return []
  budgets = report["budgets"]
  inside = g["multiplier_in_range"]
  cells = [f"{b:.3g} {m:.2f}x{'' if ok else '†'}" for b, m, ok in zip(budgets, g["budget_multiplier"], inside)]
  line = f"Budget multiplier over {report['baseline']} per budget: " + ", ".join(cells) + "."
  if not all(inside):
    line += (f" † extrapolated: {report['baseline']} would need a budget outside the tested "
             f"{min(budgets):.3g}-{max(budgets):.3g}, read off its power-law fit of mean loss against budget.")
  return ["", line]


def _convergence_warning(fit) -> list[str]:
  """The report's first words when the fit behind it did not converge (the CLI then exits 3)."""
  if fit["converged"]:
    return []
  from m2dino_jax.scaling.cli import not_converged_message
  return [f"**WARNING: {not_converged_message(fit)}.** Every allocation and prediction below comes from this "
          "fit; treat the numbers as unreliable.", ""]


def _setting(report) -> str:
  budgets = ", ".join(f"{b:.3g}" for b in report["budgets"])
  if report.get("source") == "measurements":
    return (f"Budgets {budgets}; measured runs: {report['strategy_runs']} rows with a 'strategy' (repeats "
            f"averaged); law fitted on the {report['rows']} rows without one. No floor sweep (it needs runs per "
            "floor).")
  return (f"Budgets {budgets}; floor {report['floor']}; noise {report['noise']}; temperature T = "
          f"{report['temperature']}; {report['rows']} simulated rows fitted.")


def markdown(report, ex=None) -> str:
  d = report["domains"]
  lines = [f"# Scaling study: strategies on measured loss ({report['law']})", "", *_convergence_warning(report["fit"]),
           _setting(report),
           hub_island_line(report["transfer"]), "",
           f"## {report['focus']} against each strategy", "",
           "| vs | mean-loss gain (range over budgets) | headline: max per-domain gain | mean per-domain gain | "
           "reducible mean-loss gain | budget multiplier | wins at every budget |",
           "|---|---|---|---|---|---|---|"]
  for s, g in report["vs"].items():
    agg, red, mult = (np.asarray(g[k]) for k in ("aggregate", "reducible_aggregate", "budget_multiplier"))
    out = int(np.size(mult) - np.sum(g["multiplier_in_range"]))
    flag = f" ({out} of {np.size(mult)} extrapolated†)" if out else ""
    lines.append(f"| {s} | {_pct(agg.min())} to {_pct(agg.max())} | {_pct(g['headline_max'])} "
                 f"({g['headline_domain']}) | {_pct(g['mean'])} | {_pct(red.min())} to {_pct(red.max())} | "
                 f"{mult.min():.2f}x to {mult.max():.2f}x{flag} | {g['beats_at_every_budget']} |")
  if any(not all(g["multiplier_in_range"]) for g in report["vs"].values()):
    lines += ["", "† budget multipliers whose matching budget lies outside the tested budgets: extrapolated "
              "along the other strategy's power-law fit of mean loss, not measured."]
  lines += _multipliers(report)
  base = report["vs"].get(report["baseline"])
  if base:
    lines += ["", f"Per-domain gain over {report['baseline']} (mean over budgets): " +
              ", ".join(f"{n} {_pct(v)}" for n, v in zip(d, base["per_domain_mean"]))]
  if "slopes" in report:
    lines += ["", "## Slopes -d log L / d log B (Fig. 4 analogue)", "", "| strategy | " + " | ".join(d) + " |",
              "|---|" + "---|" * len(d)]
    lines += [f"| {s} | " + " | ".join(f"{x:.3f}" for x in v) + " |" for s, v in report["slopes"].items()]
  p = report["prediction"]
  lines += ["", f"Predicted (fitted law) vs measured loss of all allocations: pooled r = {p['pooled_r']:.4f}; "
            "per domain " + ", ".join(f"{n} {r:.3f}" for n, r in zip(d, p["per_domain_r"])) + "."]
  if "floor_sweep" in report:
    sw = report["floor_sweep"]
    lines += ["", "## Floor sweep (Fig. 5 analogue)", "", "| floor | measured mean loss |", "|---|---|"]
    lines += [f"| {_pct(f)} | {m:.4f} |" for f, m in zip(sw["floors"], sw["mean_loss"])]
    lines += ["", f"Measured optimum: {_pct(sw['best_floor'])}."]
  fit = report["fit"]
  lines += ["", "## Fit", "", "| domain | beta | true beta | E | E-beta corr. (bootstrap) |", "|---|---|---|---|---|"]
  corr = fit.get("e_beta_correlation") or [None] * len(d)
  for i, n in enumerate(d):
    true = f"{fit['true_beta'][i]:.3f}" if "true_beta" in fit else "-"  # known only for a planted truth
    c = "-" if corr[i] is None else f"{corr[i]:.2f}"
    lines.append(f"| {n} | {fit['beta'][i]:.3f} | {true} | {fit['E'][i]:.4g} | {c} |")
  lines.append(f"\nConverged: {fit['converged']}; bootstrap resamples dropped: {fit['bootstrap_dropped']}.")
  if ex:
    lines += _extrapolation(ex, d)
  return "\n".join(lines) + "\n"


SPREAD_NOTE = ("Ranges in brackets and the spread columns are the 2.5-97.5 percentiles of each metric over the "
               "bootstrap refits: the "
               "spread of resampled laws, not a confidence interval centred on the point fit (the point value "
               "may lie near or outside an edge).")


def _extrapolation(ex, d) -> list[str]:
  lines = ["", f"## Extrapolation (fit on budgets <= {ex['b_max']:.3g})", "",
           "| law | in-range MAPE | extrapolated MAPE (spread of resampled laws) | extrapolated r (spread) | "
           "MAPE by budget/B_max | fit converged |", "|---|---|---|---|---|---|"]
  for m, e in ex["laws"].items():
    ci = e.get("held_out_ci", {})
    mape_ci = " ({} to {})".format(*map(_pct, ci["pooled_mape"])) if ci else ""
    r_ci = " ({:.4f} to {:.4f})".format(*ci["pooled_r"]) if ci else ""
    by = ", ".join(f"{f:g}x {_pct(v)}" for f, v in zip(ex["factors"], e["mape_by_factor"]))
    fit = e["fit"]
    conv = "yes" if fit["converged"] else f"**no** ({fit.get('domains_not_converged') or 'tau'})"
    if fit.get("n_bootstrap"):
      conv += f"; {fit.get('bootstrap_dropped', 0)} of {fit['n_bootstrap']} resamples dropped"
    lines.append(f"| E {m} | {_pct(e['in_range']['pooled_mape'])} | {_pct(e['held_out']['pooled_mape'])}"
                 f"{mape_ci} | {e['held_out']['pooled_r']:.4f}{r_ci} | {by} | {conv} |")
  chosen = ex["laws"][ex["chosen"]]
  held, ci = chosen["held_out"], chosen.get("held_out_ci")
  lines += ["", f"Chosen by extrapolated MAPE: E {ex['chosen']}. Per domain, extrapolated runs:", "",
            "| domain | r | r spread | MAPE | MAPE spread |", "|---|---|---|---|---|"]
  for i, n in enumerate(d):
    r_s = f"{ci['per_domain_r'][0][i]:.3f} to {ci['per_domain_r'][1][i]:.3f}" if ci else "-"
    m_s = f"{_pct(ci['per_domain_mape'][0][i])} to {_pct(ci['per_domain_mape'][1][i])}" if ci else "-"
    lines.append(f"| {n} | {held['per_domain_r'][i]:.3f} | {r_s} | {_pct(held['per_domain_mape'][i])} | {m_s} |")
  if any("held_out_ci" in e for e in ex["laws"].values()):
    lines += ["", SPREAD_NOTE]
  return lines


def write_all(report, out_dir, ex=None) -> list[Path]:
  out = Path(out_dir)
  written = [plot_strategies(report, out / "strategies.png")]
  if report["baseline"] in report["vs"]:
    written.append(plot_gains(report, out / "gains.png", report["baseline"]))
  if "slopes" in report:
    written.append(plot_slopes(report, out / "slopes.png"))
  if "floor_sweep" in report:
    written.append(plot_floor_sweep(report["floor_sweep"], report["domains"], out / "floor_sweep.png"))
  if ex:
    written.append(plot_extrapolation(ex, out / "extrapolation.png"))
  written.append(fileio.write_text(out / "report.md", markdown(report, ex)))
  return written
