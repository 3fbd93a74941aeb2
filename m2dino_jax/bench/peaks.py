"""Peak FLOP/s per device, for model FLOPs utilisation (MFU = achieved model FLOP/s / peak).

Accelerators: the vendors' dense bf16 matmul peaks per chip (no structured sparsity), matched on JAX's
`device_kind`. CPU has no meaningful vendor number, so its peak is measured: the best fp32 matmul
throughput of this machine through XLA (a practical ceiling for our steps, which run in fp32 on CPU),
or given with `--peak-tflops` / M2DINO_PEAK_TFLOPS. Every result records where its peak came from.
"""

from __future__ import annotations

import os
import re
import time

# (pattern on device_kind, lower-cased; name; dense bf16 TFLOP/s per chip)
PEAKS_BF16 = (
    (r"tpu v4", "TPU v4", 275.0),
    (r"tpu v5 ?lite|tpu v5e", "TPU v5e", 197.0),
    (r"tpu v5p|tpu v5$", "TPU v5p", 459.0),
    (r"tpu v6 ?lite|tpu v6e|trillium", "TPU v6e", 918.0),
    (r"a100", "NVIDIA A100", 312.0),
    (r"h100.*pcie", "NVIDIA H100 PCIe", 756.0),
    (r"h100", "NVIDIA H100 SXM", 989.0),
    (r"h200|gh200", "NVIDIA H200", 989.0),
)

_MEASURED: dict[tuple, float] = {}


def table_peak(device_kind: str) -> tuple[str, float] | None:
  """(name, bf16 TFLOP/s) for a known accelerator kind, else None."""
  kind = device_kind.lower().strip()
  for pattern, name, tflops in PEAKS_BF16:
    if re.search(pattern, kind):
      return name, tflops
  return None


def measure_cpu_tflops(size: int = 1024, repeats: int = 10) -> float:
  """Best fp32 matmul TFLOP/s of one JAX CPU device (size x size x size, compile excluded)."""
  key = (size, repeats)
  if key not in _MEASURED:
    import jax
    import jax.numpy as jnp
    a = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      t = time.perf_counter()
      f(a).block_until_ready()
      best = min(best, time.perf_counter() - t)
    _MEASURED[key] = 2 * size ** 3 / best / 1e12
  return _MEASURED[key]


def device_peak(device_kind: str, platform: str, override: float | None = None, smoke: bool = False) -> dict:
  """{'peak_tflops_per_device', 'peak_source', 'peak_dtype'} for this run's devices."""
  override = override if override else float(os.environ.get("M2DINO_PEAK_TFLOPS", "0") or 0)
  if override > 0:
    return {"peak_tflops_per_device": override, "peak_source": "given (--peak-tflops / M2DINO_PEAK_TFLOPS)",
            "peak_dtype": "as given"}
  known = table_peak(device_kind)
  if known:
    return {"peak_tflops_per_device": known[1], "peak_source": f"table: {known[0]} dense bf16",
            "peak_dtype": "bfloat16"}
  if platform == "cpu":
    size = 512 if smoke else 1024
    return {"peak_tflops_per_device": measure_cpu_tflops(size), "peak_source": f"measured: best fp32 "
            f"{size}^3 matmul through XLA on this CPU", "peak_dtype": "float32"}
  return {"peak_tflops_per_device": None, "peak_source": f"unknown device kind '{device_kind}': pass --peak-tflops",
          "peak_dtype": None}


def mfu(flops_per_step: float, seconds_per_step: float, devices: int, peak_tflops: float | None) -> float | None:
  """Model FLOPs utilisation of a step that does `flops_per_step` (all devices together)."""
  if not peak_tflops or not seconds_per_step or seconds_per_step <= 0:
    return None
  return flops_per_step / seconds_per_step / devices / (peak_tflops * 1e12)
