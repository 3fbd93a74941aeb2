"""The persistent compilation cache of training runs (train/compile_cache.py): where it lives, and that a
27-task run compiles one train and one eval program per task type plus a fixed set of helpers, and
nothing at all the second time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from m2dino_jax.errors import ConfigError
from m2dino_jax.tasks import registry
from m2dino_jax.train import compile_cache
from tests.util import ROOT

# the helpers a multitask run compiles besides its step programs: the state initialisation, the seed's
# key (jax.random.key on the host) and one data-side staging program
# and the finiteness check before a checkpoint save
HELPERS = {"jit(init)", "jit(_threefry_seed)", "jit(stage)", "jit(_finite_flags)"}


def test_resolve_precedence(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  folder, source = compile_cache.resolve("")
  assert source == "default" and folder == tmp_path / "xdg" / "m2dino_jax" / "xla" / compile_cache.host_tag()
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
  assert compile_cache.resolve("") == (tmp_path / "jax", "$JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
  assert compile_cache.resolve("") == (tmp_path / "env", f"${compile_cache.ENV}")
  assert compile_cache.resolve(str(tmp_path / "cfg")) == (tmp_path / "cfg", "config compile_cache")
  assert compile_cache.resolve("off")[0] is None
  monkeypatch.setenv(compile_cache.ENV, "off")
  assert compile_cache.resolve("")[0] is None


def test_unwritable_folder_is_a_config_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(ConfigError, match="compile_cache"):
    compile_cache.enable(str(blocker / "cache"), log=False)


def _train(workdir: Path, cache: Path, log: Path) -> dict:
  env = dict(os.environ, **{compile_cache.ENV: str(cache), compile_cache.LOG_ENV: str(log)})
  args = ["--config=configs/m2dino.py:paradigm=au,smoke,steps=1", f"--workdir={workdir}",
          "--config.data.image_size=32", "--config.data.source.synthetic_count=4", "--config.data.batch_size=2",
          "--config.data.eval_batch_size=4", "--config.tensorboard=False", "--config.checkpoint.every=1000"]
  proc = subprocess.run([sys.executable, "-m", "m2dino_jax.main", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=1500, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"compile cache: {cache}" in proc.stderr
  return json.loads(log.read_text())


@pytest.mark.slow
def test_all_tasks_compile_one_program_per_type_and_nothing_when_warm(tmp_path):
  cold = _train(tmp_path / "cold", tmp_path / "cache", tmp_path / "cold.json")
  names = [p["name"] for p in cold["log"]]
  types = sorted({t.type for t in registry.TASKS})
  assert len(types) == 4
  # every program once: one train and one eval program per task type, plus the helpers
  assert sorted(names) == sorted([f"jit(train_{t})" for t in types] + [f"jit(eval_{t})" for t in types]
                                 + list(HELPERS))
  assert cold["compiled"] == len(names) == 8 + len(HELPERS)
  warm = _train(tmp_path / "warm", tmp_path / "cache", tmp_path / "warm.json")
  assert warm["programs"] == cold["programs"] and warm["compiled"] == 0
  # the cached executables compute what the fresh ones did
  files = sorted(p.name for p in (tmp_path / "cold" / "all" / "eval").glob("*.json"))
  assert len(files) == 3  # STEP.json, STEP_moe.json, best.json
  for name in files:
    assert (json.loads((tmp_path / "cold" / "all" / "eval" / name).read_text())
            == json.loads((tmp_path / "warm" / "all" / "eval" / name).read_text())), name
