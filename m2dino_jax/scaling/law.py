"""The transfer-aware scaling law and its file, fits.json.

Our formulation (the paper's equations are not public; see REFERENCE.md 1.3):
  self law        L_i(D) = E_i + A_i * D^(-beta_i)                  E >= 0, A > 0, beta > 0
  effective data  D_eff_i(x) = x_i + sum_{j != i} tau_ij * x_j^gamma_ij     tau >= 0 (not symmetric)
  mixture loss    L_i(D_eff_i(x))
tau[i][j] is the transfer from source j to target i; the diagonal is ignored. gamma defaults to 1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from m2dino_jax import fileio
from m2dino_jax.errors import DataError


class Law(NamedTuple):
  """Parameters of the law for n domains (numpy or JAX arrays)."""
  E: object      # (n,)
  A: object      # (n,)
  beta: object   # (n,)
  tau: object    # (n, n), tau[i, j]: transfer j -> i; diagonal ignored
  gamma: object  # (n, n), exponent on x_j; ones for the plain model


def effective_data(law: Law, x, xp=jnp):
  """D_eff (..., n) for data counts x (..., n)."""
  n = law.tau.shape[-1]
  off = 1.0 - xp.eye(n)
  xg = xp.maximum(x, 0.0)[..., None, :] ** law.gamma  # (..., i, j) = x_j^gamma_ij
  return x + xp.sum(law.tau * off * xg, axis=-1)


def predict_loss(law: Law, x, xp=jnp):
  """Per-domain predicted loss (..., n) of a run that trained on counts x (..., n)."""
  return law.E + law.A * effective_data(law, x, xp) ** (-law.beta)


def self_loss(law: Law, d, xp=jnp):
  return law.E + law.A * xp.asarray(d) ** (-law.beta)


class Fits(NamedTuple):
  """fits.json in memory."""
  domains: list[str]
  law: Law               # numpy arrays
  available: np.ndarray  # (n,), inf = unlimited
  extra: dict            # confidence intervals, settings, diagnostics


def _null_inf(values):
  return [None if not math.isfinite(v) else float(v) for v in values]


def write_fits(path, fits: Fits) -> Path:
  law = fits.law
  obj = {"domains": list(fits.domains),
         "E": np.asarray(law.E).tolist(), "A": np.asarray(law.A).tolist(),
         "beta": np.asarray(law.beta).tolist(), "tau": np.asarray(law.tau).tolist(),
         "gamma": np.asarray(law.gamma).tolist(), "available": _null_inf(np.asarray(fits.available)),
         **fits.extra}
  return fileio.write_json(path, obj)


def read_fits(path) -> Fits:
  """Reads and validates fits.json; raises DataError naming the file and the bad key."""
  path = Path(path)
  obj = fileio.read_json(path, "fits file")
  if not isinstance(obj, dict):
    raise DataError(path, "expected a JSON object")
  for key in ("domains", "E", "A", "beta", "tau"):
    if key not in obj:
      raise DataError(path, f"missing key '{key}'")
  domains = obj["domains"]
  if not isinstance(domains, list) or not domains or not all(isinstance(d, str) and d for d in domains):
    raise DataError(path, "'domains' must be a non-empty list of names")
  if len(set(domains)) != len(domains):
    raise DataError(path, "'domains' has duplicates")
  n = len(domains)

  def array(key, shape, default=None, lower=None, strict=False):
    value = obj.get(key, default)
    try:
      arr = np.array([np.inf if v is None else v for v in value] if key == "available" else value,
                     dtype=np.float64)
    except (TypeError, ValueError):
      raise DataError(path, f"'{key}' must be numbers of shape {shape}") from None
    if arr.shape != shape:
      raise DataError(path, f"'{key}' must have shape {shape}, got {arr.shape}")
    if np.isnan(arr).any() or (key != "available" and not np.isfinite(arr).all()):
      raise DataError(path, f"'{key}' must be finite")
    if lower is not None and ((arr < lower).any() or (strict and (arr <= lower).any())):
      raise DataError(path, f"'{key}' must be {'>' if strict else '>='} {lower}")
    return arr

  law = Law(E=array("E", (n,), lower=0.0), A=array("A", (n,), lower=0.0, strict=True),
            beta=array("beta", (n,), lower=0.0, strict=True), tau=array("tau", (n, n), lower=0.0),
            gamma=array("gamma", (n, n), default=np.ones((n, n)).tolist(), lower=0.0, strict=True))
  available = array("available", (n,), default=[None] * n, lower=0.0, strict=True)
  extra = {k: v for k, v in obj.items()
           if k not in ("domains", "E", "A", "beta", "tau", "gamma", "available")}
  return Fits(list(domains), law, available, extra)
