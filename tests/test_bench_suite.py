"""The benchmark suite: FLOP counts by hand and against XLA, peaks and MFU, the JSON schema, smoke settings,
the report, and (slow) `m2dino bench all --smoke` writing a valid result for every benchmark."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2dino_jax.bench import cli as bench_cli
from m2dino_jax.bench import common, flops, peaks, report, train
from m2dino_jax.errors import DataError
from tests.util import ROOT


def test_dino_and_mae_flops_by_hand():
  # dim 8, 1 block, mlp 16, patch 4, grey, 1 register; global 8 px = 4 patches (6 tokens), local 4 px = 1 (3)
  enc_global = 2 * 4 * 16 * 8 + (2 * 6 * 4 * 64 + 4 * 36 * 8 + 2 * 6 * 2 * 8 * 16)
  enc_local = 2 * 1 * 16 * 8 + (2 * 3 * 4 * 64 + 4 * 9 * 8 + 2 * 3 * 2 * 8 * 16)
  head = 2 * (8 * 10 + 10 * 10 + 10 * 3) + 2 * 3 * 5  # MLP 8-10-10-3, then 5 prototypes
  assert (enc_global, enc_local, head) == (8320, 3616, 450)
  f = flops.dino_step_flops(dim=8, depth=1, mlp_dim=16, patch=4, channels=1, registers=1, global_size=8,
                            local_size=4, num_local=2, max_masked=2, hidden=10, bottleneck=3, prototypes=5, nlayers=3)
  teacher = 2 * enc_global + 2 * (1 + 2) * head            # CLS + 2 masked patches per global crop
  student = 2 * enc_global + 2 * enc_local + (2 + 2 + 2 * 2) * head
  assert (f["teacher_fwd"], f["student_fwd"], f["train"]) == (teacher, student, teacher + 3 * student)
  assert f["train"] == 101756

  # 3D MAE: 4^3 crop, patch 2 -> 8 patches of 8 voxels, 2 kept; encoder dim 8 (1 block, mlp 16), decoder 4 (mlp 8)
  m = flops.mae3d_step_flops(dim=8, depth=1, mlp_dim=16, patch=2, crop=4, in_chans=1, mask_ratio=0.75, dec_dim=4,
                             dec_depth=1, dec_mlp_dim=8)
  embed = 2 * 8 * 8 * 8                                             # all 8 patches, 8 -> 8
  encoder = 2 * 3 * 4 * 64 + 4 * 9 * 8 + 2 * 3 * 2 * 8 * 16       # CLS + 2 kept
  dec_embed = 2 * 3 * 8 * 4
  decoder = 2 * 9 * 4 * 16 + 4 * 81 * 4 + 2 * 9 * 2 * 4 * 8      # CLS + 8
  pred = 2 * 9 * 4 * 8
  assert (m["patches"], m["kept"]) == (8, 2)
  assert m["fwd"] == embed + encoder + dec_embed + decoder + pred == 8752 and m["train"] == 3 * 8752


def test_encoder_flops_agree_with_the_train_benchmark_and_xla():
  kw = dict(dim=64, depth=4, mlp_dim=256, patch=16, image_size=64, channels=1)
  ours = flops.vit_forward_flops(**kw, prefix=3, moe_layers=(2, 3), experts=4, top_k=2)
  assert ours == train.train_flops_per_image(**kw, registers=2, moe_layers=(2, 3), num_experts=4)["encoder_fwd"]
  # XLA's count of a compiled forward (every op) sits a little above the matmul-only count
  from m2dino_jax.models import vit
  cfg = vit.ViTConfig.from_config({"variant": "mu/16", "in_chans": 1, "num_registers": 2})
  gdef, state = nnx.split(vit.Encoder(cfg, rngs=nnx.Rngs(0)))
  x = jnp.zeros((2, 64, 64, 1))
  compiled = jax.jit(lambda s, x: nnx.merge(gdef, s)(x)["cls"]).lower(state, x).compile()
  analytic = 2 * flops.vit_forward_flops(**kw, prefix=3)
  ratio = common.xla_flops(compiled) / analytic
  assert 1.0 <= ratio <= 1.25, ratio


def test_mae_step_flops_against_xla():
  from m2dino_jax.models import mae3d
  cfg = mae3d.MAE3DConfig(dim=64, depth=2, heads=2, mlp_dim=256, patch=4, crop=16, dec_dim=32, dec_depth=1,
                          dec_heads=2)
  gdef, params = nnx.split(mae3d.MAE3D(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  vol = jnp.zeros((2, 16, 16, 16, 1))
  loss = lambda p, v: nnx.merge(gdef, p)(v, jax.random.key(0))["loss"]
  compiled = jax.jit(jax.grad(loss)).lower(params, vol).compile()
  f = flops.mae3d_step_flops(dim=64, depth=2, mlp_dim=256, patch=4, crop=16, in_chans=1, mask_ratio=0.75,
                             dec_dim=32, dec_depth=1, dec_mlp_dim=128)
  ratio = common.xla_flops(compiled) / (2 * f["train"])
  assert 1.0 <= ratio <= 1.3, ratio


def test_peak_table_and_mfu(monkeypatch):
  kinds = {"TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5": 459, "TPU v5p": 459, "TPU v6 lite": 918,
           "NVIDIA A100-SXM4-80GB": 312, "NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H200": 989}
  for kind, tflops in kinds.items():
    assert peaks.table_peak(kind)[1] == tflops, kind
  assert peaks.table_peak("cpu") is None
  monkeypatch.delenv("M2DINO_PEAK_TFLOPS", raising=False)
  h100 = peaks.device_peak("NVIDIA H100 80GB HBM3", "gpu")
  assert h100 == {"peak_tflops_per_device": 989.0, "peak_source": "table: NVIDIA H100 SXM dense bf16",
                  "peak_dtype": "bfloat16"}
  assert peaks.device_peak("cpu", "cpu", override=2.5)["peak_tflops_per_device"] == 2.5
  monkeypatch.setenv("M2DINO_PEAK_TFLOPS", "4")
  assert peaks.device_peak("NVIDIA H100 80GB HBM3", "gpu")["peak_tflops_per_device"] == 4.0
  monkeypatch.delenv("M2DINO_PEAK_TFLOPS")
  cpu = peaks.device_peak("cpu", "cpu", smoke=True)
  assert cpu["peak_source"].startswith("measured") and 1e-3 < cpu["peak_tflops_per_device"] < 100
  # 989e12 FLOPs per step in 2 s on 4 H100s = 123.6 TFLOP/s per device = 12.5% MFU
  assert peaks.mfu(989e12, 2.0, 4, 989.0) == pytest.approx(0.125)
  args = argparse.Namespace(_device={"peak_tflops_per_device": 989.0})
  t = common.throughput(args, images=64, seconds=2.0, flops=989e12, xla=1.1 * 989e12, devices=4)
  assert t == pytest.approx({"images_per_s_per_device": 8.0, "tflops_per_device": 123.625,
                             "xla_tflops_per_device": 1.1 * 123.625, "mfu": 0.125})


def _result(name="demo", smoke=False, rows=None):
  args = argparse.Namespace(smoke=smoke, out="x.json", repeats=3, func=print,
                            _device={"backend": "cpu", "kind": "cpu", "count": 1, "local_count": 1,
                                     "process_count": 1, "peak_tflops_per_device": 0.2,
                                     "peak_source": "measured", "peak_dtype": "float32"})
  rows = rows or [{"name": "jax", "median_s": 0.5, "images_per_s_per_device": 16.0, "mfu": np.float32(0.125),
                   "tflops_per_device": 0.025}, {"name": "torch", "median_s": 1.0, "images_per_s_per_device": 8.0}]
  return common.result(args, name, rows, shapes={"batch": 8}, ratios={"jax_over_torch": np.float64(2.0)},
                       compile_s={"jax": 3.0})


def test_result_schema():
  obj = _result()
  assert common.validate(obj) == []
  assert obj["schema"] == "m2dino-bench/1" and obj["settings"] == {"smoke": False, "out": "x.json", "repeats": 3}
  assert obj["rows"][0]["mfu"] == 0.125 and isinstance(obj["rows"][0]["mfu"], float)
  assert obj["versions"]["jax"] == jax.__version__ and obj["device"]["kind"] == "cpu"
  json.dumps(obj)  # plain JSON
  bad = dict(obj, rows=[{"name": "x", "median_s": 0.0}])
  assert common.validate(bad) == ["rows[0] 'x': median_s must be a positive number or null"]
  assert common.validate({k: v for k, v in obj.items() if k != "device"}) == ["'device' missing or not dict"]
  assert common.validate(dict(obj, rows=[{"median_s": 1.0}])) == ["rows[0]: no 'name'"]


def test_smoke_settings_apply_unless_given():
  from m2dino_jax.bench import mae3d
  p = argparse.ArgumentParser()
  p.add_argument("--smoke", action="store_true")
  mae3d.add_args(p)
  args = p.parse_args(["--smoke", "--repeats", "6"])
  bench_cli.apply_smoke(args, mae3d, p)
  assert (args.shapes, args.devices, args.repeats) == ("smoke", 0, 6)
  full = p.parse_args([])
  bench_cli.apply_smoke(full, mae3d, p)
  assert (full.shapes, full.devices, full.repeats) == ("smoke,default", 8, 3)
  for name in bench_cli.BENCHMARKS:  # every benchmark has smoke settings naming real arguments
    mod = bench_cli._load(name)
    bp = argparse.ArgumentParser()
    mod.add_args(bp)
    dests = {a.dest for a in bp._actions}
    assert mod.SMOKE and set(mod.SMOKE) <= dests, name


def test_one_benchmark_per_step_and_the_old_names_are_aliases():
  """`dino` measured the step `ssl` measures, `mae` the one of `mae3d`: one module each, the old names run them."""
  assert {"ssl", "mae3d"} <= set(bench_cli.BENCHMARKS) and not {"dino", "mae"} & set(bench_cli.BENCHMARKS)
  p = argparse.ArgumentParser()
  bench_cli.register(p.add_subparsers())
  for alias, name in (("dino", "ssl"), ("mae", "mae3d")):
    args = p.parse_args(["bench", alias, "--smoke"])
    assert args.out == f"bench_results/{name}.json", alias
  assert p.parse_args(["bench", "dino"]).shapes == "smoke,paper"


def test_benchmark_flops_are_the_shared_counts():
  """bench ssl and bench mae3d count with bench/flops.py (no second formula to drift)."""
  import ml_collections

  from m2dino_jax.bench import mae3d, ssl
  from m2dino_jax.models import mae3d as mae3d_model
  cfg = mae3d_model.MAE3DConfig(dim=8, depth=1, heads=2, mlp_dim=16, patch=2, crop=4, dec_dim=4, dec_depth=1,
                                dec_heads=2, dec_mlp_ratio=2)
  m = mae3d.mae_flops_per_volume(cfg)
  assert (m["train"], m["tokens_encoder"], m["tokens_decoder"]) == (3 * 8752, 3, 9)  # test_dino_and_mae_flops_by_hand
  c = ml_collections.ConfigDict(dict(
      model=dict(dim=8, depth=1, heads=2, mlp_dim=16, patch=4, in_chans=1, num_registers=1, kind="dinov2",
                 pos_grid=2),
      data=dict(global_size=8, local_size=4, num_local=2),
      head=dict(prototypes=5, hidden_dim=10, bottleneck_dim=3, nlayers=3)))
  assert ssl.step_flops_per_image(c, max_masked=2)["total"] == 101756  # the by-hand count above


def test_report_renders_the_results(tmp_path):
  (tmp_path / "demo.json").write_text(json.dumps(_result()))
  (tmp_path / "tiny.json").write_text(json.dumps(_result("tiny", smoke=True, rows=[{"name": "a", "median_s": None,
                                                                                   "compile_s": 1.5}])))
  out = tmp_path / "PERF.md"
  assert report.run(argparse.Namespace(results=tmp_path, out=out)) == 0
  text = out.read_text()
  assert text.startswith("## Performance\n")
  assert f"jax {jax.__version__}" in text and "- devices: 1 x cpu (cpu)" in text
  assert "- peak for MFU: 0.2 TFLOP/s (measured)" in text
  assert "- **smoke sizes** (tiny)" in text
  assert ("| what | median s | images/s/device | TFLOP/s/device | MFU |\n|---|---|---|---|---|\n"
          "| jax | 0.5 | 16 | 0.025 | 12.5% |\n| torch | 1 | 8 |  |  |") in text
  assert "Ratios: jax_over_torch 2" in text and "Compile / first call (s): jax 3" in text
  assert "### tiny (smoke)" in text and "| a | 1.5 |" in text
  (tmp_path / "broken.json").write_text(json.dumps({"benchmark": "x"}))
  with pytest.raises(DataError, match="broken.json.*not a m2dino-bench/1 result"):
    report.load_results(tmp_path)


@pytest.mark.slow
def test_bench_all_smoke_writes_valid_json_for_every_benchmark(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "m2dino_jax.cli", "bench", "all", "--smoke", "--out-dir",
                         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  written = sorted(p.stem for p in tmp_path.glob("*.json"))
  assert written == sorted(bench_cli.BENCHMARKS)
  for name in written:
    obj = json.loads((tmp_path / f"{name}.json").read_text())
    assert common.validate(obj) == [] and obj["smoke"] is True and obj["benchmark"] == name
  assert "suite: encoder" in proc.stdout


def documented_examples() -> list[tuple[str, str]]:
  """(file, command) of every `m2dino bench ...` example in the bench package's sources: indented lines (an
  optional `taskset -c N` first; text after two or more spaces is a comment) and `backtick` spans; spans with a
  placeholder (NAME, a|b) are descriptions, not examples."""
  import re
  from pathlib import Path
  out = []
  for path in sorted((Path(ROOT) / "m2dino_jax" / "bench").glob("*.py")):
    for line in path.read_text().splitlines():
      m = re.match(r"^\s+(?:taskset -c \S+\s+)?(m2dino bench\b.*)$", line)
      if m:
        out.append((path.name, re.split(r"\s{2,}", m.group(1).strip())[0]))
      for span in re.findall(r"`(m2dino bench\b[^`]*)`", line):
        if "NAME" not in span and "|" not in span:
          out.append((path.name, span))
  return out


def test_documented_bench_examples_parse():
  """Each example in the bench docstrings is accepted by the real `m2dino` parser (a wrong flag such as
  `--dtype` for `bench train` exits 2)."""
  import shlex

  from m2dino_jax import cli
  examples = documented_examples()
  assert ("cli.py", "m2dino bench train --variant B/16 --jax bfloat16") in examples and len(examples) >= 8
  for where, example in examples:
    argv = shlex.split(example)[1:]
    try:
      args = cli.build_parser(argv).parse_args(argv)
    except SystemExit as e:
      raise AssertionError(f"{where}: `{example}` does not parse (exit {e.code})") from None
    assert args.command == "bench", example
  with pytest.raises(SystemExit):  # the example the audit found: argparse has no --dtype for bench train
    cli.build_parser(["bench"]).parse_args(["bench", "train", "--variant", "B/16", "--dtype", "bfloat16"])


README = """# m2dino

Intro.

## Performance

How the numbers are made.

```bash
# a comment in a code block is not a heading
m2dino bench all
```

## Next section

Kept as it is.
"""


def test_report_splices_the_section_into_a_readme(tmp_path, monkeypatch):
  """`bench report --readme`: markers created at the end of the Performance section, then only what is between
  them replaced on the next run; a README without the section gets it at the end; broken markers are refused;
  the write is atomic (a failed rename leaves the README as it was, no temporary file behind)."""
  results = tmp_path / "results"
  results.mkdir()
  (results / "demo.json").write_text(json.dumps(_result()))
  readme = tmp_path / "README.md"
  readme.write_text(README)
  args = argparse.Namespace(results=results, out=tmp_path / "PERF.md", readme=readme)
  assert report.run(args) == 0
  text = readme.read_text()
  head, rest = text.split(report.BEGIN + "\n")
  body, tail = rest.split("\n" + report.END + "\n")
  assert head == README.split("## Next section")[0]  # everything before the markers kept, byte for byte
  assert tail == "\n## Next section\n\nKept as it is.\n"
  assert body.startswith("Generated by `m2dino bench report` from 1 result file(s)") and "## Performance" not in body
  assert "- devices: 1 x cpu (cpu)" in body and "| jax | 0.5 | 16 | 0.025 | 12.5% |" in body
  assert body == report.render(report.load_results(results), heading=False).strip()

  # a second run with other numbers replaces the body only
  (results / "demo.json").write_text(json.dumps(_result(rows=[{"name": "jax", "median_s": 0.25}])))
  assert report.run(args) == 0
  again = readme.read_text()
  assert again.count(report.BEGIN) == again.count(report.END) == 1 and again.count("## Performance") == 1
  assert again.startswith(head + report.BEGIN + "\n") and again.endswith("\n" + report.END + "\n" + tail)
  assert "| jax | 0.25 |" in again and "| jax | 0.5 |" not in again

  # no Performance section: heading and markers appended
  assert report.splice("# Title\n\nText.\n", "BODY") == \
      f"# Title\n\nText.\n\n## Performance\n\n{report.BEGIN}\nBODY\n{report.END}\n"
  # broken markers: refused, the file untouched
  readme.write_text(README + report.BEGIN + "\n")
  with pytest.raises(DataError, match="README.md.*expected one"):
    report.run(args)
  assert readme.read_text() == README + report.BEGIN + "\n"

  # atomic: a failing rename leaves the old README and no temporary file
  readme.write_text(README)
  import os

  def fail(*a, **k):
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    report.splice_file(readme, "BODY")
  assert readme.read_text() == README and sorted(p.name for p in tmp_path.iterdir()) == \
      ["PERF.md", "README.md", "results"]
