"""sonosynth: the embedded, physically based ultrasound simulator (the default dataset).

    records = sonosynth.generate("fetal_head", 16, seed=0)      # list[Record], pixel-space targets
    sonosynth.write_dataset("synth", seed=0, scale=0.1)          # FMC_UIA on-disk layout
    sonosynth.throughput(54, 256)                                # images/s on one thread

physics: image formation (convolution model); scenes (27 task builders) on views, anatomy, shapes;
generator: records; writer: the FMC_UIA layout.
"""

from m2dino_jax.data.sonosynth.generator import generate, sample, task_size, throughput

__all__ = ["generate", "sample", "task_size", "throughput", "write_dataset"]


def write_dataset(out_dir, *, seed: int, scale: float = 1.0, size: int = 256, tasks=None,
                  val_fraction: float = 0.2, workers: int = 1):
  """Writes the simulated FMC_UIA bundle under `out_dir` (see writer.write_dataset)."""
  from m2dino_jax.data.sonosynth import writer
  return writer.write_dataset(out_dir, seed=seed, scale=scale, size=size, tasks=tasks,
                              val_fraction=val_fraction, workers=workers)
