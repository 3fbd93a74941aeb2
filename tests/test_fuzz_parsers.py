"""Property-based fuzzing (hypothesis, bounded examples) of the parsers that read user input: images, FMC_UIA
CSVs, JSON / JSONL files and config overrides. Every input either parses to a value of the expected kind or
raises the project's own error naming the file (and row) or config key; nothing else escapes.

Needs `hypothesis` (a test dependency); skipped where it is not installed."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tempfile
from pathlib import Path

import ml_collections
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from m2dino_jax import configlib, fileio  # noqa: E402
from m2dino_jax.data import imageio  # noqa: E402
from m2dino_jax.data.adapters import fmc_uia  # noqa: E402
from m2dino_jax.errors import ConfigError, DataError  # noqa: E402
from m2dino_jax.scaling import measurements  # noqa: E402
from tests.test_adapters import write_fmc  # noqa: E402

FAST = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _encoded(fmt: str, rgb: bool) -> bytes:
  rng = np.random.default_rng(0)
  arr = (rng.random((12, 16, 3) if rgb else (12, 16)) * 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format=fmt)
  return buf.getvalue()


SEEDS = {("png", False): _encoded("PNG", False), ("png", True): _encoded("PNG", True),
         ("jpg", True): _encoded("JPEG", True)}


@st.composite
def mutated(draw, seed: bytes) -> bytes:
  data = bytearray(seed)
  op = draw(st.sampled_from(["truncate", "flip", "splice", "random"]))
  if op == "truncate":
    return bytes(data[:draw(st.integers(0, len(data)))])
  if op == "flip":
    for i in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=16)):
      data[i] ^= draw(st.integers(1, 255))
    return bytes(data)
  if op == "splice":
    at = draw(st.integers(0, len(data)))
    return bytes(data[:at] + draw(st.binary(max_size=64)) + data[at:])
  return draw(st.binary(max_size=256))


@FAST
@given(st.sampled_from(sorted(SEEDS)), st.data())
def test_image_reader_returns_an_image_or_a_data_error_naming_the_file(kind, data):
  blob = data.draw(mutated(SEEDS[kind]))
  folder = Path(tempfile.mkdtemp())
  try:
    path = folder / f"img.{kind[0]}"
    path.write_bytes(blob)
    for read in (imageio.read_image, imageio.read_mask):
      try:
        arr = read(path)
      except DataError as e:
        assert str(e).startswith(str(path))
      else:
        assert isinstance(arr, np.ndarray) and arr.ndim in (2, 3) and arr.size > 0
  finally:
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def fmc_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("fmc")
  write_fmc(root)
  return root


CELL = st.one_of(st.text(st.characters(exclude_characters="\r\n"), max_size=12),
                 st.sampled_from(["", "nan", "-1", "1e309", "[1, 2]", "[\"a\"]", "3.5", "../../../etc/passwd", "99",
                                  "0"]))


@settings(FAST, max_examples=30)
@given(st.data())
def test_fmc_csv_cell_edits_give_records_or_a_data_error_naming_file_and_row(fmc_root, data):
  src = fmc_root / "data" / "train" / "csv_files"
  work = Path(tempfile.mkdtemp())
  try:
    folder = work / "data" / "train" / "csv_files"
    shutil.copytree(fmc_root / "data", work / "data")
    name = data.draw(st.sampled_from(sorted(p.name for p in src.glob("*.csv"))))
    with open(folder / name, newline="") as f:
      rows = list(csv.reader(f))
    r = data.draw(st.integers(1, len(rows) - 1))
    c = data.draw(st.integers(0, len(rows[0]) - 1))
    rows[r][c] = data.draw(CELL)
    with open(folder / name, "w", newline="") as f:
      csv.writer(f).writerows(rows)
    try:
      recs = list(fmc_uia.read_folder(folder))
    except DataError as e:
      assert re.match(rf"{re.escape(str(folder / name))} row {r + 1}: ", str(e)), e
    else:
      assert recs and all(rec.image.size > 0 for rec in recs)
  finally:
    shutil.rmtree(work)


@FAST
@given(st.binary(max_size=200) | st.text(max_size=80).map(str.encode))
def test_json_reader_parses_or_names_the_file(blob):
  folder = Path(tempfile.mkdtemp())
  try:
    path = folder / "x.json"
    path.write_bytes(blob)
    try:
      obj = fileio.read_json(path)
    except DataError as e:
      assert str(e).startswith(str(path))
    else:
      assert json.loads(blob) == obj or obj != obj  # NaN literals compare unequal
  finally:
    shutil.rmtree(folder)


GOOD_ROW = {"run_id": "a", "data": {"ct": 10.0, "mr": 0.0}, "weights": {"ct": 1.0, "mr": 0.0}, "budget": 10.0,
            "step": 5, "loss": {"ct": 0.5, "mr": 0.9}, "available": {"ct": 20.0, "mr": 20.0}}
SCALAR = st.none() | st.booleans() | st.integers(-5, 50) | st.floats(allow_nan=True) | st.text(max_size=4)
JSON_VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=6)


@FAST
@given(st.sampled_from(sorted(GOOD_ROW)), JSON_VALUE, st.booleans())
def test_measurements_jsonl_rows_validate_or_name_file_and_row(key, value, drop):
  folder = Path(tempfile.mkdtemp())
  try:
    path = folder / "m.jsonl"
    bad = dict(GOOD_ROW)
    if drop:
      bad.pop(key)
    else:
      bad[key] = value
    path.write_text(json.dumps(GOOD_ROW) + "\n" + json.dumps({**bad, "run_id": "b"}) + "\n")
    try:
      rows = measurements.read_measurements(path)
    except DataError as e:
      assert str(e).startswith(f"{path} row 2"), e
    else:
      assert len(rows) == 2
  finally:
    shutil.rmtree(folder)


def _config():
  return configlib.load_config("configs/m2dino.py:paradigm=au,smoke,tasks=breast_2cls")


LEAVES = sorted(k for k, v in configlib._leaves(_config()))


@FAST
@given(st.sampled_from(LEAVES), st.text(max_size=16))
def test_config_override_sets_the_right_type_or_names_the_key(key, raw):
  config = _config()
  old = eval("config." + key)  # noqa: S307 (a dotted attribute path of our own config)
  try:
    configlib.set_key(config, key, raw)
  except ConfigError as e:
    assert e.key == key and str(e).startswith(f"config key '{key}'")
    return
  new = eval("config." + key)  # noqa: S307
  if isinstance(old, bool):
    assert isinstance(new, bool)
  elif isinstance(old, (int, float, str)):
    assert type(new) is type(old)
  elif isinstance(old, (tuple, list)):
    assert isinstance(new, (tuple, list))


@FAST
@given(st.text(alphabet="abcdefghij._", min_size=1, max_size=20), st.text(max_size=8))
def test_unknown_config_keys_are_named(key, raw):
  config = _config()
  try:
    configlib.set_key(config, key, raw)
  except ConfigError as e:
    assert e.key and key.startswith(e.key) and str(e).startswith(f"config key '{e.key}'")
  else:
    assert key in {k for k, _ in configlib._leaves(config)}


@FAST
@given(st.text(max_size=30))
def test_config_argument_parser_names_the_argument(arg):
  try:
    out = configlib.parse_arg(arg, paradigm="au", smoke=False, steps=-1)
  except ConfigError:
    return
  assert isinstance(out, ml_collections.ConfigDict) and isinstance(out.steps, int) and isinstance(out.smoke, bool)
