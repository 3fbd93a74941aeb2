"""One run per workdir and one config per run: the lock refuses a second live run in one line naming the holder,
a stale lock (its process died, even by SIGKILL) is taken over with one warning; a changed config on an existing
run is refused naming the keys (safe keys pass with resume_policy=override, the model never); bad config values
give one line naming the key, exit 2, and leave nothing behind."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from m2dino_jax import fileio, main
from m2dino_jax.errors import ConfigError
from m2dino_jax.train import workdir as workdir_lib
from tests.util import ROOT

CONFIG = "--config=configs/m2dino.py:paradigm=au,smoke,tasks=breast_2cls"
SMALL = ["--config.data.image_size=32", "--config.data.source.synthetic_count=16", "--config.data.batch_size=4",
         "--config.tensorboard=False"]


def _main(capfd, *args):
  capfd.readouterr()
  code = main.main([CONFIG, *SMALL, *args])
  err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
  return code, err


def test_second_run_on_a_locked_workdir_is_refused(tmp_path, capfd):
  work = tmp_path / "run"
  with workdir_lib.WorkdirLock(work):
    code, err = _main(capfd, f"--workdir={work}")
    assert code == 2 and len(err) == 1, err
    assert f"in use by another run: pid {os.getpid()} on host {socket.gethostname()}" in err[0]
    assert str(work / workdir_lib.LOCK) in err[0]
    assert sorted(p.name for p in work.iterdir()) == [workdir_lib.LOCK]  # nothing written by the refused run
  assert list(work.iterdir()) == []  # the lock goes with its holder


def test_lock_of_a_killed_run_is_stale_and_taken_over(tmp_path, capfd):
  work = tmp_path / "run"
  code = ("import os, signal, sys\n"
          "from m2dino_jax.train import workdir\n"
          "workdir.WorkdirLock(sys.argv[1]).acquire()\n"
          "print(os.getpid(), flush=True)\n"
          "os.kill(os.getpid(), signal.SIGKILL)\n")
  proc = subprocess.run([sys.executable, "-c", code, str(work)], cwd=ROOT, capture_output=True, text=True,
                        timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  dead = int(proc.stdout.split()[0])
  assert proc.returncode == -9 and json.loads((work / workdir_lib.LOCK).read_text())["pid"] == dead
  capfd.readouterr()
  lock = workdir_lib.WorkdirLock(work)
  lock.acquire()
  err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
  assert len(err) == 1 and f"taking over a stale lock of pid {dead} " in err[0], err
  info = json.loads((work / workdir_lib.LOCK).read_text())
  assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and "start" in info
  lock.release()
  assert not (work / workdir_lib.LOCK).exists()


def _write_run(work, *overrides):
  """config.json as a run writes it (the entry point's config, with its own sections such as `profile`)."""
  from m2dino_jax import main
  config = main.load_config(CONFIG.split("=", 1)[1], [o.removeprefix("--config.") for o in [*SMALL, *overrides]])
  workdir_lib.write_config(work, config)
  return (work / "config.json").read_bytes()


@pytest.mark.parametrize("change, key, hint", [
    ("--config.optim.lr=0.1", "optim.lr", "resume_policy=override"),
    ("--config.model.variant=S/16", "model.variant", "cannot change"),
    ("--config.data.image_size=64", "data.image_size", "cannot change"),
])
def test_changed_config_on_an_existing_run_is_refused_naming_the_key(tmp_path, capfd, change, key, hint):
  work = tmp_path / "run"
  before = _write_run(work)
  code, err = _main(capfd, f"--workdir={work}", change)
  assert code == 2 and len(err) == 1, err
  assert f"config key '{key}': differs from the run in {work}" in err[0] and hint in err[0]
  assert (work / "config.json").read_bytes() == before and not (work / workdir_lib.LOCK).exists()


def test_override_policy_accepts_safe_keys_only(tmp_path):
  work = tmp_path / "run"
  _write_run(work)
  from m2dino_jax import main
  safe = main.load_config(CONFIG.split("=", 1)[1], [o.removeprefix("--config.") for o in SMALL]
                          + ["total_steps=50", "optim.lr=0.01", "checkpoint.every=5"])
  with pytest.raises(ConfigError, match="checkpoint.every, optim.lr, total_steps"):
    workdir_lib.check_config(work, safe, "strict")
  workdir_lib.check_config(work, safe, "override")  # accepted
  unsafe = main.load_config(CONFIG.split("=", 1)[1], [o.removeprefix("--config.") for o in SMALL]
                            + ["total_steps=50", "moe.num_experts=8"])
  with pytest.raises(ConfigError, match="'moe.num_experts': differs .* 4 -> 8"):
    workdir_lib.check_config(work, unsafe, "override")


@pytest.mark.parametrize("args, needle", [
    (["--config.optim.lr=nan"], "config key 'optim.lr': is NaN"),
    (["--config.optim.lr=-1"], "config key 'optim.lr': -1.0 is out of range; expected a finite number > 0"),
    (["--config.optim.lr=inf"], "config key 'optim.lr': inf is out of range"),
    (["--config.checkpoint.every=-5"], "config key 'checkpoint.every': -5 is out of range"),
    (["--config.data.batch_size=0"], "config key 'data.batch_size': 0 is out of range; expected an integer >= 1"),
    (["--config.log_every=0"], "config key 'log_every': 0 is out of range"),
    (["--config.model.out_blocks=abc"], "config key 'model.out_blocks': bad value 'abc'; expected a tuple of int"),
    (["--config.tasks=nope"], "nope"),
    (["--config.resume_policy=maybe"], "config key 'resume_policy': 'maybe' is not one of strict, override"),
])
def test_bad_config_value_is_one_line_and_leaves_nothing(tmp_path, capfd, args, needle):
  work = tmp_path / "run"
  code, err = _main(capfd, f"--workdir={work}", *args)
  assert code == 2 and len(err) == 1 and needle in err[0], err
  assert not work.exists()


@pytest.mark.parametrize("text, needle", [
    ("def get_config(arg=None)\n  return 1\n", "line 1: syntax error"),
    ("import no_such_module_xyz\n", "fails to load (ModuleNotFoundError"),
])
def test_broken_config_file_is_one_line(tmp_path, capfd, text, needle):
  cfg = tmp_path / "broken.py"
  cfg.write_text(text)
  capfd.readouterr()
  code = main.main([f"--config={cfg}", f"--workdir={tmp_path / 'run'}"])
  err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
  assert code == 2 and len(err) == 1 and str(cfg) in err[0] and needle in err[0], err
  assert not (tmp_path / "run").exists()


def test_non_python_config_is_one_line(tmp_path, capfd):
  capfd.readouterr()
  code = main.main([f"--config={ROOT / 'README.md'}", f"--workdir={tmp_path / 'run'}"])
  err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
  assert code == 2 and len(err) == 1 and "README.md is not a Python config file" in err[0], err


def test_unwritable_workdir_is_one_line_naming_the_path(tmp_path, capfd, monkeypatch):
  """A read-only workdir (simulated: the tests run as root, which ignores permission bits)."""
  real_open = os.open

  def read_only(path, *a, **kw):
    if str(path).endswith(workdir_lib.LOCK):
      raise OSError(30, "Read-only file system", str(path))
    return real_open(path, *a, **kw)
  monkeypatch.setattr(workdir_lib.os, "open", read_only)
  work = tmp_path / "ro"
  work.mkdir()
  code, err = _main(capfd, f"--workdir={work}")
  assert code == 2 and len(err) == 1, err
  assert f"{work / workdir_lib.LOCK}: cannot create the workdir lock (Read-only file system)" in err[0]


def test_written_files_respect_the_umask(tmp_path):
  old = os.umask(0o027)
  try:
    fileio.write_json(tmp_path / "a.json", {"x": 1})
  finally:
    os.umask(old)
  assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
