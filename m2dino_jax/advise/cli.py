"""`m2dino advise probe|fit`: measure task-to-task transfer, then recommend groups and sampling weights.

  m2dino advise probe --config configs/m2dino.py:smoke,tasks=a+b+c --out probe.json [--config.advise.budget=N ...]
  m2dino advise fit --probe probe.json --out advice.json [--max-groups K] [--seed S] [--plot transfer.png]
  python -m m2dino_jax.main --config=configs/m2dino.py:paradigm=advised,advice=advice.json --workdir=runs/adv
"""

from __future__ import annotations

from pathlib import Path

from m2dino_jax import fileio
from m2dino_jax.cli import RawHelpFormatter


def _probe(args) -> int:
  from m2dino_jax import configlib
  from m2dino_jax.advise import probe
  config = configlib.load_config(args.config, list(getattr(args, "overrides", [])))
  record = probe.run_probe(config, Path(args.out))
  b = record["budget"]
  print(f"probe: {len(record['tasks'])} tasks, {record['repeats']} repeat(s), {b['calls_used']} of "
        f"{b['calls_allowed']} calls, {b['seconds']:.1f} s -> {args.out}")
  return 0


def _fit(args) -> int:
  from m2dino_jax.advise import fit
  probe = fileio.read_json(Path(args.probe), "probe file")
  advice = fit.advise(probe, max_groups=args.max_groups or len(probe["tasks"]), seed=args.seed,
                      floor_share=args.floor_share, default_beta=args.beta, min_beta=args.min_beta)
  fileio.write_json(Path(args.out), advice)
  if args.plot:
    from m2dino_jax.advise import plot
    heatmap = plot.transfer_heatmap(advice, Path(args.plot))
    graph = plot.transfer_graph(advice, heatmap.with_name(heatmap.stem + "_graph.png"))
    print(f"plots: {heatmap}, {graph}")
  g = advice["grouping"]
  print(f"groups ({g['method']}, score {g['score']:.4g}, upper bound {g['upper_bound']:.4g}):")
  for name, members in advice["groups"].items():
    print(f"  {name}: " + ", ".join(f"{t} ({advice['weights'][t]:.3f})" for t in members))
  return 0


def register(subparsers) -> None:
  from m2dino_jax.advise import fit
  p = subparsers.add_parser("advise", help="transfer-aware task grouping and sampling weights",
                            description=__doc__, formatter_class=RawHelpFormatter)
  sub = p.add_subparsers(dest="advise_command", metavar="STEP", required=True)
  pr = sub.add_parser("probe", help="lookahead affinities (and data-scaling points) -> probe.json")
  pr.add_argument("--config", required=True, help="configs/m2dino.py[:args]; --config.KEY=V overrides follow")
  pr.add_argument("--out", required=True, help="output folder (probe.json, lookahead and scaling points)")
  pr.set_defaults(func=_probe)
  f = sub.add_parser("fit", help="probe.json -> advice.json (groups, weights, transfer matrix)")
  f.add_argument("--probe", required=True, help="probe.json written by 'm2dino advise probe'")
  f.add_argument("--out", required=True, help="advice.json to write (groups, sampling weights, transfer matrix)")
  f.add_argument("--max-groups", type=int, default=0, help="group (model) budget; 0 = one per task at most")
  f.add_argument("--seed", type=int, default=0, help="random seed of the grouping search")
  f.add_argument("--floor-share", type=float, default=fit.FLOOR_SHARE,
                 help="least sampling weight per task, as a fraction of its uniform share 1/n in its group")
  f.add_argument("--beta", type=float, default=fit.DEFAULT_BETA,
                 help="default self-law exponent where no scaling points fit (such tasks keep a uniform share)")
  f.add_argument("--min-beta", type=float, default=fit.MIN_BETA,
                 help="fitted laws flatter than this count as uninformed (uniform share) in the weights")
  f.add_argument("--plot", default="",
                 help="write the transfer heatmap (PNG) here, and its directed graph next to it (NAME_graph.png)")
  f.set_defaults(func=_fit)
