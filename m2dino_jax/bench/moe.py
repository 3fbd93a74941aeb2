"""One MoE FFN layer, forward+backward: each dispatch back-end vs a dense FFN of equal active FLOPs.

Part 1 (this process): E experts, top-k, ViT-S width (384, hidden 1536), 197 tokens x batch 32 by
default. The dense baseline is one FFN of width k * hidden, so every token does the same expert FLOPs
as in the MoE; the ratio MoE / dense shows the routing and dispatch overhead (capacity back-ends also pay
for the capacity-factor padding). Training mode (capacity factor 1.25); the loss includes the
auxiliary losses.
Part 2 (subprocesses with XLA_FLAGS=--xla_force_host_platform_device_count=n): the expert-parallel
back-end on meshes expert = n for n in --devices; time per step and the bytes moved by all_to_all,
summed over the all-to-all ops of the compiled HLO (per device and step; the CPU cost analysis has no
per-collective figure). Simulated devices share this machine's cores, so this shows the exchange's
overhead, not a real speed-up.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np

from m2dino_jax.bench import common

SMOKE = {"batch": 2, "tokens": 17, "dim": 32, "hidden": 64, "experts": 4, "repeats": 2, "devices": "1,2"}
BACKENDS = (("dense", "auto"), ("dropless", "blocked"), ("dropless", "ragged_dot"),
            ("expert_parallel", "auto"))
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "f64": 8, "s8": 1, "u8": 1, "pred": 1}


def add_args(p) -> None:
  p.add_argument("--batch", type=int, default=32, help="images per step")
  p.add_argument("--tokens", type=int, default=197, help="tokens per image (197 = ViT-S/16 at 224)")
  p.add_argument("--dim", type=int, default=384, help="model width")
  p.add_argument("--hidden", type=int, default=1536, help="hidden width of each expert FFN")
  p.add_argument("--experts", type=int, default=8, help="experts in the layer")
  p.add_argument("--top-k", type=int, default=2, help="experts per token")
  p.add_argument("--capacity-factor", type=float, default=1.25, help="capacity / even share")
  p.add_argument("--repeats", type=int, default=7, help="timed steps after the warm-up")
  p.add_argument("--devices", default="1,2,4,8", help="expert-parallel scaling points ('' to skip)")


def _settings(args) -> dict:
  return {k: getattr(args, k) for k in ("batch", "tokens", "dim", "hidden", "experts", "top_k",
                                        "capacity_factor", "repeats")}


def _moe(s: dict, backend: str, grouped: str, mesh=None):
  from flax import nnx

  from m2dino_jax.models.moe import MoEFFN, default_moe_config
  cfg = default_moe_config()
  cfg.update({"enabled": True, "num_experts": s["experts"], "top_k": s["top_k"], "backend": backend,
              "grouped_matmul": grouped, "capacity_factor": s["capacity_factor"]})
  return MoEFFN(s["dim"], s["hidden"], cfg, 4, rngs=nnx.Rngs(0), mesh=mesh)


def _inputs(s: dict):
  import jax
  import jax.numpy as jnp
  kx, kc = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (s["batch"], s["tokens"], s["dim"]), jnp.float32)
  cot = jax.random.normal(kc, x.shape, jnp.float32)
  return x, jnp.arange(s["batch"], dtype=jnp.int32) % 4, cot


def _moe_step(model, x, task_ids, cot, shardings=None):
  """A compiled fwd+bwd of sum(y * cot) + aux_loss; returns (step(), compiled, drop fraction)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  graphdef, state = nnx.split(model)
  if shardings is not None:
    state, (x, task_ids, cot) = jax.device_put(state, shardings[0]), jax.device_put((x, task_ids, cot),
                                                                                    shardings[1])

  def loss(state, x, t, cot):
    y, aux = nnx.merge(graphdef, state)(x, t, train=True)
    return jnp.sum(y * cot) + aux["aux_loss"], aux["drop_fraction"]

  t0 = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).lower(
      state, x, task_ids, cot).compile()
  compiled.compile_s = time.perf_counter() - t0
  step = lambda: jax.block_until_ready(compiled(state, x, task_ids, cot))
  drop = float(step()[0][1])
  return step, compiled, drop


def _dense_ffn_step(s: dict, x, cot):
  """Plain FFN with width k * hidden (same active FLOPs as the MoE), fwd+bwd."""
  import jax
  import jax.numpy as jnp
  width = s["top_k"] * s["hidden"]
  k1, k2 = jax.random.split(jax.random.key(2))
  params = {"w1": 0.02 * jax.random.normal(k1, (s["dim"], width)), "b1": jnp.zeros(width),
            "w2": 0.02 * jax.random.normal(k2, (width, s["dim"])), "b2": jnp.zeros(s["dim"])}

  def loss(p, x):
    h = jax.nn.gelu(x @ p["w1"] + p["b1"], approximate=False)
    return jnp.sum((h @ p["w2"] + p["b2"]) * cot)

  fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return lambda: jax.block_until_ready(fn(params, x))


def all_to_all_bytes(hlo_text: str) -> tuple[int, int]:
  """(number of all-to-all ops, bytes of their results) in a compiled HLO module's text."""
  count = total = 0
  for line in hlo_text.splitlines():
    m = re.search(r"=\s*(.*?)\s+all-to-all(?:-start)?\(", line)
    if not m:
      continue
    count += 1
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1)):
      n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      total += n * _DTYPE_BYTES.get(dtype, 4)
  return count, total


time_interleaved = common.time_interleaved


def _single_device_rows(s: dict) -> list[dict]:
  x, task_ids, cot = _inputs(s)
  active_gflop = 3 * 2 * 2 * s["batch"] * s["tokens"] * s["top_k"] * s["dim"] * s["hidden"] / 1e9
  steps = {f"dense FFN (width {s['top_k'] * s['hidden']})": _dense_ffn_step(s, x, cot)}
  drops, compile_s = {}, {}
  for backend, grouped in BACKENDS:
    name = f"moe {backend}" + (f" ({grouped})" if backend == "dropless" else "")
    name += " (1 device)" if backend == "expert_parallel" else ""
    steps[name], compiled, drops[name] = _moe_step(_moe(s, backend, grouped), x, task_ids, cot)
    compile_s[name] = compiled.compile_s
  times = time_interleaved(steps, s["repeats"])
  base = next(iter(times.values()))
  return [{"name": name, "median_s": t["median_s"], "min_s": t["min_s"], "repeats": t["repeats"],
           "vs_dense": t["median_s"] / base["median_s"], "vs_dense_min": t["min_s"] / base["min_s"],
           "drop_fraction": drops.get(name, 0.0), "active_gflop": active_gflop,
           "tflops_per_device": active_gflop / 1e3 / t["median_s"], "compile_s": compile_s.get(name)}
          for name, t in times.items()]


def scaling_point(s: dict) -> dict:
  """Expert-parallel fwd+bwd on every local device (mesh expert = n); run with n forced CPU devices."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from m2dino_jax.mesh import PRESETS, make_mesh, state_shardings
  n = jax.device_count()
  mesh = make_mesh({"expert": n})
  model = _moe(s, "expert_parallel", "auto", mesh=mesh)
  from flax import nnx
  state = nnx.state(model)
  batch = NamedSharding(mesh, P(("data", "fsdp", "expert")))
  step, compiled, drop = _moe_step(model, *_inputs(s),
                                   shardings=(state_shardings(state, mesh, PRESETS["ep"]), batch))
  t = common.time_fn(step, repeats=s["repeats"])
  ops, nbytes = all_to_all_bytes(compiled.as_text())
  sent = nbytes * (n - 1) / n                       # the share of each buffer that leaves the device
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {"name": f"expert_parallel on {n} device(s)", "devices": n, "median_s": t["median_s"],
          "min_s": t["min_s"], "repeats": t["repeats"], "compile_s": compiled.compile_s, "all_to_all_ops": ops,
          "all_to_all_MB_per_device": nbytes / 2**20,
          "all_to_all_MB_sent_per_device": sent / 2**20, "drop_fraction": drop,
          "hlo_bytes_accessed_MB": float((cost or {}).get("bytes accessed", float("nan"))) / 2**20}


def _scaling_rows(s: dict, devices: list[int]) -> list[dict]:
  rows = []
  for n in devices:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    code = ("import json, sys; from m2dino_jax.bench.moe import scaling_point; "
            "print(json.dumps(scaling_point(json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(s)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
      raise RuntimeError(f"scaling point {n} devices failed:\n{proc.stderr[-3000:]}")
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"  expert-parallel on {n} device(s): {rows[-1]['median_s']:.3g} s/step", flush=True)
  return rows


def run(args) -> int:
  import jax
  s = _settings(args)
  print(f"MoE layer E={s['experts']} top-{s['top_k']} dim {s['dim']} hidden {s['hidden']}, "
        f"{s['tokens']} tokens x batch {s['batch']}, capacity factor {s['capacity_factor']}, "
        f"fwd+bwd, {jax.default_backend()}")
  rows = _single_device_rows(s)
  common.print_table(rows, ["name", "median_s", "min_s", "vs_dense", "vs_dense_min", "drop_fraction",
                            "active_gflop", "compile_s"])
  best = min(rows[1:], key=lambda r: r["median_s"])
  print(f"best back-end: {best['name']} at {best['vs_dense']:.2f}x the dense FFN")
  devices = [int(d) for d in str(args.devices).split(",") if d.strip()]
  scaling = _scaling_rows(s, devices) if devices else []
  if scaling:
    common.print_table(scaling, ["name", "median_s", "all_to_all_ops", "all_to_all_MB_per_device",
                                 "all_to_all_MB_sent_per_device", "hlo_bytes_accessed_MB", "drop_fraction"])
  ratios = {f"{r['name']} / dense": r["vs_dense"] for r in rows[1:]}
  if len(scaling) > 1:
    ratios.update({f"expert_parallel {r['devices']} / {scaling[0]['devices']} devices":
                   r["median_s"] / scaling[0]["median_s"] for r in scaling[1:]})
  compile_s = {r["name"]: r["compile_s"] for r in rows + scaling if r.get("compile_s")}
  common.write_results(args, "moe", rows + scaling, settings_used=s, best=best["name"], ratios=ratios,
                       compile_s=compile_s, shapes={k: s[k] for k in ("batch", "tokens", "dim", "hidden", "experts",
                                                                       "top_k")})
  return 0
