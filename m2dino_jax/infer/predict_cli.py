"""`m2dino predict`: run a trained multi-task model on images; write challenge-format predictions."""

from __future__ import annotations


def register(sub) -> None:
  p = sub.add_parser("predict", help="predict one task on images with a trained run")
  p.add_argument("--workdir", required=True, help="training run folder (python -m m2dino_jax.main --workdir)")
  p.add_argument("--task", required=True, help="task id, e.g. fetal_head")
  p.add_argument("--input", required=True, nargs="+", help="image files or folders")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--batch-size", type=int, default=8)
  p.set_defaults(func=run)


def run(args) -> int:
  from m2dino_jax.infer import predict
  results = predict.predict(args.workdir, args.task, args.input, args.out, args.batch_size)
  print(f"predicted {args.task} for {len(results)} images -> {args.out}")
  return 0
