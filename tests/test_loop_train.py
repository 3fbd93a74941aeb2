"""loop.train, the run sequence every trainer shares (checkpoint folder, resume, eval at start, the loop, the final
or preemption save), on a toy state and a Grain iterator: a run stopped by SIGTERM and resumed ends where an
uninterrupted run ends, with the same state (a sum over the batches that a loop over the numbers recomputes)."""

import os
import signal

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np

from m2dino_jax.train import core, loop

CKPT = ml_collections.ConfigDict(dict(every=2, keep=2, async_save=False))


def _state():
  return core.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros((), jnp.float32)}, opt_state={},
                         rng=jnp.asarray(core.seed_data(0)), extras={})


def _step(state, batch):
  w = state.params["w"] + batch
  return state.replace(step=state.step + 1, params={"w": w}), {"loss": w}


def _train(workdir, total, evaluated, term_at=None, eval_at_start=True):
  it = iter(grain.MapDataset.range(100).map(lambda i: np.float32(i)).to_iter_dataset())

  def step(state, batch):
    state, metrics = _step(state, batch)
    if int(state.step) == term_at:
      os.kill(os.getpid(), signal.SIGTERM)  # the loop's guard turns it into a preemption after this step
    return state, metrics
  writer = loop.MetricWriter(workdir, tensorboard=False)
  out = loop.train(workdir=workdir, state=_state(), batches=it, step_fn=step, total_steps=total, writer=writer,
                   checkpoint=CKPT, log_every=1, evaluate=lambda s, n: evaluated.append(n),
                   eval_at_start=eval_at_start, name="toy-run", label="toy")
  writer.close()
  return out


def test_preempted_run_resumes_to_the_uninterrupted_result(tmp_path, capfd):
  evaluated = []
  state, step, status = _train(tmp_path / "a", 6, evaluated, term_at=3)
  err = capfd.readouterr().err
  assert (step, status) == (3, loop.PREEMPTED) and evaluated == [0]
  assert "[toy] preempted at step 3: checkpoint written; rerun the same command to resume" in err
  assert (tmp_path / "a" / "ckpt" / "3").is_dir()  # the preemption save (every=2 saved step 2)
  state, step, status = _train(tmp_path / "a", 6, evaluated)
  assert "[toy] resumed from step 3" in capfd.readouterr().err
  assert (step, status) == (6, loop.COMPLETED) and evaluated == [0]  # no eval at start on a resume
  assert float(state.params["w"]) == sum(range(6)) and int(state.step) == 6  # batches 3..5 after the resume
  assert (tmp_path / "a" / "ckpt" / "6").is_dir()  # the final save
  # rerun after the end: nothing left to do, the state is the final one
  state, step, status = _train(tmp_path / "a", 6, evaluated, eval_at_start=False)
  assert (step, status, float(state.params["w"])) == (6, loop.COMPLETED, sum(range(6)))
