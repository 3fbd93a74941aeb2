"""Config launcher: ARGS parsing, overrides, typo rejection, trainer dispatch."""

import json

import pytest

from m2dino_jax import cli, configlib, main
from m2dino_jax.errors import ConfigError


def test_parse_arg_types_and_flags():
  c = configlib.parse_arg("variant=B/16,smoke,steps=30,lr=0.5", variant="S/16", smoke=False, steps=10, lr=1e-3)
  assert (c.variant, c.smoke, c.steps, c.lr) == ("B/16", True, 30, 0.5)
  assert isinstance(c.steps, int) and isinstance(c.lr, float)
  assert configlib.parse_arg(None, smoke=False).smoke is False
  with pytest.raises(ConfigError, match="'smok'"):
    configlib.parse_arg("smok", smoke=False)
  with pytest.raises(ConfigError, match="'steps'.*bad value 'ten'"):
    configlib.parse_arg("steps=ten", steps=10)
  with pytest.raises(ConfigError, match="'variant': needs a value"):
    configlib.parse_arg("variant", variant="S/16")


def test_load_config_overrides_and_typos():
  c = configlib.load_config("configs/features.py:smoke", ["image_size=96", "model.kind=dinov2", "batch_size=2"])
  assert (c.image_size, c.model.kind, c.batch_size) == (96, "dinov2", 2)
  assert c.model.variant == "mu/16"
  with pytest.raises(ConfigError, match="'model.knd': unknown config key; did you mean 'kind'"):
    configlib.load_config("configs/features.py", ["model.knd=dinov3"])
  with pytest.raises(ConfigError, match="'image_size': bad value 'big'"):
    configlib.load_config("configs/features.py", ["image_size=big"])
  with pytest.raises(ConfigError, match="'nope.x'|'nope'"):
    configlib.load_config("configs/features.py", ["nope.x=1"])
  with pytest.raises(ConfigError, match="no config file"):
    configlib.load_config("configs/missing.py")


def test_split_overrides_forms():
  rest, ov = main.split_overrides(["--workdir=/w", "--config.a.b=1", "--config.c", "x", "--config=f.py"])
  assert rest == ["--workdir=/w", "--config=f.py"] and ov == ["a.b=1", "c=x"]


def test_main_reports_bad_key_in_one_line(tmp_path, capsys):
  code = main.main(["--config=configs/features.py:smoke", f"--workdir={tmp_path}", "--config.image_sise=3"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.count("\n") == 0 and "image_sise" in err
  code = main.main(["--config=configs/features.py:smoke", f"--workdir={tmp_path}", "--config.trainer=nope"])
  assert code == 2 and "unknown trainer 'nope'" in capsys.readouterr().err


def test_features_trainer_runs_on_real_dicom(tmp_path):
  """The launcher dispatches to the features trainer, which encodes pydicom's real US frames."""
  code = cli.main(["train", "--config=configs/features.py:smoke", f"--workdir={tmp_path}",
                   "--config.image_size=32"])
  assert code == 0
  summary = json.loads((tmp_path / "features.json").read_text())
  # US1_UNCR (1 frame) + gdcm-US-ALOKA-16 (1) + OBXXXX1A (1) = 3 real frames, grid 2x2 of 64-wide tokens
  assert summary["images"] >= 2 and summary["cls"] == [summary["images"], 64]
  assert summary["patch_tokens"] == [summary["images"], 4, 64]


def test_distributed_settings_from_config_and_environment(monkeypatch):
  from m2dino_jax.train import distributed
  for k in ("M2DINO_COORDINATOR", "M2DINO_NUM_PROCESSES", "M2DINO_PROCESS_ID"):
    monkeypatch.delenv(k, raising=False)
  c = configlib.load_config("configs/m2dino.py:smoke")
  assert distributed.settings(c) is None  # single process: nothing to start
  monkeypatch.setenv("M2DINO_COORDINATOR", "10.0.0.1:1234")
  monkeypatch.setenv("M2DINO_NUM_PROCESSES", "4")
  monkeypatch.setenv("M2DINO_PROCESS_ID", "3")
  assert distributed.settings(c) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  c = configlib.load_config("configs/m2dino.py:smoke", ["distributed.process_id=1", "distributed.num_processes=2"])
  assert distributed.settings(c) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
  assert distributed.settings(configlib.load_config("configs/m2dino.py", ["distributed.auto=True"])) == {}
