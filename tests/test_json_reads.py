"""JSON files the library reads go through fileio.read_json: a broken one is a DataError naming the file."""

from pathlib import Path

import grain
import pytest

from m2dino_jax.errors import DataError
from m2dino_jax.models import convert
from m2dino_jax.train import distributed

BROKEN = '{"depth": 2,'  # cut off mid-object


def test_broken_encoder_json_names_the_file(tmp_path):
  (tmp_path / "encoder.json").write_text(BROKEN)
  with pytest.raises(DataError, match=r"encoder\.json: not valid JSON \(Expecting") as e:
    convert.load_encoder_params(tmp_path)
  assert e.value.path == str(tmp_path / "encoder.json")


def test_broken_iterator_state_names_the_file(tmp_path):
  """The elastic restore (this process's own file missing) reads every process's state file."""
  (tmp_path / "process_0-of-2.json").write_text('{"next_index": 4}')
  (tmp_path / "process_1-of-2.json").write_text(BROKEN)
  it = iter(grain.MapDataset.range(8).to_iter_dataset())
  with pytest.raises(DataError, match=r"process_1-of-2\.json: not valid JSON") as e:
    distributed.ElasticIteratorHandler().restore(Path(tmp_path), item=it)
  assert e.value.path == str(tmp_path / "process_1-of-2.json")


def test_atomic_dir_replaces_the_folder_only_on_success(tmp_path):
  from m2dino_jax import fileio
  dest = tmp_path / "data"
  dest.mkdir()
  (dest / "old.txt").write_text("old")
  with pytest.raises(RuntimeError):
    with fileio.atomic_dir(dest) as tmp:
      (tmp / "new.txt").write_text("half")
      raise RuntimeError("simulated crash")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary folder left
  assert [p.name for p in dest.iterdir()] == ["old.txt"]
  with fileio.atomic_dir(dest) as tmp:
    (tmp / "new.txt").write_text("new")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
  assert [p.name for p in dest.iterdir()] == ["new.txt"]
