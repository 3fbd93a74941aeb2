"""`--config.profile.steps=A:B`: a jax.profiler trace holding exactly steps A .. B-1, for any trainer."""

from __future__ import annotations

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from m2dino_jax import main
from m2dino_jax.bench import profile
from m2dino_jax.errors import ConfigError
from m2dino_jax.train import loop


def _calls(logdir, name: str) -> int:
  """How many host-side calls of jitted function `name` the trace recorded (outermost spans: one call shows
  as nested PjitFunction spans)."""
  (trace,) = logdir.glob("plugins/profile/*/*.trace.json.gz")
  events = json.loads(gzip.open(trace).read())["traceEvents"]
  spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("name") == f"PjitFunction({name})")
  count, end = 0, float("-inf")
  for start, stop in spans:
    if start >= end:
      count, end = count + 1, stop
  return count


@pytest.mark.parametrize("window,calls", [("3:5", 2), ("1:2", 1)])
def test_trace_holds_exactly_the_chosen_steps(tmp_path, window, calls):
  def train_step(x):
    return jnp.tanh(x @ x)

  f = jax.jit(train_step)
  config = main.load_config("configs/features.py:smoke", [f"profile.steps={window}"])
  state = jnp.ones((32, 32))
  with profile.maybe_profile(config, tmp_path) as prof:
    assert prof in loop.AFTER_STEP_HOOKS
    for step in range(1, 7):  # what loop.run does: step, then the hooks
      state = f(state)
      for hook in loop.AFTER_STEP_HOOKS:
        hook(step, state, None)
  assert prof not in loop.AFTER_STEP_HOOKS and prof.done
  start, stop = map(int, window.split(":"))
  assert prof.steps == list(range(start, stop))
  assert _calls(tmp_path / "profile", "train_step") == calls
  assert list((tmp_path / "profile").glob("plugins/profile/*/perfetto_trace.json.gz"))


def test_profile_config_section_and_bad_values(tmp_path):
  assert main.load_config("configs/mae3d.py:smoke", []).profile.steps == ""
  with pytest.raises(ConfigError, match="'profile.step': unknown config key; did you mean 'steps'"):
    main.load_config("configs/mae3d.py:smoke", ["profile.step=1:2"])
  for bad in ("5", "0:3", "4:4", "a:b"):
    with pytest.raises(ConfigError, match="profile.steps"):
      profile.parse_steps(bad)
  assert profile.parse_steps("10:15") == (10, 15) and profile.parse_steps("") is None
  code = main.main(["--config=configs/mae3d.py:smoke", f"--workdir={tmp_path}", "--config.profile.steps=9"])
  assert code == 2 and not (tmp_path / "profile").exists()


@pytest.mark.slow
def test_profile_of_a_real_training_run(tmp_path, capsys):
  code = main.main(["--config=configs/mae3d.py:smoke", f"--workdir={tmp_path}", "--config.total_steps=4",
                    "--config.eval_at_start=False", "--config.profile.steps=2:4"])
  assert code == 0
  assert "profile of steps 2..3 written" in capsys.readouterr().err
  assert _calls(tmp_path / "profile", "train_step") == 2
  assert json.loads((tmp_path / "config.json").read_text())["profile"] == {"steps": "2:4"}
