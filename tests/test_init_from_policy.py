"""The init_from policy (convert.apply_init_from): strict by default (each architecture setting that differs from the
checkpoint is refused naming its config key and both values), `init_from_adopt=True` takes the checkpoint's
architecture, and a rerun of the same adopting command resumes (the adoption happens before the workdir's config
check, so the stored config.json equals the command's)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from m2dino_jax import configlib, main
from m2dino_jax.errors import ConfigError
from m2dino_jax.models import convert, vit

ROOT = Path(__file__).resolve().parents[1]
SPEC = "configs/m2dino.py:paradigm=au,smoke,tasks=breast_2cls"


def _save(tmp_path, cfg: vit.ViTConfig, name="enc"):
  return convert.save_encoder(vit.Encoder(cfg, rngs=nnx.Rngs(1)), tmp_path / name, "safetensors")


def _config(*overrides):
  return configlib.load_config(SPEC, list(overrides))


# (ViTConfig field, checkpoint value, config key named in the refusal): the settings issue 12 lists, plus the
# kind and the sizes (which a variant sets)
MISMATCHES = [("rope_theta", 10000.0, "model.rope_theta"), ("norm_eps", 1e-6, "model.norm_eps"),
              ("num_registers", 0, "model.num_registers"), ("ffn", "swiglu", "model.ffn"),
              ("key_bias", True, "model.key_bias"), ("kind", "dinov2", "model.kind"),
              ("depth", 5, "model.variant"), ("layerscale_init", None, "model.layerscale_init")]


@pytest.mark.parametrize("field,value,key", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_each_mismatched_setting_is_refused(tmp_path, field, value, key):
  ours = vit.ViTConfig.from_config(_config().model)
  extra = {"pos_grid": 2} if field == "kind" else {}
  path = _save(tmp_path, dataclasses.replace(ours, **{field: value}, **extra))
  config = _config(f"init_from={path}")
  with pytest.raises(ConfigError) as e:
    convert.apply_init_from(config, verbose=False)
  assert e.value.key.split(", ")[0] == key
  assert f"config {getattr(ours, field)!r}, checkpoint {value!r}" in str(e.value)
  assert "init_from_adopt=True" in str(e.value)
  # the model section is untouched by a refusal; with the opt-in the checkpoint's architecture is taken
  assert vit.ViTConfig.from_config(config.model) == ours
  config = _config(f"init_from={path}", "init_from_adopt=True")
  changed = convert.apply_init_from(config, verbose=False)
  assert field in changed and getattr(vit.ViTConfig.from_config(config.model), field) == value
  assert convert.apply_init_from(config, verbose=False) == {}  # idempotent: now it matches


def test_matching_checkpoint_passes_and_adopt_needs_a_checkpoint(tmp_path):
  path = _save(tmp_path, vit.ViTConfig.from_config(_config().model))
  config = _config(f"init_from={path}")
  before = config.to_json()
  assert convert.apply_init_from(config) == {} and config.to_json() == before
  with pytest.raises(ConfigError, match="'init_from_adopt'.*init_from is empty"):
    convert.apply_init_from(_config("init_from_adopt=True"))


SMALL = ["--config.data.image_size=32", "--config.data.source.synthetic_count=16", "--config.data.batch_size=4",
         "--config.data.eval_batch_size=8", "--config.tensorboard=False", "--config.total_steps=4",
         "--config.checkpoint.every=2", "--config.checkpoint.async_save=False", "--config.log_every=1"]


def _teacher(tmp_path):
  """A DINOv2-kind encoder with the smoke sizes (what an UltraDINO smoke teacher looks like)."""
  ours = vit.ViTConfig.from_config(_config().model)
  return _save(tmp_path, dataclasses.replace(ours, kind="dinov2", pos_grid=2, key_bias=True, norm_eps=1e-6,
                                             layerscale_init=None), "teacher")


def test_refusal_through_the_cli_leaves_nothing(tmp_path, capsys):
  work = tmp_path / "work"
  assert main.main([f"--config={SPEC}", f"--workdir={work}", f"--config.init_from={_teacher(tmp_path)}",
                    *SMALL]) == main.EXIT_BAD_INPUT
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "config key 'model.kind, " in err, err
  assert not work.exists()


@pytest.mark.slow
def test_adopting_run_resumes_on_the_same_command(tmp_path):
  teacher = _teacher(tmp_path)
  work = tmp_path / "work"
  args = [f"--config={SPEC}", f"--workdir={work}", f"--config.init_from={teacher}",
          "--config.init_from_adopt=True", *SMALL]
  first = subprocess.run([sys.executable, "tests/crash_run.py", "3", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
  assert first.returncode == 17, first.stderr[-3000:]  # killed after step 3; step 2 is checkpointed
  assert "[init_from] model architecture taken from" in first.stderr
  stored = json.loads((work / "config.json").read_text())
  assert (stored["model"]["kind"], stored["model"]["key_bias"], stored["init_from_adopt"]) == ("dinov2", True, True)
  again = subprocess.run([sys.executable, "-m", "m2dino_jax.main", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from step 2" in again.stderr
  assert json.loads((work / "config.json").read_text()) == stored
  assert json.loads((work / "all" / "done.json").read_text())["step"] == 4
