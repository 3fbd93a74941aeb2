"""allocation.json: write the allocator's answer, read it back as mixture weights (the closed loop).

allocation.json = {"budget", "floor", "weights": {domain: w}, "counts": {domain: x},
                   "predicted_loss": {domain: L}, "objective",
                   "proportional": {"weights", "predicted_loss", "objective"}, ...diagnostics}
`read_allocation_weights` accepts that file or a flat {domain: weight} object and returns validated
weights that sum to 1, ready for grain's IterDataset.mix.
"""

from __future__ import annotations

import math
from pathlib import Path

from m2dino_jax import fileio
from m2dino_jax.errors import DataError


def allocation_record(domains, result: dict, k: int, floor: float, extra: dict | None = None) -> dict:
  """The allocation.json object for budget index k of `allocate.allocate`'s result."""
  named = lambda values: {d: float(v) for d, v in zip(domains, values)}
  budget = float(result["budgets"][k])
  prop = result["proportional_counts"][k]
  return {"budget": budget, "floor": float(floor),
          "weights": named(result["fractions"][k]), "counts": named(result["counts"][k]),
          "predicted_loss": named(result["losses"][k]), "objective": float(result["objective"][k]),
          "proportional": {"weights": named(prop / budget), "counts": named(prop),
                           "predicted_loss": named(result["proportional_losses"][k]),
                           "objective": float(result["proportional_objective"][k])},
          "improvement_vs_proportional": float(1.0 - result["objective"][k] /
                                               result["proportional_objective"][k]),
          "importance": named(result["weights"][k]),
          "solver": {"pg_norm": float(result["pg_norm"][k]), "iterations": int(result["iterations"][k]),
                     "converged": bool(result["converged"][k])},
          **(extra or {})}


def write_allocation(path, record: dict) -> Path:
  return fileio.write_json(path, record)


def read_allocation_weights(path) -> dict[str, float]:
  """Mixture weights {domain: w} (non-negative, sum 1) from allocation.json or a flat {domain: w} JSON.

  Raises DataError naming the file and the offending key.
  """
  path = Path(path)
  obj = fileio.read_json(path, "mixture weights file")
  if isinstance(obj, dict) and "weights" in obj:
    obj, where = obj["weights"], "'weights'"
  else:
    where = "the top-level object"
  if not isinstance(obj, dict) or not obj:
    raise DataError(path, f"{where} must be a non-empty object {{domain: weight}}")
  weights = {}
  for name, value in obj.items():
    if not isinstance(name, str) or not name:
      raise DataError(path, f"{where} has an empty domain name")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
      raise DataError(path, f"weight of {name!r} must be a finite number >= 0, got {value!r}")
    weights[name] = float(value)
  total = math.fsum(weights.values())
  if total <= 0:
    raise DataError(path, f"{where}: weights sum to 0")
  return {k: v / total for k, v in weights.items()}

