"""sonosynth: the embedded, physically based ultrasound simulator (the default dataset).

    records = sonosynth.generate("fetal_head", 16, seed=0)      # list[Record], pixel-space targets
    sonosynth.write_dataset("synth", seed=0, scale=0.1)          # FMC_UIA on-disk layout
    sonosynth.throughput(54, 256)                                # images/s on one thread

physics: image formation (convolution model); scenes (27 task builders) on views, anatomy, obstetric,
shapes; generator: records (opt-in scanner nuisances: nuisance); writer: the FMC_UIA layout; measure:
border contrast-to-noise of labelled images. `m2dino bench sonosynth` times every task and renders a
contact sheet.
"""

from m2dino_jax.data.sonosynth.generator import generate, sample, task_size, throughput
from m2dino_jax.data.sonosynth.writer import write_dataset

__all__ = ["generate", "sample", "task_size", "throughput", "write_dataset"]
