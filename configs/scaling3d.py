"""The 3D MAE scaling sweep: pretraining grid -> fit -> allocations -> strategies -> fine-tuning -> report.

Commands:
  m2dino scaling sweep --config configs/scaling3d.py --workdir runs/sweep3d      # ViT-B/16, 96^3 (cluster)
  m2dino scaling sweep --config configs/scaling3d.py:smoke --workdir /tmp/sweep  # ~15-30 min on 2 CPU cores
  m2dino scaling sweep ... --set sweep.sizes=2,4,8,16 --set pretrain.total_steps=2000   # overrides
Resumable: rerun the same command and finished runs (WORKDIR/runs/*/done.json) are not retrained.

`pretrain` is configs/mae3d.py (its data / mixture / budget / run_id / measurements are set per run by the
sweep), `finetune` is configs/mae3d_finetune.py with the same encoder. Data are counted in training volumes;
`sweep.available` gives each domain a different number of phantoms (so data-proportional is not uniform).
Expected result: WORKDIR/report.md with the measured held-out loss of transfer_aware, data_proportional,
uniform and transfer_blind per domain at each budget, transfer_aware's gains in %, predicted vs measured r per
domain and pooled, and downstream Dice / AUC per strategy (plus a random-init control), after a self-law
table (drop with data, log-log slope +- se, E / A / beta, residual) with a warning for every domain whose
held-out loss does not fall with data (then lengthen pretrain.total_steps or spread sweep.sizes); fits.json,
measurements.jsonl (design runs; `m2dino scaling fit` reads it), allocations/, plots/.
"""

from pathlib import Path

import ml_collections

from m2dino_jax.configlib import load_module, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, smoke=False)
  here = Path(__file__).resolve().parent
  variant = "smoke" if arg.smoke else None
  c = ml_collections.ConfigDict()
  c.pretrain = load_module(str(here / "mae3d.py")).get_config(variant)
  c.pretrain.eval_at_start = False
  c.finetune = load_module(str(here / "mae3d_finetune.py")).get_config(variant)
  c.finetune.model = ml_collections.ConfigDict(c.pretrain.model.to_dict())
  c.finetune.save_params = False

  c.sweep = ml_collections.ConfigDict(dict(
      domains="abd_ct,abd_mri,brain_t1,brain_t2,head_ct,hn_pet",
      available="abd_ct=64,abd_mri=24,brain_t1=48,brain_t2=16,head_ct=32,hn_pet=12",  # training volumes
      sizes="2,4,8,16,32,64",  # single-domain runs (capped at the domain's volumes)
      mixture_budgets="48,96", mixtures=3,  # Dirichlet(2) mixture runs per budget
      budgets="32,64,96,128",  # held-out budgets the strategies are compared at
      strategies="transfer_aware,data_proportional,uniform,transfer_blind",
      floor=0.05, temperature=3.0,
      E="auto",  # the self laws' floor: auto (free where the points identify it, else 0) | free | none | fixed:V
      bootstrap=100, seed=0,
      downstream="abd_ct:segmentation,brain_t1:classification",  # fine-tuned at the largest budget
      plots=True))

  if arg.smoke:
    c.pretrain.total_steps = 30
    c.finetune.total_steps = 30
    c.sweep.update(available="abd_ct=8,abd_mri=4,brain_t1=6,brain_t2=3,head_ct=5,hn_pet=3", sizes="1,2,4",
                   mixture_budgets="8", mixtures=2, budgets="8,12", bootstrap=0)
  return c
