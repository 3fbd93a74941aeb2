"""Build an ArrayRecord dataset (TFDS, no TensorFlow) from a dataset in its released layout.

  m2dino data build --dataset fmc_uia --manual-dir ~/data/FMC_UIA --data-dir ~/tfds [--skip-bad]

Writes <data-dir>/m2dino_ultrasound/<dataset>/1.0.0/, read back with
m2dino_jax.data.tfds.source(dataset, split, data_dir) or tfds.data_source('m2dino_ultrasound/<dataset>').
With --skip-bad, bad records are skipped and listed with the reason in skipped.json beside the data.
"""

from __future__ import annotations

from m2dino_jax.data import adapters


def add_args(p) -> None:
  p.add_argument("--dataset", required=True, choices=adapters.NAMES, help="adapter name")
  p.add_argument("--manual-dir", required=True, help="the dataset as released (downloaded by you)")
  p.add_argument("--data-dir", required=True, help="output folder for the ArrayRecord files")
  p.add_argument("--skip-bad", action="store_true", help="skip bad records, listing them with reasons")
  p.add_argument("--skipped-log", default=None, help="where to list skipped records (.json or .csv)")
  p.add_argument("--overwrite", action="store_true", help="rebuild even if a build exists")


def run(args) -> int:
  import tensorflow_datasets as tfds

  from m2dino_jax.data import tfds as tfds_data
  tfds.disable_progress_bar()  # keep the terminal to our summary, and errors to one line
  out = tfds_data.dataset_dir(args.dataset, args.data_dir)
  kept = (out / "dataset_info.json").is_file() and not args.overwrite
  counts = tfds_data.build(args.dataset, args.manual_dir, args.data_dir, skip_bad=args.skip_bad,
                           skipped_log=args.skipped_log, overwrite=args.overwrite)
  verb = "kept existing build of" if kept else "built"  # --overwrite rebuilds
  print(f"{verb} {args.dataset}: " + ", ".join(f"{s} {n}" for s, n in counts.items()) + f" examples in {out}")
  return 0
