"""Compile time of the multi-task model: state initialisation and one train program per task type.

Builds the AU model of the config (encoder + MoE + one head per task; default: one task of each of the
four types) exactly as the trainer does (train/multitask/trainer._Run), then lowers and compiles each task
type's train program (lax.switch over the type's heads) for a real batch of that type. The persistent XLA
compilation cache is switched off for this benchmark, so the numbers are cold compiles.
"""

from __future__ import annotations

import time

from m2dino_jax.bench import common

TASKS = "fetal_head+breast_2cls+thyroid_nodule_det+fetal_femur"
SMOKE = {"variant": "mu/16", "size": 32, "batch": 2, "tasks": "breast_2cls+fetal_femur"}


def add_args(p) -> None:
  p.add_argument("--variant", default="S/16", help="encoder variant, e.g. S/16")
  p.add_argument("--size", type=int, default=224, help="image side in pixels")
  p.add_argument("--batch", type=int, default=8, help="images per step")
  p.add_argument("--tasks", default=TASKS, help="'+'-joined task ids")
  p.add_argument("--moe", default="on", choices=("on", "off"), help="MoE blocks on or off")


def run(args) -> int:
  import jax

  from m2dino_jax import configlib
  from m2dino_jax.bench.data import _speckle_records
  from m2dino_jax.data import pipeline
  from m2dino_jax.tasks import registry
  from m2dino_jax.train.multitask import trainer

  jax.config.update("jax_enable_compilation_cache", False)
  config = configlib.load_config(common.config_path("m2dino.py") + f":paradigm=au,tasks={args.tasks}", [
      f"model.variant={args.variant}", f"data.image_size={args.size}", f"data.batch_size={args.batch}",
      f"moe.enabled={args.moe == 'on'}", "model.out_blocks=(0, 1, 2, 3)" if args.variant.startswith("mu")
      else "model.out_blocks=(3, 5, 7, 11)"])
  tasks = registry.resolve(config.tasks)
  t0 = time.perf_counter()
  run_ = trainer._Run(config, None, "all", tasks)
  jax.block_until_ready(run_.state)
  init_s = time.perf_counter() - t0

  names = {t.name for t in tasks}
  sources = {k: v for k, v in _speckle_records(4, max(args.size, 64)).items() if k in names}
  missing = names - set(sources)
  if missing:
    from m2dino_jax.errors import ConfigError
    raise ConfigError("tasks", f"no speckle records for {sorted(missing)}; use tasks from {TASKS}")
  it = pipeline.make_train_iterator(config.data, [t for t in tasks if t.name in sources], seed=0, sources=sources)
  batches = {}
  for _ in range(200):
    prepared = run_.prepare(next(it))
    batches.setdefault(prepared["task"].type, prepared)
    if len(batches) == len(run_.by_type):
      break
  it.close()

  rows, compile_s = [], {"init_state": init_s}
  with jax.set_mesh(run_.mesh):
    for task_type, prepared in sorted(batches.items()):
      program = run_._train_program(task_type, prepared["batch"])
      t0 = time.perf_counter()
      lowered = program.lower(run_.state, prepared["batch"], run_.bound[task_type])
      t1 = time.perf_counter()
      lowered.compile()
      t2 = time.perf_counter()
      heads = len(run_.by_type[task_type])
      rows.append({"name": f"train program: {task_type}", "median_s": None, "heads": heads, "lower_s": t1 - t0,
                   "compile_s": t2 - t1, "total_s": t2 - t0})
      compile_s[task_type] = t2 - t0
  total = sum(r["total_s"] for r in rows)
  rows.append({"name": "all train programs", "median_s": None, "heads": len(tasks),
               "lower_s": sum(r["lower_s"] for r in rows), "compile_s": sum(r["compile_s"] for r in rows),
               "total_s": total})
  print(f"multi-task model {args.variant} at {args.size}px, batch {args.batch}, MoE {args.moe}, tasks "
        f"{args.tasks}; state init (compile + run) {init_s:.2f} s")
  common.print_table(rows, ["name", "heads", "lower_s", "compile_s", "total_s"])
  common.write_results(args, "compile", rows, compile_s={**compile_s, "all_train_programs": total},
                       shapes={"batch": args.batch, "size": args.size, "tasks": len(tasks),
                               "task_types": len(batches)})
  return 0
