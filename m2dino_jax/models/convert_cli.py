"""`m2dino convert`: HF DINOv3 / DINOv2 checkpoint, or a Meta DINOv2 / UltraDINO `.pth`, -> our encoder checkpoint
(for config.init_from; init_from also reads the sources directly)."""

from __future__ import annotations


def register(sub) -> None:
  p = sub.add_parser("convert", help="import HF DINOv3/DINOv2 or DINOv2-format .pth weights into an m2dino_jax "
                                     "encoder checkpoint")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--hf", help="HF checkpoint folder (config.json + *.safetensors) or file")
  src.add_argument("--pth", help="Meta DINOv2 / UltraDINO .pth state dict (teacher.backbone. / backbone. prefix)")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--format", choices=("orbax", "safetensors"), default="orbax", help="checkpoint format written")
  p.add_argument("--in-chans", type=int, default=None, help="1 = grey input (sums RGB patch weights)")
  p.set_defaults(func=run)


def run(args) -> int:
  from m2dino_jax.models import convert, dinov2_pth, vit
  overrides = {} if args.in_chans is None else {"in_chans": args.in_chans}
  if args.pth:
    cfg = dinov2_pth.config_from_state(dinov2_pth.load_pth(args.pth), args.pth, **overrides)
    model = dinov2_pth.encoder_from_pth(args.pth, cfg)
  else:
    model = convert.encoder_from_hf(args.hf, **overrides)
  out = convert.save_encoder(model, args.out, args.format)
  print(f"wrote {out} ({vit.count_params(model):,} params, {model.cfg.kind}, {model.cfg.depth} blocks)")
  return 0
