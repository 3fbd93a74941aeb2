"""`m2dino eval {knn,linear,fewshot,ssl}`: the UltraDINO paper's evaluations of a frozen encoder.

  m2dino eval ssl --encoder runs/ultradino/teacher --baseline random --out eval_ssl.json
  m2dino eval linear --encoder ultradino_vits16.pth --dataset fetal_planes --root /data/FETAL_PLANES_DB
  m2dino eval fewshot --encoder runs/ultradino/teacher --dataset jnu_ifm --root /data/jnu_ifm --shots 20
`--encoder` is our encoder folder (a teacher export), a HF folder, a DINOv2 / UltraDINO .pth, or
'random:VARIANT'; `--baseline random` adds the same evaluation of random weights of the same architecture.
Each command prints a table and writes its JSON (`--out`).
"""

from __future__ import annotations

import time

from m2dino_jax import fileio


def _ints(spec: str) -> tuple[int, ...]:
  return tuple(int(x) for x in str(spec).split(",") if x.strip())


def _common(p, dataset: str) -> None:
  p.add_argument("--encoder", required=True, help="encoder checkpoint (folder / .pth) or random:VARIANT")
  p.add_argument("--dataset", default=dataset, help="synthetic | fetal_planes | jnu_ifm | fass")
  p.add_argument("--root", default="", help="dataset folder as released (real datasets)")
  p.add_argument("--task", default="", help="task id (default: the dataset's)")
  p.add_argument("--image-size", type=int, default=224, help="model image side in pixels")
  p.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
  p.add_argument("--synthetic-count", type=int, default=96, help="simulator images per split")
  p.add_argument("--synthetic-size", type=int, default=256, help="side of the simulator images (dataset synthetic)")
  p.add_argument("--out-blocks", default="", help="blocks feeding the seg head (default 3,5,7,11 at depth 12)")
  p.add_argument("--baseline", choices=("none", "random"), default="none",
                 help="also evaluate random weights of the same architecture")
  p.add_argument("--seed", type=int, default=0, help="random seed (splits, heads, simulator)")
  p.add_argument("--out", default="", help="JSON file (default eval_<command>.json)")


def _cls_args(p) -> None:
  p.add_argument("--k", default="10,20", help="k-NN neighbour counts")


def _seg_args(p) -> None:
  p.add_argument("--shots", type=int, default=20, help="labelled training images per few-shot split")
  p.add_argument("--splits", type=int, default=5, help="random few-shot splits averaged")
  p.add_argument("--steps", type=int, default=500, help="training steps of the segmentation head")
  p.add_argument("--lr", type=float, default=None,
                 help="learning rate of the segmentation head (default: 1e-3 upernet, 1e-1 linear)")
  p.add_argument("--seg-channels", type=int, default=128, help="channels of the segmentation head")
  p.add_argument("--head", choices=("upernet", "linear", "linear+ms"), default="upernet",
                 help="few-shot head: UperNet-lite over out_blocks, or DINOv2's linear protocol on the last block's "
                      "patch tokens ('linear+ms': the last out_blocks maps concatenated)")
  p.add_argument("--seg-dataset", default="", help="ssl: dataset of the few-shot part (default: --dataset)")
  p.add_argument("--seg-root", default="", help="ssl: its folder (default: --root)")


def register(sub) -> None:
  p = sub.add_parser("eval", help="evaluate a frozen encoder as the UltraDINO paper does (k-NN, linear, few-shot)")
  esub = p.add_subparsers(dest="eval", metavar="KIND")
  for name, helptext, dataset, extra in (
      ("knn", "k-NN classification (macro F1)", "synthetic", (_cls_args,)),
      ("linear", "linear probe (macro F1)", "synthetic", ()),
      ("fewshot", "few-shot segmentation (mDice, mfDice)", "synthetic", (_seg_args,)),
      ("ssl", "k-NN + linear + few-shot, as the paper reports them", "synthetic", (_cls_args, _seg_args))):
    e = esub.add_parser(name, help=helptext)
    _common(e, dataset)
    for f in extra:
      f(e)
    e.set_defaults(func=run, kind=name)


def evaluate(args, *, random_init: bool) -> dict:
  from m2dino_jax.evals import frozen, probe, suite
  blocks = _ints(args.out_blocks) or None
  encoder = frozen.load_encoder(args.encoder, in_chans=1, out_blocks=blocks, random_init=random_init,
                                seed=args.seed)
  cfg = suite.data_config(args.dataset, root=args.root, image_size=args.image_size, batch_size=args.batch_size,
                          synthetic_count=args.synthetic_count, synthetic_size=args.synthetic_size)
  out = {}
  t0 = time.perf_counter()
  if args.kind in ("knn", "linear", "ssl"):
    if args.kind == "knn":
      ds = suite.dataset(args.dataset)
      t = suite.task_of(ds, args.task, "classification")
      train = frozen.extract(encoder, cfg, t, ds.train)
      test = frozen.extract(encoder, cfg, t, ds.test)
      out["classification"] = {"task": t.name, "knn": probe.knn_eval(train.pooled, train.labels, test.pooled,
                                                                      test.labels, t.num_classes, _ints(args.k))}
    else:
      out["classification"] = suite.classification(encoder, args.dataset, cfg, task=args.task if args.kind != "ssl"
                                                    else "", ks=_ints(getattr(args, "k", "10,20")), seed=args.seed)
      if args.kind == "linear":
        out["classification"].pop("knn")
  if args.kind in ("fewshot", "ssl"):
    name = getattr(args, "seg_dataset", "") or args.dataset
    seg_cfg = cfg if name == args.dataset else suite.data_config(
        name, root=getattr(args, "seg_root", "") or args.root, image_size=args.image_size, batch_size=args.batch_size,
        synthetic_count=args.synthetic_count, synthetic_size=args.synthetic_size)
    out["segmentation"] = suite.segmentation(
        encoder, name, seg_cfg, task=args.task if args.kind == "fewshot" else "", shots=args.shots,
        splits=args.splits, steps=args.steps, lr=args.lr, seg_channels=args.seg_channels, seed=args.seed,
        head=args.head)
  out["headline"] = suite.headline(out)
  out["seconds"] = time.perf_counter() - t0
  return out


def run(args) -> int:
  results = {"encoder": args.encoder, "dataset": args.dataset, "kind": args.kind,
             "trained": evaluate(args, random_init=False)}
  if args.baseline == "random":
    results["random_init"] = evaluate(args, random_init=True)
  print(f"{args.kind} evaluation of {args.encoder} on {args.dataset} (frozen encoder)")
  for name in ("trained", "random_init"):
    if name in results:
      print(f"  {name:12s} " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in results[name]["headline"].items()))
  out = args.out or f"eval_{args.kind}.json"
  fileio.write_json(out, results)
  print(f"wrote {out}")
  return 0
