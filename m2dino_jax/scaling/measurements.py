"""The measurements file: one JSON object per line, one line per evaluated pretraining run.

Row fields (the 3D MAE sweep writes real rows in this format; `simulate.py` writes planted ones):

  run_id     str, names the run (a run may appear at several steps; fits use its last step)
  data       {domain: examples of that domain the run trained on}  (>= 0; every row names the same domains)
  weights    {domain: mixture weight}  (>= 0, sums to 1; may be omitted for single-domain runs)
  budget     total examples of the run (> 0)
  step       training step of the evaluation (int >= 0)
  loss       {domain: held-out loss}  (> 0; any subset of the domains). A single-source run should leave out a
             target it cannot inform (no own data and no transfer: the law's loss there is infinite); a
             finite loss recorded there is read as a small transfer.
  available  optional {domain: examples available in that domain}; 'data' may not exceed it
  strategy   optional str: the run trained on the allocation of this strategy (strategies.STRATEGIES or any
             name) at total budget 'budget'. `m2dino scaling compare --measurements` evaluates strategies on
             these rows (grouped by strategy and budget; repeats averaged) and fits the law on the rows without
             'strategy' (the study's design runs). `fit` uses every row.

`read_measurements` validates every row and raises `DataError` naming the file and line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m2dino_jax import fileio
from m2dino_jax.errors import DataError

_REQUIRED = ("run_id", "data", "budget", "step", "loss")
_KNOWN = set(_REQUIRED) | {"weights", "available", "strategy"}


@dataclass(frozen=True)
class Measurement:
  run_id: str
  data: dict[str, float]
  budget: float
  step: int
  loss: dict[str, float]
  weights: dict[str, float] = field(default_factory=dict)
  available: dict[str, float] = field(default_factory=dict)
  strategy: str = ""

  def to_json(self) -> dict:
    row = {"run_id": self.run_id, "data": self.data, "weights": self.weights, "budget": self.budget,
           "step": self.step, "loss": self.loss}
    if self.available:
      row["available"] = self.available
    if self.strategy:
      row["strategy"] = self.strategy
    return row


@dataclass(frozen=True)
class MeasurementArrays:
  """Final-step rows as arrays: data (runs, domains), loss (runs, domains; NaN = not evaluated)."""
  domains: list[str]
  run_ids: list[str]
  data: np.ndarray
  loss: np.ndarray
  available: np.ndarray  # (domains,), inf where unknown


def _number(value, path, line, what, *, minimum=None, strict=False) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
    raise DataError(path, f"{what} must be a finite number, got {value!r}", row=line)
  if minimum is not None and (value < minimum or (strict and value == minimum)):
    op = ">" if strict else ">="
    raise DataError(path, f"{what} must be {op} {minimum}, got {value!r}", row=line)
  return float(value)


def _domain_map(value, path, line, key, *, strict=False) -> dict[str, float]:
  if not isinstance(value, dict) or not value:
    raise DataError(path, f"'{key}' must be a non-empty object {{domain: number}}", row=line)
  out = {}
  for name, v in value.items():
    if not name:
      raise DataError(path, f"'{key}' has an empty domain name", row=line)
    out[name] = _number(v, path, line, f"{key}[{name!r}]", minimum=0.0, strict=strict)
  return out


def parse_row(obj, path, line) -> Measurement:
  """Validates one decoded row; `line` is 1-based and appears in every error."""
  if not isinstance(obj, dict):
    raise DataError(path, "each line must be a JSON object", row=line)
  missing = [k for k in _REQUIRED if k not in obj]
  if missing:
    raise DataError(path, f"missing field(s) {missing}; expected {list(_REQUIRED)}", row=line)
  unknown = sorted(set(obj) - _KNOWN)
  if unknown:
    raise DataError(path, f"unknown field(s) {unknown}; allowed {sorted(_KNOWN)}", row=line)
  if not isinstance(obj["run_id"], str) or not obj["run_id"]:
    raise DataError(path, "'run_id' must be a non-empty string", row=line)
  strategy = obj.get("strategy", "")
  if "strategy" in obj and (not isinstance(strategy, str) or not strategy):
    raise DataError(path, f"'strategy' must be a non-empty string, got {strategy!r}", row=line)
  if isinstance(obj["step"], bool) or not isinstance(obj["step"], int) or obj["step"] < 0:
    raise DataError(path, f"'step' must be an integer >= 0, got {obj['step']!r}", row=line)
  data = _domain_map(obj["data"], path, line, "data")
  loss = _domain_map(obj["loss"], path, line, "loss", strict=True)
  weights = _domain_map(obj["weights"], path, line, "weights") if obj.get("weights") else {}
  available = _domain_map(obj["available"], path, line, "available") if obj.get("available") else {}
  for key, mapping in (("loss", loss), ("weights", weights), ("available", available)):
    extra = sorted(set(mapping) - set(data))
    if extra:
      raise DataError(path, f"'{key}' names domain(s) {extra} that 'data' does not", row=line)
  over = sorted(d for d, n in available.items() if data.get(d, 0.0) > n * (1 + 1e-9))
  if over:
    raise DataError(path, f"'data' exceeds 'available' for domain(s) {over}: a run cannot train on more "
                    "examples than exist", row=line)
  if weights and abs(sum(weights.values()) - 1.0) > 1e-3:
    raise DataError(path, f"'weights' must sum to 1, got {sum(weights.values()):.6g}", row=line)
  budget = _number(obj["budget"], path, line, "'budget'", minimum=0.0, strict=True)
  if sum(data.values()) <= 0:
    raise DataError(path, "'data' must have at least one domain with examples > 0", row=line)
  return Measurement(obj["run_id"], data, budget, obj["step"], loss, weights, available, strategy)


def read_measurements(path) -> list[Measurement]:
  """Reads and validates a measurements.jsonl file (blank lines allowed)."""
  path = Path(path)
  if not path.is_file():
    raise DataError(path, "measurements file not found")
  rows, domains, seen = [], None, set()
  with path.open() as f:
    for line_no, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e.msg})", row=line_no) from None
      row = parse_row(obj, path, line_no)
      if domains is None:
        domains = list(row.data)
      elif set(row.data) != set(domains):
        raise DataError(path, f"'data' names domains {sorted(row.data)}, but line 1's rows name "
                        f"{sorted(domains)}", row=line_no)
      key = (row.run_id, row.step)
      if key in seen:
        raise DataError(path, f"run {row.run_id!r} at step {row.step} appears twice", row=line_no)
      seen.add(key)
      rows.append(row)
  if not rows:
    raise DataError(path, "no measurement rows")
  return rows


def write_measurements(path, rows: list[Measurement]) -> Path:
  return fileio.write_text(path, "".join(json.dumps(r.to_json()) + "\n" for r in rows))


def last_steps(rows: list[Measurement]) -> list[Measurement]:
  """Each run's row at its last step, in first-appearance order."""
  last: dict[str, Measurement] = {}
  for row in rows:
    if row.run_id not in last or row.step > last[row.run_id].step:
      last[row.run_id] = row
  return list(last.values())


def to_arrays(rows: list[Measurement], domains: list[str] | None = None) -> MeasurementArrays:
  """Keeps each run's last step and stacks rows into arrays in `domains` order (default: file order)."""
  domains = list(rows[0].data) if domains is None else list(domains)
  final = last_steps(rows)
  data = np.array([[r.data.get(d, 0.0) for d in domains] for r in final], dtype=np.float64)
  loss = np.array([[r.loss.get(d, np.nan) for d in domains] for r in final], dtype=np.float64)
  available = np.full(len(domains), np.inf)
  for r in final:
    for k, d in enumerate(domains):
      if d in r.available:
        available[k] = r.available[d] if np.isinf(available[k]) else max(available[k], r.available[d])
  return MeasurementArrays(domains, [r.run_id for r in final], data, loss, available)
