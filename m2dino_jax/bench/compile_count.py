"""`m2dino bench train --compile`: compiled programs and compile seconds of a multi-task model, one program per
task (the shape before issue 10: each head its own train and eval program) against one per task type (today:
`lax.switch` over the type's heads), in one run, plus the steady-state step time of both on the same batches.

Both shapes come from the same code (`train/multitask/steps.py` with one task or with all tasks of a type), on
the same state and batches; JAX's persistent compilation cache is switched off so every compile is real.
"""

from __future__ import annotations

import time

import numpy as np

from m2dino_jax.bench import common


def add_args(p) -> None:
  p.add_argument("--compile-config", default="configs/m2dino.py:paradigm=au,smoke",
                 help="the multi-task config whose model is compiled (all its tasks)")
  p.add_argument("--compile-image-size", type=int, default=64, help="image side of the --compile model")
  p.add_argument("--step-repeats", type=int, default=5, help="timed steps per program (0: compile only)")


def _lower_compile(fn, *args):
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def run(args) -> int:
  import jax

  from m2dino_jax import configlib
  from m2dino_jax import mesh as mesh_lib
  from m2dino_jax.data import pipeline
  from m2dino_jax.tasks import registry
  from m2dino_jax.train import multitask
  from m2dino_jax.train.multitask import steps

  jax.config.update("jax_enable_compilation_cache", False)
  config = configlib.load_config(args.compile_config, [f"data.image_size={args.compile_image_size}",
                                                       "data.source.synthetic_count=8", "tensorboard=False"])
  tasks = registry.resolve(config.tasks)
  run_ = multitask._Run(config, None, "all", tasks)
  template = next(pipeline.make_train_iterator(config.data, tasks[:1], seed=0))
  batches = {t.name: mesh_lib.shard_batch(dict(template, task_id=np.full_like(template["task_id"], t.task_id)),
                                          run_.mesh, run_.rules) for t in tasks}
  weights = {t.name: 1.0 for t in tasks}
  m, state = run_.model, run_.state

  def programs(groups):
    """{label: (train, eval, bound)} compiled for each group of tasks; returns them and the compile seconds."""
    out, seconds = {}, []
    for label, group in groups.items():
      bound = jax.device_put(steps.bound_inputs(group, weights, run_.enc_rest), mesh_lib.replicated(run_.mesh))
      batch = batches[group[0].name]
      with jax.set_mesh(run_.mesh):
        train, t_train = _lower_compile(jax.jit(steps.train_program(m.enc_gdef, m.head_gdefs, group, run_.settings)),
                                        state, batch, bound)
        ev, t_eval = _lower_compile(jax.jit(steps.eval_program(m.enc_gdef, m.head_gdefs, group)),
                                    state.params, batch, bound)
      out[label] = (train, ev, bound)
      seconds += [t_train, t_eval]
    return out, seconds

  by_type = {}
  for t in tasks:
    by_type.setdefault(t.type, []).append(t)
  shapes = {"per_type": by_type, "per_head": {t.name: [t] for t in tasks}}
  rows, compiled = [], {}
  for shape, groups in shapes.items():
    compiled[shape], seconds = programs(groups)
    rows.append({"name": shape, "median_s": None, "shape": shape, "train_programs": len(groups),
                 "eval_programs": len(groups),
                 "compile_s": float(np.sum(seconds)), "mean_compile_s": float(np.mean(seconds))})

  step_rows = []
  if args.step_repeats > 0:
    from m2dino_jax.bench.moe import time_interleaved
    for type_name, group in by_type.items():
      task = group[0]
      calls = {}
      for shape, key in (("per_type", type_name), ("per_head", task.name)):
        train, _, bound = compiled[shape][key]

        def step(train=train, bound=bound, batch=batches[task.name]):
          _, metrics = train(state, batch, bound)
          return float(jax.block_until_ready(metrics["loss"]))
        calls[shape] = step
      times = time_interleaved(calls, args.step_repeats)
      step_rows.append({"type": type_name, "task": task.name, "heads_in_type": len(group),
                        "per_type_s": times["per_type"]["median_s"], "per_head_s": times["per_head"]["median_s"],
                        "ratio": times["per_type"]["median_s"] / times["per_head"]["median_s"]})

  print(f"compiled programs for {len(tasks)} tasks ({args.compile_config}, {args.compile_image_size} px), "
        f"jax {jax.default_backend()}, persistent cache off")
  common.print_table(rows, ["shape", "train_programs", "eval_programs", "compile_s", "mean_compile_s"])
  ratio = rows[1]["compile_s"] / rows[0]["compile_s"]
  print(f"compile seconds per head / per type: {ratio:.2f}x")
  if step_rows:
    print("steady-state train step (the type program runs one branch of its switch):")
    common.print_table(step_rows, ["type", "task", "heads_in_type", "per_type_s", "per_head_s", "ratio"])
  common.write_results(args, "train_compile", rows, ratios={"compile_s_per_head_over_per_type": ratio},
                       compile_s={r["shape"]: r["compile_s"] for r in rows}, steps=step_rows)
  return 0
