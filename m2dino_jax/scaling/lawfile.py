"""A planted truth read from a law file (law.json), for `m2dino scaling simulate|compare --law`.

A law file states the truth a simulated study is drawn from, in the law's own terms (law.py):

  {"domains": ["abd_ct", "hn_pet", ...],                     required, unique names
   "available": {"abd_ct": 1.5e5, ...},                       required, examples per domain (> 0)
   "E": 0 | {"abd_ct": 0.1, ...},                              floor per domain, >= 0 (default 0)
   "beta": {"abd_ct": 0.45, ...},                             required, > 0
   "A": {...}  or  "loss_at": {"size": 1e4, "loss": 0.5},    A_i > 0, or the loss every domain reaches with
                                                              `size` examples of its own: A_i = (loss - E_i) size^beta_i
   "tau": {"abd_mri<-abd_ct": 0.6, ...},                      transfer target <- source (>= 0); unnamed pairs are 0
   "gamma": 1 | {"abd_mri<-abd_ct": 0.7, ...},                exponent on the source's data (> 0): a misspecified
                                                              truth when != 1, since fits assume 1 (default 1)
   "noise": 0.01,                                             relative loss noise of a measurement (default 0.01)
   "floor": 0.05,                                             per-domain floor of the allocations (default 0.05)
   "design": {"sizes": 10, "min_size": 100, "max_size": 1e5,  single-source sweep per domain (sizes capped at
              "mixture_budgets": [1e4, 4e4], "per_budget": 4}  the domain's availability) and random mixtures
  }

Scalars stand for "every domain" / "every pair". Pairs are written "target<-source", matching tau[i][j]
(transfer from j to i). `read_law` raises DataError naming the file and the offending field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m2dino_jax import fileio
from m2dino_jax.errors import DataError
from m2dino_jax.scaling.law import Law

_KNOWN = {"domains", "available", "E", "A", "loss_at", "beta", "tau", "gamma", "noise", "floor", "design",
          "description"}
_DESIGN_KEYS = {"sizes", "min_size", "max_size", "mixture_budgets", "per_budget"}


@dataclass(frozen=True)
class Design:
  """Which runs a simulated study makes: single-source sweeps and random mixtures."""
  sizes: int = 10
  min_size: float = 100.0
  max_size: float = math.inf  # capped at each domain's availability
  mixture_budgets: tuple = (1e4, 4e4)
  per_budget: int = 4


@dataclass(frozen=True)
class PlantedLaw:
  domains: list[str]
  law: Law               # numpy arrays
  available: np.ndarray  # (n,)
  noise: float = 0.01
  floor: float = 0.05
  design: Design = field(default_factory=Design)
  source: str = "built-in"


# The six-domain example of the scaling study (issue 15): a hub (abd_ct), an island (hn_pet), strong imbalance
# (availability 15/8/35/30/8/4 % of 1e6) and a 4x spread of exponents. E = 0, as in the paper's pure power law.
SIX_DOMAIN = {
    "description": "six domains after the paper's setting: CT hub, PET island, imbalance by subsampling",
    "domains": ["abd_ct", "abd_mri", "brain_t1", "brain_t2", "head_ct", "hn_pet"],
    "available": {"abd_ct": 1.5e5, "abd_mri": 8e4, "brain_t1": 3.5e5, "brain_t2": 3e5, "head_ct": 8e4,
                  "hn_pet": 4e4},
    "E": 0.0,
    "beta": {"abd_ct": 0.45, "abd_mri": 0.40, "brain_t1": 0.15, "brain_t2": 0.18, "head_ct": 0.30,
             "hn_pet": 0.60},
    "loss_at": {"size": 1e4, "loss": 0.5},
    "tau": {"abd_mri<-abd_ct": 0.6, "head_ct<-abd_ct": 0.7, "brain_t1<-abd_ct": 0.3, "brain_t2<-abd_ct": 0.3,
            "hn_pet<-abd_ct": 0.05, "abd_ct<-abd_mri": 0.2, "abd_ct<-head_ct": 0.3, "brain_t1<-brain_t2": 0.8,
            "brain_t2<-brain_t1": 0.8, "abd_mri<-brain_t1": 0.1, "abd_mri<-brain_t2": 0.1,
            "hn_pet<-head_ct": 0.02},
    "noise": 0.01,
    "floor": 0.05,
    "design": {"sizes": 8, "min_size": 300, "max_size": 4e4, "mixture_budgets": [5e3, 2e4], "per_budget": 4},
}
EXAMPLES = {"six_domain": SIX_DOMAIN}


def _err(path, message):
  return DataError(path, message)


def _number(value, path, key, *, lower=None, strict=False) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
    raise _err(path, f"'{key}' must be a finite number, got {value!r}")
  if lower is not None and (value < lower or (strict and value == lower)):
    raise _err(path, f"'{key}' must be {'>' if strict else '>='} {lower}, got {value!r}")
  return float(value)


def _per_domain(obj, key, domains, path, *, default=None, lower=None, strict=False) -> np.ndarray:
  """A scalar (all domains) or {domain: number} naming every domain."""
  value = obj.get(key, default)
  if value is None:
    raise _err(path, f"missing field '{key}'")
  if not isinstance(value, dict):
    return np.full(len(domains), _number(value, path, key, lower=lower, strict=strict))
  unknown = sorted(set(value) - set(domains))
  if unknown:
    raise _err(path, f"'{key}' names unknown domain(s) {unknown}; domains are {domains}")
  missing = [d for d in domains if d not in value]
  if missing:
    raise _err(path, f"'{key}' lacks domain(s) {missing}")
  return np.array([_number(value[d], path, f"{key}.{d}", lower=lower, strict=strict) for d in domains])


def _pairs(obj, key, domains, path, *, default: float, lower=0.0, strict=False) -> np.ndarray:
  """A scalar (every off-diagonal pair) or {"target<-source": number}; unnamed pairs take `default`."""
  n = len(domains)
  value = obj.get(key, default)
  if not isinstance(value, dict):
    out = np.full((n, n), _number(value, path, key, lower=lower, strict=strict))
    np.fill_diagonal(out, 0.0 if key == "tau" else 1.0)
    return out
  out = np.full((n, n), float(default))
  np.fill_diagonal(out, 0.0 if key == "tau" else 1.0)
  index = {d: i for i, d in enumerate(domains)}
  for pair, v in value.items():
    target, sep, source = pair.partition("<-")
    target, source = target.strip(), source.strip()
    if not sep or target not in index or source not in index or target == source:
      raise _err(path, f"'{key}' pair {pair!r} must read 'target<-source' with two different domains of "
                 f"{domains}")
    out[index[target], index[source]] = _number(v, path, f"{key}.{pair}", lower=lower, strict=strict)
  return out


def _design(obj, path) -> Design:
  spec = obj.get("design", {})
  if not isinstance(spec, dict):
    raise _err(path, "'design' must be an object")
  unknown = sorted(set(spec) - _DESIGN_KEYS)
  if unknown:
    raise _err(path, f"'design' has unknown field(s) {unknown}; allowed {sorted(_DESIGN_KEYS)}")
  base = Design()
  sizes = spec.get("sizes", base.sizes)
  per_budget = spec.get("per_budget", base.per_budget)
  for key, v in (("sizes", sizes), ("per_budget", per_budget)):
    if isinstance(v, bool) or not isinstance(v, int) or v < (3 if key == "sizes" else 0):
      raise _err(path, f"'design.{key}' must be an integer >= {3 if key == 'sizes' else 0}, got {v!r}")
  budgets = spec.get("mixture_budgets", list(base.mixture_budgets))
  if not isinstance(budgets, list):
    raise _err(path, "'design.mixture_budgets' must be a list of numbers")
  budgets = tuple(_number(b, path, "design.mixture_budgets", lower=0.0, strict=True) for b in budgets)
  lo = _number(spec.get("min_size", base.min_size), path, "design.min_size", lower=0.0, strict=True)
  hi = spec.get("max_size")
  hi = math.inf if hi is None else _number(hi, path, "design.max_size", lower=lo, strict=True)
  return Design(sizes, lo, hi, budgets, per_budget)


def parse_law(obj, path="<law>") -> PlantedLaw:
  """Validates a decoded law file; every error names `path` and the field."""
  if not isinstance(obj, dict):
    raise _err(path, "a law file must be a JSON object")
  unknown = sorted(set(obj) - _KNOWN)
  if unknown:
    raise _err(path, f"unknown field(s) {unknown}; allowed {sorted(_KNOWN)}")
  domains = obj.get("domains")
  if not isinstance(domains, list) or not domains or not all(isinstance(d, str) and d for d in domains):
    raise _err(path, "'domains' must be a non-empty list of names")
  if len(set(domains)) != len(domains) or any("<-" in d for d in domains):
    raise _err(path, "'domains' must be unique names without '<-'")
  available = _per_domain(obj, "available", domains, path, lower=0.0, strict=True)
  E = _per_domain(obj, "E", domains, path, default=0.0, lower=0.0)
  beta = _per_domain(obj, "beta", domains, path, lower=0.0, strict=True)
  if ("A" in obj) == ("loss_at" in obj):
    raise _err(path, "give exactly one of 'A' and 'loss_at'")
  if "A" in obj:
    A = _per_domain(obj, "A", domains, path, lower=0.0, strict=True)
  else:
    at = obj["loss_at"]
    if not isinstance(at, dict) or set(at) != {"size", "loss"}:
      raise _err(path, "'loss_at' must be {\"size\": number, \"loss\": number}")
    size = _number(at["size"], path, "loss_at.size", lower=0.0, strict=True)
    loss = _number(at["loss"], path, "loss_at.loss", lower=0.0, strict=True)
    if (loss <= E).any():
      raise _err(path, f"'loss_at.loss' {loss} must exceed every floor E (max {E.max():g})")
    A = (loss - E) * size ** beta
  tau = _pairs(obj, "tau", domains, path, default=0.0)
  gamma = _pairs(obj, "gamma", domains, path, default=1.0, strict=True)
  noise = _number(obj.get("noise", 0.01), path, "noise", lower=0.0)
  floor = _number(obj.get("floor", 0.05), path, "floor", lower=0.0)
  if floor * len(domains) > 1:
    raise _err(path, f"'floor' {floor} x {len(domains)} domains exceeds the whole budget")
  return PlantedLaw(list(domains), Law(E=E, A=A, beta=beta, tau=tau, gamma=gamma), available, noise, floor,
                    _design(obj, path), str(path))


def read_law(spec) -> PlantedLaw:
  """A law file path, or 'example:NAME' for a built-in example (see EXAMPLES)."""
  text = str(spec)
  if text.startswith("example:"):
    name = text.removeprefix("example:")
    if name not in EXAMPLES:
      raise _err(text, f"no built-in law {name!r}; examples are {sorted(EXAMPLES)}")
    return parse_law(EXAMPLES[name], text)
  return parse_law(fileio.read_json(Path(text), "law file"), text)


def without_transfer(planted: PlantedLaw) -> PlantedLaw:
  """The same truth with every tau set to 0 (the control in which knowing the transfer cannot help)."""
  law = planted.law._replace(tau=np.zeros_like(planted.law.tau))
  return PlantedLaw(planted.domains, law, planted.available, planted.noise, planted.floor, planted.design,
                    planted.source + " (tau = 0)")
