"""Checkpoint integrity with a small state and a real Grain iterator (fast, in process): every damage variant of
the newest step falls back to the previous one exactly, a NaN never reaches a checkpoint (also between two log
steps), every exit path waits for the save in flight, keep-N counts verified steps, a changed model is an error
naming the weight."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m2dino_jax.errors import CheckpointError, NonFiniteError
from m2dino_jax.train import checkpointing, core, integrity, loop


def _state(scale: float = 1.0, shape=(16, 32)):
  params = {"w": jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape) * scale, "b": jnp.full((32,), scale)}
  tx = optax.adam(1e-3)
  return core.TrainState(step=jnp.asarray(int(scale), jnp.int32), params=params, opt_state=tx.init(params),
                         rng=jnp.asarray(core.seed_data(0)))


def _iterator():
  return iter(grain.MapDataset.range(1000).shuffle(seed=3).to_iter_dataset())


def _assert_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 5
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def two_steps(tmp_path):
  """ckpt/ with verified steps 2 and 4 (states 2.0 / 4.0; the iterator advanced 2 / 4 items)."""
  it = _iterator()
  with checkpointing.Checkpointer(tmp_path / "ckpt", keep=3, data_iter=it) as ck:
    for step in (2, 4):
      next(it), next(it)
      ck.save(step, _state(float(step)))
  return tmp_path / "ckpt"


def _largest(folder: Path) -> Path:
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(p: Path):
  data = p.read_bytes()
  p.write_bytes(data[:len(data) // 2])


def _flip(p: Path, n: int = 100):
  data = bytearray(p.read_bytes())
  for i in range(min(n, len(data))):
    data[(i * 7919) % len(data)] ^= 0xFF
  p.write_bytes(bytes(data))


def _data_file(step: Path) -> Path:
  return _largest(step / "state" / "ocdbt.process_0" / "d")


DAMAGE = {
    "truncate_data_file": lambda s: _truncate(_data_file(s)),
    "delete_data_file": lambda s: _data_file(s).unlink(),
    "corrupt_data_file": lambda s: _flip(_data_file(s)),
    "truncate_metadata": lambda s: _truncate(s / "state" / "_METADATA"),
    "delete_metadata": lambda s: (s / "state" / "_METADATA").unlink(),
    "corrupt_metadata": lambda s: _flip(s / "state" / "_METADATA", 20),
    "truncate_iterator": lambda s: _truncate(s / "data" / "process_0-of-1.json"),
    "delete_iterator": lambda s: (s / "data" / "process_0-of-1.json").unlink(),
    "corrupt_iterator": lambda s: _flip(s / "data" / "process_0-of-1.json", 5),
    "delete_state_dir": lambda s: shutil.rmtree(s / "state"),
    "empty_step_dir": lambda s: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in list(s.iterdir())],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_step_falls_back_to_the_previous_one(two_steps, damage, capfd):
  DAMAGE[damage](two_steps / "4")
  capfd.readouterr()
  it = _iterator()
  with checkpointing.Checkpointer(two_steps, keep=3, data_iter=it) as ck:
    state, step = ck.resume(_state(0.0))
  assert step == 2
  _assert_equal(state, _state(2.0))
  ref = _iterator()
  for _ in range(2):
    next(ref)
  assert [next(it) for _ in range(5)] == [next(ref) for _ in range(5)]  # the iterator of step 2, exactly
  err = capfd.readouterr().err
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("warning: checkpoint step 4 ") and "damaged" in lines[0], err
  moved = two_steps.parent / "ckpt-damaged" / "4"
  assert moved.is_dir() and not (two_steps / "4").exists() and str(moved) in lines[0]  # kept, never deleted
  assert sorted(p.name for p in two_steps.iterdir()) == ["2"]


def test_unverified_newest_step_is_trialled_then_trusted(two_steps, capfd):
  """A step killed between Orbax's commit and its manifest has no manifest: a clean restore trial accepts it
  (and writes the manifest); a truncated one is set aside."""
  (two_steps / "4" / integrity.MANIFEST).unlink()
  with checkpointing.Checkpointer(two_steps, keep=3, data_iter=_iterator()) as ck:
    state, step = ck.resume(_state(0.0))
  assert step == 4 and integrity.has_manifest(two_steps / "4")
  _assert_equal(state, _state(4.0))
  (two_steps / "4" / integrity.MANIFEST).unlink()
  _truncate(two_steps / "4" / "state" / "_METADATA")
  capfd.readouterr()
  with checkpointing.Checkpointer(two_steps, keep=3, data_iter=_iterator()) as ck:
    state, step = ck.resume(_state(0.0))
  assert step == 2
  assert len([ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]) == 1


def test_every_step_damaged_starts_fresh(two_steps):
  for s in ("2", "4"):
    shutil.rmtree(two_steps / s / "state")
  like = _state(0.0)
  with checkpointing.Checkpointer(two_steps, data_iter=_iterator()) as ck:
    state, step = ck.resume(like)
  assert step is None and state is like
  assert sorted(p.name for p in (two_steps.parent / "ckpt-damaged").iterdir()) == ["2", "4"]


def test_changed_model_is_an_error_naming_the_weight_not_damage(two_steps):
  with checkpointing.Checkpointer(two_steps, data_iter=_iterator()) as ck:
    with pytest.raises(CheckpointError, match=r"params\.w has shape \(16, 32\) in the checkpoint but \(8, 32\)"):
      ck.resume(_state(0.0, shape=(8, 32)))
  assert sorted(p.name for p in two_steps.iterdir()) == ["2", "4"]  # nothing moved aside


def test_non_finite_state_is_never_saved(tmp_path):
  bad = _state(2.0)
  bad = bad.replace(opt_state=jax.tree.map(lambda x: x.at[..., 0].set(jnp.inf) if x.dtype == jnp.float32 and x.ndim
                                           else x, bad.opt_state))
  with checkpointing.Checkpointer(tmp_path / "ckpt") as ck:
    assert ck.save(2, _state(2.0))
    with pytest.raises(NonFiniteError, match=r"step 4 holds NaN / Inf \(first in 'opt_state\.0\.mu\.b'\).*"
                                             r"last good checkpoint is step 2"):
      ck.save(4, bad)
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2"]


def test_keep_counts_only_verified_steps(tmp_path):
  """keep=1: the older step is deleted only once the newer one is on disk with its manifest."""
  with checkpointing.Checkpointer(tmp_path / "ckpt", keep=1) as ck:
    ck.save(2, _state(2.0))
    ck.wait()
    ck.save(4, _state(4.0))  # in flight: step 2 must survive until 4 is verified
    assert (tmp_path / "ckpt" / "2").is_dir()
    ck.wait()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["4"]
    assert integrity.verify(tmp_path / "ckpt" / "4") is None and integrity.has_manifest(tmp_path / "ckpt" / "4")


def _toy_loop(tmp_path, nan_at: int, raise_at: int | None = None, log_every=10, every=2):
  """loop.run over a toy step (w -= 0.1 * w) that turns NaN at `nan_at`; returns the checkpoint folder."""
  ckpt_dir = tmp_path / "ckpt"

  @jax.jit
  def jstep(state, poison):
    w = state.params["w"] * 0.9 + poison
    loss = jnp.sum(w ** 2)
    return state.replace(step=state.step + 1, params={**state.params, "w": w}), {"loss": loss, "grad_norm": loss}

  def step_fn(state, batch):
    return jstep(state, jnp.float32(np.nan if int(batch) == nan_at else 0.0))

  def boom(step, state, checkpointer):
    if step == raise_at:
      raise RuntimeError("injected failure")

  writer = loop.MetricWriter(tmp_path, tensorboard=False)
  loop.AFTER_STEP_HOOKS.append(boom)
  try:
    with checkpointing.Checkpointer(ckpt_dir, keep=2) as ck:
      loop.run(state=_state(1.0), batches=iter(range(1, 100)), step_fn=step_fn, start_step=0, total_steps=20,
               writer=writer, log_every=log_every, checkpoint_every=every, checkpointer=ck)
  finally:
    loop.AFTER_STEP_HOOKS.remove(boom)
  return ckpt_dir


def test_nan_between_log_steps_never_reaches_a_checkpoint(tmp_path):
  """log_every=10 > checkpoint.every=2, NaN at step 5: checkpoints 2 and 4 survive (keep=2), nothing after."""
  with pytest.raises(NonFiniteError, match=r"at step 5; no state from step 5 on was saved; the last good "
                                           r"checkpoint is step 4"):
    _toy_loop(tmp_path, nan_at=5)
  ckpt = tmp_path / "ckpt"
  assert sorted(p.name for p in ckpt.iterdir()) == ["2", "4"]
  for s in ("2", "4"):
    assert integrity.verify(ckpt / s) is None and integrity.has_manifest(ckpt / s)
  restored = checkpointing.restore_params(ckpt / "4" / "state")
  assert np.isfinite(restored["params"]["w"]).all() and int(restored["step"]) == 5  # _state(1.0) starts at 1


def test_an_error_mid_training_waits_for_the_save_in_flight(tmp_path):
  """An exception right after an async save was started (step 6's hook, before the step-6 save... so at step 7,
  with the step-6 save in flight) still leaves step 6 complete and verified, with no temporary folder."""
  with pytest.raises(RuntimeError, match="injected failure"):
    _toy_loop(tmp_path, nan_at=-1, raise_at=7)
  ckpt = tmp_path / "ckpt"
  assert sorted(p.name for p in ckpt.iterdir()) == ["4", "6"]
  assert integrity.has_manifest(ckpt / "6") and integrity.verify(ckpt / "6") is None


def test_manifest_records_every_file(two_steps):
  manifest = json.loads((two_steps / "2" / integrity.MANIFEST).read_text())["files"]
  files = {str(p.relative_to(two_steps / "2")) for p in (two_steps / "2").rglob("*")
           if p.is_file() and p.name != integrity.MANIFEST}
  assert set(manifest) == files and len(files) > 5
  for rel, (size, _) in manifest.items():
    assert os.path.getsize(two_steps / "2" / rel) == size


@pytest.fixture
def tiny_disk(tmp_path):
  """A 3 MiB tmpfs (needs root and mount rights; skipped elsewhere)."""
  mnt = tmp_path / "tiny"
  mnt.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mnt)], capture_output=True)
  if proc.returncode != 0:
    pytest.skip("cannot mount a small tmpfs here")
  try:
    yield mnt
  finally:
    subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_is_one_error_line_and_keeps_the_last_good_checkpoint(tiny_disk, capfd):
  it = _iterator()
  capfd.readouterr()
  with pytest.raises(CheckpointError) as e:
    with checkpointing.Checkpointer(tiny_disk / "ckpt", keep=2, data_iter=it) as ck:
      for step in range(1, 10):  # 12 MB states: the second one does not fit
        next(it)
        ck.save(step, _state(float(step), shape=(1024, 1024)))
  assert str(e.value) == (f"{tiny_disk / 'ckpt'}: a checkpoint save failed (no space left on the device); "
                          f"the last good checkpoint is step 1 in {tiny_disk / 'ckpt'}")
  err = capfd.readouterr().err
  assert "Traceback" not in err and "RESOURCE_EXHAUSTED" not in err, err[-2000:]
  assert integrity.verify(tiny_disk / "ckpt" / "1") is None and integrity.has_manifest(tiny_disk / "ckpt" / "1")
  with checkpointing.Checkpointer(tiny_disk / "ckpt", data_iter=_iterator()) as ck:  # and it resumes from 1
    state, step = ck.resume(_state(0.0, shape=(1024, 1024)))
  assert step == 1 and not list((tiny_disk / "ckpt").glob("*tmp*"))  # the half-written save is cleaned up
  _assert_equal(state, _state(1.0, shape=(1024, 1024)))
