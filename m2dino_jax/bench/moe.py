"""One MoE FFN layer, forward+backward: each dispatch back-end vs a dense FFN of equal active FLOPs.

Part 1 (this process, JAX's default device): E experts, top-k, ViT-S width (384, hidden 1536), 197 tokens x
batch 32 by default. The dense baseline is one FFN of width k * hidden, so every token does the same expert
FLOPs as in the MoE; the ratio MoE / dense shows the routing and dispatch overhead (capacity back-ends also pay
for the capacity-factor padding). Training mode (capacity factor 1.25); the loss includes the auxiliary losses.
Part 2: the expert-parallel back-end on meshes expert = n for n in --devices; time per step and the bytes moved
by all_to_all, summed over the all-to-all ops of the compiled HLO (per device and step; the CPU cost analysis
has no per-collective figure). On a GPU / TPU host the points run on the first n accelerators (points above the
host's count are skipped); on a CPU host each point runs in a subprocess with n simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=n), which share this machine's cores, so they show the
exchange's overhead, not a real speed-up. Each row says which (`runs_on`).

Every row: TFLOP/s per device and MFU (bench/common.throughput, bench/peaks.py) from the analytic matmul count of
the layer (fwd + bwd = 3 x fwd: top_k experts' two matmuls per token, plus the router's d x E for the MoE rows),
and XLA's count of the compiled program beside it. Simulated CPU devices get no MFU (they share one CPU, whose
peak is per machine, not per simulated device).
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


def layer_flops(s: dict, moe: bool = True) -> int:
  """Analytic matmul FLOPs of one fwd+bwd step of the layer (3 x forward): per token, top_k experts of two
  matmuls d x hidden (the dense baseline: one FFN of width top_k * hidden, the same count) and, for a MoE, the
  router d x E."""
  tokens = s["batch"] * s["tokens"]
  return 3 * 2 * tokens * (2 * s["top_k"] * s["dim"] * s["hidden"] + (s["dim"] * s["experts"] if moe else 0))


def _dense_ffn_step(s: dict, x, cot):
  """Plain FFN with width k * hidden (same active FLOPs as the MoE), fwd+bwd; returns (step(), compiled)."""
  import jax
  import jax.numpy as jnp
  width = s["top_k"] * s["hidden"]
  k1, k2 = jax.random.split(jax.random.key(2))
  params = {"w1": 0.02 * jax.random.normal(k1, (s["dim"], width)), "b1": jnp.zeros(width),
            "w2": 0.02 * jax.random.normal(k2, (width, s["dim"])), "b2": jnp.zeros(s["dim"])}

  def loss(p, x):
    h = jax.nn.gelu(x @ p["w1"] + p["b1"], approximate=False)
    return jnp.sum((h @ p["w2"] + p["b2"]) * cot)

  # value_and_grad, as the MoE steps: with grad alone XLA drops the second matmul's forward (the loss is linear
  # in it), and the baseline would do 5/6 of the MoE's expert FLOPs
  t0 = time.perf_counter()
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
  fn.compile_s = time.perf_counter() - t0
  return lambda: jax.block_until_ready(fn(params, x)), fn


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


def _single_device_rows(s: dict, args) -> list[dict]:
  x, task_ids, cot = _inputs(s)
  active_gflop = layer_flops(s, moe=False) / 1e9
  dense_name = f"dense FFN (width {s['top_k'] * s['hidden']})"
  steps, compiled = {}, {}
  steps[dense_name], compiled[dense_name] = _dense_ffn_step(s, x, cot)
  drops, compile_s = {}, {dense_name: compiled[dense_name].compile_s}
  for backend, grouped in BACKENDS:
    name = f"moe {backend}" + (f" ({grouped})" if backend == "dropless" else "")
    name += " (1 device)" if backend == "expert_parallel" else ""
    steps[name], compiled[name], drops[name] = _moe_step(_moe(s, backend, grouped), x, task_ids, cot)
    compile_s[name] = compiled[name].compile_s
  times = time_interleaved(steps, s["repeats"])
  base = next(iter(times.values()))
  dev = common.device_of(args)
  rows = []
  for name, t in times.items():
    fl = layer_flops(s, moe=name != dense_name)
    rows.append({"name": name, "median_s": t["median_s"], "min_s": t["min_s"], "repeats": t["repeats"],
                 "runs_on": f"1 x {dev['kind']} ({dev['backend']})",
                 "vs_dense": t["median_s"] / base["median_s"], "vs_dense_min": t["min_s"] / base["min_s"],
                 "drop_fraction": drops.get(name, 0.0), "active_gflop": active_gflop,
                 "gflop_per_step": fl / 1e9, "xla_gflop_per_step": (common.xla_flops(compiled[name]) or 0) / 1e9,
                 **common.throughput(args, images=s["batch"], seconds=t["median_s"], flops=fl,
                                     xla=common.xla_flops(compiled[name])),
                 "compile_s": compile_s.get(name)})
  return rows


def scaling_point(s: dict, n: int | None = None) -> dict:
  """Expert-parallel fwd+bwd on the first `n` devices (default: all; mesh expert = n): the time per step, the
  all-to-all traffic and XLA's FLOPs of the whole step."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from m2dino_jax.mesh import PRESETS, make_mesh, state_shardings
  n = n or jax.device_count()
  mesh = make_mesh({"expert": n}, jax.devices()[:n])
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
          "xla_flops": common.xla_flops(compiled),
          "hlo_bytes_accessed_MB": float((cost or {}).get("bytes accessed", float("nan"))) / 2**20}


def _simulated_point(s: dict, n: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
  code = ("import json, sys; from m2dino_jax.bench.moe import scaling_point; "
          "print(json.dumps(scaling_point(json.loads(sys.argv[1]))))")
  proc = subprocess.run([sys.executable, "-c", code, json.dumps(s)], capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"scaling point {n} devices failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def scaling_plan(devices: list[int], accelerator: bool, available: int) -> tuple[list[int], list[int], str]:
  """(points to run, points skipped, where): on an accelerator host the points that fit its devices, on the
  accelerators; on a CPU host every point, on simulated CPU devices."""
  if not accelerator:
    return list(devices), [], "simulated CPU devices (sharing this machine's cores)"
  return [n for n in devices if n <= available], [n for n in devices if n > available], "accelerators"


def _scaling_rows(s: dict, devices: list[int], args) -> tuple[list[dict], dict]:
  import jax
  accelerator = common.on_accelerator()
  run_n, skipped, where = scaling_plan(devices, accelerator, jax.device_count())
  kind = jax.devices()[0].device_kind
  if skipped:
    print(f"  expert-parallel: skipping {skipped} device(s): this host has {jax.device_count()} x {kind}",
          flush=True)
  rows = []
  for n in run_n:
    row = scaling_point(s, n) if accelerator else _simulated_point(s, n)
    fl = layer_flops(s)
    row.update({"runs_on": f"{n} x {kind} ({jax.default_backend()})" if accelerator else
                f"{n} simulated CPU device(s)", "gflop_per_step": fl / 1e9,
                "xla_gflop_per_step": (row["xla_flops"] or 0) / 1e9,
                **common.throughput(args, images=s["batch"], seconds=row["median_s"], flops=fl, xla=row["xla_flops"],
                                    devices=n, peak_applies=accelerator)})
    rows.append(row)
    print(f"  expert-parallel on {n} device(s) ({where}): {row['median_s']:.3g} s/step", flush=True)
  return rows, {"where": "accelerator" if accelerator else "cpu-simulated", "skipped": skipped}


def run(args) -> int:
  import jax
  s = _settings(args)
  print(f"MoE layer E={s['experts']} top-{s['top_k']} dim {s['dim']} hidden {s['hidden']}, "
        f"{s['tokens']} tokens x batch {s['batch']}, capacity factor {s['capacity_factor']}, "
        f"fwd+bwd, {jax.default_backend()}")
  rows = _single_device_rows(s, args)
  common.print_table(rows, ["name", "median_s", "min_s", "vs_dense", "vs_dense_min", "drop_fraction",
                            "gflop_per_step", "xla_gflop_per_step", "tflops_per_device", "mfu", "compile_s"])
  best = min(rows[1:], key=lambda r: r["median_s"])
  print(f"best back-end: {best['name']} at {best['vs_dense']:.2f}x the dense FFN")
  devices = [int(d) for d in str(args.devices).split(",") if d.strip()]
  scaling, scaling_info = _scaling_rows(s, devices, args) if devices else ([], {})
  if scaling:
    common.print_table(scaling, ["name", "runs_on", "median_s", "all_to_all_ops", "all_to_all_MB_per_device",
                                 "all_to_all_MB_sent_per_device", "tflops_per_device", "mfu", "drop_fraction"])
  ratios = {f"{r['name']} / dense": r["vs_dense"] for r in rows[1:]}
  if len(scaling) > 1:
    ratios.update({f"expert_parallel {r['devices']} / {scaling[0]['devices']} devices":
                   r["median_s"] / scaling[0]["median_s"] for r in scaling[1:]})
  compile_s = {r["name"]: r["compile_s"] for r in rows + scaling if r.get("compile_s")}
  common.write_results(args, "moe", rows + scaling, settings_used=s, best=best["name"], ratios=ratios,
                       compile_s=compile_s, scaling=scaling_info,
                       shapes={k: s[k] for k in ("batch", "tokens", "dim", "hidden", "experts", "top_k")})
  return 0
