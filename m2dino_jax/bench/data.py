"""Input pipeline images/s (0 and N Grain workers) vs a ViT-S/16 train step's appetite; simulator images/s.

The pipeline runs the default train transforms at `--image-size` on simulated records held in memory
(sonosynth; `--source records` uses plain speckle images instead). The train step is a DINOv3 ViT-S/16
encoder with a linear head on the CLS token, fwd + bwd + SGD update, jitted, at `--vit-batch`; its
images/s is what training consumes. Goal: pipeline >= 2x the train step on the same machine.
"""

from __future__ import annotations

import time

import numpy as np

from m2dino_jax.bench import common
from m2dino_jax.data import pipeline, records
from m2dino_jax.tasks import registry

TASKS = ("fetal_head", "breast_2cls", "thyroid_nodule_det", "fetal_femur")
SMOKE = {"image_size": 32, "batch": 4, "batches": 2, "workers": [0], "source": "records", "source_size": 48,
         "per_task": 2, "vit_variant": "mu/16", "vit_batch": 2, "vit_steps": 2, "sim_images": 0}


def add_args(p) -> None:
  p.add_argument("--image-size", type=int, default=224, help="model image side after the transforms")
  p.add_argument("--batch", type=int, default=32, help="pipeline batch (one process)")
  p.add_argument("--batches", type=int, default=8, help="timed pipeline batches per worker count")
  p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="Grain worker counts to time")
  p.add_argument("--source", choices=("sonosynth", "records"), default="sonosynth", help="simulator or speckle records")
  p.add_argument("--source-size", type=int, default=256, help="side of the source images")
  p.add_argument("--per-task", type=int, default=16, help="source images per task")
  p.add_argument("--vit-variant", default="S/16", help="encoder of the consuming train step")
  p.add_argument("--vit-batch", type=int, default=8, help="batch of the consuming train step")
  p.add_argument("--vit-steps", type=int, default=3, help="timed train steps")
  p.add_argument("--sim-images", type=int, default=27, help="images for the simulator speed (0 = skip)")


def _speckle_records(per_task: int, size: int) -> dict[str, list[records.Record]]:
  """Rayleigh-speckle images with a target of each task type (when sonosynth is not wanted)."""
  rng = np.random.default_rng(0)
  out = {}
  for name in TASKS:
    task = registry.get(name)
    recs = []
    for i in range(per_task):
      img = np.clip(rng.rayleigh(40.0, (size, size * 4 // 3)), 0, 255).astype(np.uint8)
      rec = records.Record(img, name, label=i % max(task.num_classes, 1) if task.num_classes else -1)
      if task.type == registry.SEGMENTATION:
        rec.mask = np.zeros(img.shape, np.uint8)
        rec.mask[size // 4:size // 2, size // 3:size // 2] = 1
      elif task.type == registry.DETECTION:
        rec.box = np.array([10, 20, size // 2, size // 2], np.float32)
      elif task.type == registry.REGRESSION:
        rec.points = np.array([[10, 20], [size // 2, size // 3]][:task.num_points], np.float32)
      recs.append(records.validate(rec))
    out[name] = recs
  return out


def _sources(args):
  if args.source == "records":
    return _speckle_records(args.per_task, args.source_size), "speckle records"
  from m2dino_jax.data import sonosynth
  return ({t: sonosynth.generate(t, args.per_task, seed=0, size=args.source_size) for t in TASKS},
          "sonosynth records")


def pipeline_rate(sources, image_size: int, batch: int, batches: int, workers: int) -> dict:
  """Images/s of the train iterator after its first batch (worker start-up and warm-up excluded)."""
  cfg = pipeline.default_data_config()
  cfg.image_size, cfg.batch_size, cfg.worker_count, cfg.prefetch = image_size, batch, workers, 2
  cfg.mixture = "uniform"
  t0 = time.perf_counter()
  it = pipeline.make_train_iterator(cfg, list(sources), seed=0, sources=sources)
  next(it)
  first = time.perf_counter() - t0
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  dt = time.perf_counter() - t
  it.close()
  return {"name": f"pipeline, {workers} workers", "images_per_s": batch * batches / dt,
          "median_s": dt / batches, "startup_s": first, "batch": batch}


def vit_train_rate(image_size: int, batch: int, steps: int, variant: str = "S/16") -> dict:
  """Images/s of a jitted ViT fwd + bwd + SGD step with a linear head (compile excluded)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from m2dino_jax.models import vit

  class Classifier(nnx.Module):
    def __init__(self, rngs):
      self.encoder = vit.Encoder(vit.ViTConfig.from_config({"variant": variant}), rngs=rngs)
      self.head = nnx.Linear(self.encoder.cfg.dim, 8, rngs=rngs)

    def __call__(self, images):
      return self.head(self.encoder(images, train=True)["cls"])

  model = Classifier(nnx.Rngs(0))
  graph, params = nnx.split(model)
  tx = optax.sgd(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(p):
      logits = nnx.merge(graph, p)(images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  shape = (batch, image_size, image_size, 3)
  images = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32))
  labels = jnp.arange(batch) % 8
  state = {"p": params, "o": opt_state}

  def run():
    state["p"], state["o"], loss = step(state["p"], state["o"], images, labels)
    loss.block_until_ready()

  timing = common.time_fn(run, warmup=1, repeats=steps)
  return {"name": f"ViT-{variant} train step ({jax.default_backend()})",
          "images_per_s": batch / timing["median_s"], "median_s": timing["median_s"], "min_s": timing["min_s"],
          "repeats": steps, "startup_s": timing["warmup_s"], "batch": batch}


def simulator_rate(n: int, size: int) -> dict | None:
  if n <= 0:
    return None
  from m2dino_jax.data import sonosynth
  rate = sonosynth.throughput(n, size)
  return {"name": f"sonosynth simulator ({size} px, 1 thread)", "images_per_s": rate, "median_s": 1.0 / rate,
          "batch": 1}


def run(args) -> int:
  sources, source_name = _sources(args)
  rows = [pipeline_rate(sources, args.image_size, args.batch, args.batches, w) for w in args.workers]
  train = vit_train_rate(args.image_size, args.vit_batch, args.vit_steps, args.vit_variant)
  for r in rows:
    r["x_train_step"] = r["images_per_s"] / train["images_per_s"]
  rows.append(train)
  sim = simulator_rate(args.sim_images, args.source_size)
  if sim:
    rows.append(sim)
  print(f"source: {source_name}, {args.per_task} per task x {len(sources)} tasks at {args.source_size} px; "
        f"output {args.image_size} px")
  common.print_table(rows, ["name", "images_per_s", "x_train_step", "median_s", "startup_s", "batch"])
  best = max(r["x_train_step"] for r in rows if "x_train_step" in r)
  print(f"best pipeline / train step = {best:.2f}x (goal >= 2x): {'met' if best >= 2 else 'NOT met'}")
  common.write_results(args, "data", rows, ratios={"best_pipeline_over_train_step": best},
                       compile_s={"train_step_first_call": train["startup_s"]}, source=source_name,
                       shapes={"image_size": args.image_size, "batch": args.batch, "vit_batch": args.vit_batch,
                               "vit_variant": args.vit_variant}, goal_ratio=2.0)
  return 0


if __name__ == "__main__":  # Grain workers are spawned: keep module import side-effect free
  import argparse

  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="bench_results/data.json")
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--peak-tflops", type=float, default=0.0)
  add_args(parser)
  run(parser.parse_args())
