"""`m2dino predict`: run a trained multi-task run; write the FMC_UIA challenge's official prediction files."""

from __future__ import annotations

from m2dino_jax.cli import int_at_least
from m2dino_jax.errors import M2DinoError


def register(sub) -> None:
  p = sub.add_parser(
      "predict", help="predict with a trained run, writing the challenge's official prediction files",
      description="Whole submission: --data-root DIR (with csv_files/) predicts every task of every CSV, as the "
                  "official Model.predict(data_root, out). Quick use: --task T --input FILES_OR_FOLDERS. "
                  "Existing prediction files in --out are merged into, never overwritten.")
  p.add_argument("--workdir", required=True, help="training run folder (python -m m2dino_jax.main --workdir)")
  p.add_argument("--data-root", help="challenge data root holding csv_files/*.csv: predict all its rows")
  p.add_argument("--task", help="one task id, e.g. fetal_head (with --input)")
  p.add_argument("--input", nargs="+", help="image files or folders (with --task)")
  p.add_argument("--out", required=True, help="output folder (official layout)")
  p.add_argument("--batch-size", type=int_at_least(1), default=8, help="images per model call")
  p.add_argument("--score", action="store_true",
                 help="with --data-root: score the output against the CSVs' targets as the official script does")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.set_defaults(func=run)


def run(args) -> int:
  from m2dino_jax.infer import predict
  if args.data_root and (args.task or args.input):
    raise M2DinoError("predict: give either --data-root or --task with --input, not both")
  if args.data_root:
    counts = predict.predict_submission(args.workdir, args.data_root, args.out, args.batch_size,
                                        progress=not args.no_progress)
    print(f"predicted {sum(counts.values())} images of {len(counts)} tasks -> {args.out}")
    if args.score:
      from m2dino_jax.infer import challenge
      from m2dino_jax.tasks import table
      scores = challenge.score(args.data_root, args.out, convention="official")
      print(table.format_table(scores, "official metrics", convention="official"))
    return 0
  if not (args.task and args.input):
    raise M2DinoError("predict: give --data-root, or --task with --input")
  results = predict.predict(args.workdir, args.task, args.input, args.out, args.batch_size)
  print(f"predicted {args.task} for {len(results)} images -> {args.out}")
  return 0
