"""Bad input on the command line: each case exits 2 with one line naming the file or argument, runs no code from
the input, and writes nothing."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from m2dino_jax import cli


class _Evil:
  """A pickle that runs a command when loaded."""

  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _cli(capfd, *args):
  capfd.readouterr()
  code = cli.main(list(args))
  err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
  return code, err


def _hf_config(folder: Path, **cfg):
  folder.mkdir(parents=True, exist_ok=True)
  base = {"model_type": "dinov3_vit", "hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
          "intermediate_size": 128}
  (folder / "config.json").write_text(json.dumps({**base, **cfg}))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, capfd):
  src, marker = tmp_path / "hf", tmp_path / "PWNED"
  _hf_config(src)
  with open(src / "pytorch_model.bin", "wb") as f:
    pickle.dump({"x": _Evil(marker)}, f)
  code, err = _cli(capfd, "convert", "--hf", str(src), "--out", str(tmp_path / "out"))
  assert code == 2 and len(err) == 1, err
  assert f"{src / 'pytorch_model.bin'}: refused: loading it would run pickled code" in err[0]
  assert not marker.exists() and not (tmp_path / "out").exists()


def test_truncated_safetensors_is_one_line(tmp_path, capfd):
  from safetensors.numpy import save_file
  src = tmp_path / "hf"
  _hf_config(src)
  save_file({"w": np.zeros((64, 64), np.float32)}, str(src / "model.safetensors"))
  data = (src / "model.safetensors").read_bytes()
  (src / "model.safetensors").write_bytes(data[:len(data) // 2])
  code, err = _cli(capfd, "convert", "--hf", str(src), "--out", str(tmp_path / "out"))
  assert code == 2 and len(err) == 1 and f"{src / 'model.safetensors'}: cannot read weights" in err[0], err
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, needle", [
    ("{not json", "config.json: not valid JSON"),
    ("[1, 2]", "config.json: not a HF model config"),
    ('{"model_type": "dinov3_vit", "hidden_size": 64}', "config.json: missing num_attention_heads"),
])
def test_garbage_hf_config_is_one_line(tmp_path, capfd, text, needle):
  src = tmp_path / "hf"
  src.mkdir()
  from safetensors.numpy import save_file
  (src / "config.json").write_text(text)
  save_file({"w": np.zeros((2,), np.float32)}, str(src / "model.safetensors"))
  code, err = _cli(capfd, "convert", "--hf", str(src), "--out", str(tmp_path / "out"))
  assert code == 2 and len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("cfg, needle", [
    (dict(use_gated_mlp=True, hidden_act="gelu"), "hidden_act 'gelu' with a gated MLP is not implemented"),
    (dict(use_gated_mlp=False, hidden_act="silu"), "hidden_act 'silu' with a plain MLP is not implemented"),
    (dict(model_type="dinov2", hidden_act="silu"), "hidden_act 'silu' with a plain MLP is not implemented"),
    (dict(hidden_act="relu"), "hidden_act 'relu' with a plain MLP is not implemented"),
])
def test_unsupported_ffn_activation_pairs_are_refused(cfg, needle):
  """They used to convert into another function (a gated GELU checkpoint became SiLU-gated: 0.57 max diff)."""
  from m2dino_jax.errors import DataError
  from m2dino_jax.models import convert
  base = {"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 128}
  with pytest.raises(DataError, match=needle):
    convert.config_from_hf({**base, **cfg})
  ok = {**cfg, "hidden_act": "silu" if cfg.get("use_gated_mlp") else "gelu"}
  assert convert.config_from_hf({**base, **ok}).ffn == ("swiglu" if cfg.get("use_gated_mlp") else "mlp")


def test_convert_of_a_missing_folder_names_it(tmp_path, capfd):
  code, err = _cli(capfd, "convert", "--hf", str(tmp_path / "missing_dir"), "--out", str(tmp_path / "out"))
  assert code == 2 and err == [f"m2dino convert: error: {tmp_path / 'missing_dir'}: no such file or folder"]


@pytest.mark.parametrize("args, needle", [
    (["data", "build", "--dataset", "nope", "--manual-dir", "/tmp", "--data-dir", "/tmp/x"],
     "argument --dataset: invalid choice: 'nope'"),
    (["scaling", "fit", "--bootstrap", "-3", "--measurements", "m.jsonl", "--out", "o"],
     "argument --bootstrap: -3 is out of range; expected an integer >= 0"),
    (["predict", "--workdir", "w", "--task", "fetal_head", "--input", "x", "--out", "o", "--batch-size", "0"],
     "argument --batch-size: 0 is out of range; expected an integer >= 1"),
    (["convert", "--out", "o"], "one of the arguments --hf --pth is required"),
])
def test_bad_arguments_are_one_line(capfd, args, needle):
  with pytest.raises(SystemExit) as e:
    _cli(capfd, *args)
  err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
  assert e.value.code == 2 and len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("config, tasks, needle", [
    ('{"paradigm": "au"', None, "config.json: not valid JSON"),
    ("[1, 2]", None, "config.json: not a training run's config"),
    ('{"model": {}, "data": {}}', "[]", "tasks.json: not a model file"),
    ('{"model": {}, "data": {}}', '{"model": "all"', "tasks.json: not valid JSON"),
])
def test_predict_on_a_corrupt_run_is_one_line(tmp_path, capfd, config, tasks, needle):
  run = tmp_path / "run"
  (run / "all").mkdir(parents=True)
  (run / "config.json").write_text(config)
  if tasks is not None:
    (run / "all" / "tasks.json").write_text(tasks)
  code, err = _cli(capfd, "predict", "--workdir", str(run), "--task", "fetal_head", "--input", str(tmp_path),
                   "--out", str(tmp_path / "out"))
  assert code == 2 and len(err) == 1 and needle in err[0], err
  assert not (tmp_path / "out").exists()
