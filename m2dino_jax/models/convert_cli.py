"""`m2dino convert`: HF DINOv3 / DINOv2 checkpoint -> our encoder checkpoint (for config.init_from)."""

from __future__ import annotations


def register(sub) -> None:
  p = sub.add_parser("convert", help="import HF DINOv3/DINOv2 weights into an m2dino_jax encoder checkpoint")
  p.add_argument("--hf", required=True, help="HF checkpoint folder (config.json + *.safetensors) or file")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--format", choices=("orbax", "safetensors"), default="orbax")
  p.add_argument("--in-chans", type=int, default=None, help="1 = grey input (sums RGB patch weights)")
  p.set_defaults(func=run)


def run(args) -> int:
  from m2dino_jax.models import convert, vit
  overrides = {} if args.in_chans is None else {"in_chans": args.in_chans}
  model = convert.encoder_from_hf(args.hf, **overrides)
  out = convert.save_encoder(model, args.out, args.format)
  print(f"wrote {out} ({vit.count_params(model):,} params, {model.cfg.kind}, {model.cfg.depth} blocks)")
  return 0
