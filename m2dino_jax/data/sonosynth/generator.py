"""Draws labelled sonosynth records: scene -> physics -> `Record` with pixel-space targets.

Every sample has its own random stream seeded by (seed, task number, sample index), so a sample
is the same whatever `n` is, whichever other tasks are generated, and in whatever order or process.
Classification labels are balanced: each block of C consecutive samples holds every class once,
in a seeded random order.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from m2dino_jax.data.records import Record, validate
from m2dino_jax.data.sonosynth import nuisance as nuisances
from m2dino_jax.data.sonosynth import physics
from m2dino_jax.data.sonosynth.scenes import SPECS, Scene
from m2dino_jax.data.sonosynth.shapes import Canvas
from m2dino_jax.errors import DataError
from m2dino_jax.tasks import registry

MIN_IMAGES = 8
_RETRIES = 20


def task_size(task_name: str, scale: float = 1.0) -> int:
  """Images (train + val) for a task at `scale` (1 = default; 0.1 = the CPU demo, 8..120 per task)."""
  return max(MIN_IMAGES, int(round(SPECS[registry.get(task_name).name].base_size * scale)))


_F0_SCALES = (0.85, 1.0, 1.15)
_FOCUS_SCALES = (0.75, 1.0, 1.25)


def _jitter_probe(probe: physics.Probe, rng) -> physics.Probe:
  """Per-image scanner settings: frequency, focus, dynamic range and gain vary as between machines.
  Frequency and focus take a few discrete values so the PSF filter cache stays small."""
  return dataclasses.replace(
      probe, f0_mhz=probe.f0_mhz * float(rng.choice(list(_F0_SCALES))),
      focus_mm=probe.focus_mm * float(rng.choice(list(_FOCUS_SCALES))),
      dynamic_range_db=float(rng.uniform(50.0, 65.0)), tissue_grey=float(rng.uniform(0.4, 0.52)))


def _class_label(task: registry.Task, seed: int, index: int) -> int:
  block, pos = divmod(index, task.num_classes)
  order = np.random.default_rng([seed, task.index, block, 1]).permutation(task.num_classes)
  return int(order[pos])


def _fits(scene: Scene, cv: Canvas) -> bool:
  """The target must lie in the imaged field (a sector's fan), else the scene is drawn again."""
  if scene.points is not None:
    return cv.inside(scene.points)
  if scene.box is not None:
    b = scene.box
    return cv.inside([[b[0], b[1]], [b[2] - 1, b[3] - 1], [b[0], b[3] - 1], [b[2] - 1, b[1]]], margin=0)
  if scene.mask is not None:
    fg = scene.mask > 0
    return fg.any() and (fg & ~cv.fov).sum() <= 0.02 * fg.sum()
  return True


def sample(task_name: str, index: int, *, seed: int, size: int = 256, nuisance=None) -> Record:
  """Sample `index` of a task: one simulated image and its label.

  `nuisance`: opt-in scanner / operator artefacts, e.g. ('gain', 'tgc', 'text', 'jpeg') or 'all'
  (see sonosynth.nuisance; default none). They draw from their own random stream: the scene and the
  speckle stay those of the plain sample."""
  names = nuisances.parse(nuisance)
  task = registry.get(task_name)
  spec = SPECS[task.name]
  rng = np.random.default_rng([seed, task.index, index])
  label = _class_label(task, seed, index) if task.type == registry.CLASSIFICATION else -1
  probe = _jitter_probe(spec.probe, rng)
  cv = Canvas(size, probe)
  for _ in range(_RETRIES):
    scene = spec.build(cv, rng, label)
    if _fits(scene, cv):
      break
  else:
    raise DataError(f"sonosynth:{task.name}#{index}",
                    f"no scene fitted the field of view in {_RETRIES} tries")
  nrng = np.random.default_rng([seed, task.index, index, 7]) if names else None
  gain = nuisances.gain_map(names, nrng, cv.depth_mm) if names else None
  image = physics.simulate(scene.echo, probe, rng, scene.atten, density=cv.density, mirror=scene.mirror,
                           ringdown=scene.ringdown, gain_db=gain)
  mask = None if scene.mask is None else np.where(cv.fov, scene.mask, 0).astype(np.uint8)
  # Scenes draw on pixel indices (pixel (i, j) centred on (j, i)); records use the FMC_UIA / transforms
  # convention of continuous coordinates, pixel (i, j) covering [j, j + 1) x [i, i + 1): a point drawn at
  # the centre of pixel (i, j) is (j + 0.5, i + 0.5). Boxes are already pixel edges [min, max + 1).
  points = None if scene.points is None else np.asarray(scene.points, np.float32) + np.float32(0.5)
  rec = Record(image=image, task=task.name, task_type=task.type, label=scene.label, mask=mask,
               box=scene.box, points=points,
               spacing_mm=tuple(float(s) for s in cv.spacing_mm), source=f"sonosynth:{task.name}#{index}",
               extra={"seed": seed, "index": index, "simulated": True})
  if names:
    rec = nuisances.apply(rec, names, nrng, cv.fov)
  return validate(rec)


def warm_caches(task_name: str, size: int = 256) -> None:
  """Build the geometry and every PSF filter (one per jittered frequency x focus) a task uses at `size`, as a
  long-running data loader has them after its first few dozen images: timings then measure the steady state."""
  probe = SPECS[registry.get(task_name).name].probe
  for f0 in _F0_SCALES:
    for focus in _FOCUS_SCALES:
      physics.warm(dataclasses.replace(probe, f0_mhz=probe.f0_mhz * f0, focus_mm=probe.focus_mm * focus), size, size)


def generate(task_name: str, n: int, *, seed: int, size: int = 256, start: int = 0, nuisance=None) -> list[Record]:
  """`n` simulated records of one task (samples start .. start + n - 1), validated."""
  return [sample(task_name, i, seed=seed, size=size, nuisance=nuisance) for i in range(start, start + n)]


def throughput(n: int = 54, size: int = 256, seed: int = 0, clock: str = "wall") -> float:
  """Simulator speed in images/s on the calling thread, cycling through all 27 tasks.

  clock='wall' times real seconds; clock='cpu' divides by this process' CPU seconds instead,
  which is the one-core speed even when other jobs share the machine.
  """
  timer = {"wall": time.perf_counter, "cpu": time.process_time}[clock]
  names = [t.name for t in registry.TASKS]
  for name in names:  # warm the geometry caches
    sample(name, 0, seed=seed, size=size)
  t0 = timer()
  for i in range(n):
    sample(names[i % len(names)], 1 + i // len(names), seed=seed, size=size)
  return n / (timer() - t0)
