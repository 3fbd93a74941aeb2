"""sonosynth: the embedded, physically based ultrasound simulator (the default dataset).

    records = sonosynth.generate("fetal_head", 16, seed=0)      # list[Record], pixel-space targets
    sonosynth.write_dataset("synth", seed=0, scale=0.1)          # FMC_UIA on-disk layout
    sonosynth.throughput(54, 256)                                # images/s on one thread

physics: image formation (convolution model); scenes (27 task builders) on views, anatomy, obstetric,
shapes; generator: records (opt-in scanner nuisances: nuisance); writer: the FMC_UIA layout; measure:
border contrast-to-noise of labelled images; realism: the issue-18 realism measurements (speckle statistics,
flatness, grain, Nakagami m per tissue, specular walls, cyst level, A-lines). `m2dino bench sonosynth` times
every task, renders a contact sheet and (`--stats`) prints the realism table.
"""

from m2dino_jax.data.sonosynth.generator import generate, sample, task_size, throughput
from m2dino_jax.data.sonosynth.writer import write_dataset

__all__ = ["generate", "sample", "task_size", "throughput", "write_dataset"]
