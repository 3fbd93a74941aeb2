"""Grain pipeline: determinism (also across worker counts), restore, mixture proportions, shards, eval."""

import json

import grain
import numpy as np
import pytest

from m2dino_jax.data import mixture, pipeline, records
from m2dino_jax.errors import ConfigError, M2DinoError
from m2dino_jax.tasks import registry

S = 16
TASKS = {"fetal_head_pos_cls": 6, "fetal_head": 20, "thyroid_nodule_det": 12}


def _record(task: str, i: int) -> records.Record:
  """A record whose pixels encode (task, i): value 1 + i at the centre, so examples can be identified."""
  img = np.full((20 + i % 3, 24), 1 + i, np.uint8)
  t = registry.get(task)
  if t.type == registry.CLASSIFICATION:
    return records.validate(records.Record(img, task, label=i % t.num_classes))
  if t.type == registry.SEGMENTATION:
    mask = np.zeros(img.shape, np.uint8)
    mask[4:12, 6:18] = 1
    return records.validate(records.Record(img, task, mask=mask))
  return records.validate(records.Record(img, task, box=np.array([2, 3, 12, 15], np.float32)))


def _sources(sizes=None):
  return {t: [_record(t, i) for i in range(n)] for t, n in (sizes or TASKS).items()}


def _config(**overrides):
  cfg = pipeline.default_data_config()
  cfg.image_size, cfg.batch_size, cfg.eval_batch_size, cfg.prefetch = S, 4, 4, 0
  cfg.transforms.train = ["resize", "affine(p=0.5)", "flip", "gamma(p=0.5)", "speckle(p=0.5)"]
  cfg.transforms.eval = ["resize"]
  cfg.update(overrides)
  return cfg


def _take(cfg, n, sources=None, **kw):
  it = pipeline.make_train_iterator(cfg, list(TASKS), sources=sources or _sources(), **kw)
  out = [next(it) for _ in range(n)]
  return it, out


def _ids(batch) -> list[tuple[int, int]]:
  """(task_id, example index) of every example, read back from the centre pixel (resize only)."""
  centre = np.rint(batch["image"][:, S // 2, S // 2, 0] * 255).astype(int) - 1
  return list(zip(batch["task_id"].tolist(), centre.tolist()))


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_same_seed_same_stream_and_layout():
  _, a = _take(_config(), 6, seed=3)
  _, b = _take(_config(), 6, seed=3)
  _, c = _take(_config(), 6, seed=4)
  _assert_same(a, b)
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
  batch = a[0]
  assert set(batch) == set(records.EXAMPLE_KEYS) | {"valid"}
  assert batch["image"].shape == (4, S, S, 3) and batch["mask"].shape == (4, S, S)
  assert batch["points"].shape == (4, records.MAX_POINTS, 2) and batch["valid"].all()


def test_zero_and_two_workers_give_identical_batches():
  it0, a = _take(_config(worker_count=0, prefetch=2), 10, seed=7)
  it2, b = _take(_config(worker_count=2, prefetch=2), 10, seed=7)
  it0.close()
  it2.close()
  _assert_same(a, b)


def test_one_task_per_batch_and_size_mixture():
  _, batches = _take(_config(), 38, seed=0)
  tasks = [set(b["task_id"].tolist()) for b in batches]
  assert all(len(t) == 1 for t in tasks)
  counts = np.bincount([t.pop() for t in tasks], minlength=registry.NUM_TASKS)
  ids = [registry.get(t).task_id for t in TASKS]
  expected = np.array(list(TASKS.values())) / sum(TASKS.values()) * len(batches)
  chi2 = np.sum((counts[ids] - expected) ** 2 / expected)
  assert chi2 < 1.0, (counts[ids], expected)  # the interleave is deterministic: far below chi2(2 dof)


def test_mixture_proportions_follow_json_weights(tmp_path):
  path = tmp_path / "allocation.json"
  path.write_text(json.dumps({"weights": {"fetal_head_pos_cls": 0.5, "fetal_head": 0.3,
                                          "thyroid_nodule_det": 0.2}}))
  _, batches = _take(_config(mixture="json", weights_file=str(path)), 100, seed=1)
  got = np.bincount([int(b["task_id"][0]) for b in batches], minlength=registry.NUM_TASKS)
  ids = [registry.get(t).task_id for t in TASKS]
  expected = np.array([50, 30, 20])
  assert np.sum((got[ids] - expected) ** 2 / expected) < 0.5, got[ids]


def test_mixture_weights_formulas(tmp_path):
  sizes = {"a": 100, "b": 400, "c": 1600}
  temp = mixture.mixture_weights("temperature", sizes, temperature=2.0)
  np.testing.assert_allclose([temp[k] for k in sizes], np.array([10, 20, 40]) / 70)
  assert mixture.mixture_weights("uniform", sizes) == pytest.approx({k: 1 / 3 for k in sizes})
  flat = tmp_path / "w.json"
  flat.write_text(json.dumps({"a": 1, "b": 0, "c": 3}))
  assert mixture.mixture_weights("json", sizes, weights_file=str(flat)) == {"a": 0.25, "c": 0.75}
  assert mixture.load_mixture_weights(flat) == {"a": 0.25, "b": 0.0, "c": 0.75}
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"a": -1}))
  with pytest.raises(M2DinoError, match="bad.json"):
    mixture.load_mixture_weights(bad)
  with pytest.raises(ConfigError, match="no weight for task"):
    mixture.mixture_weights("json", {"zzz": 3}, weights_file=str(flat))


def test_restore_mid_stream_continues_identically(tmp_path):
  import orbax.checkpoint as ocp
  cfg = _config(worker_count=0, prefetch=2)
  it, _ = _take(cfg, 5, seed=2)
  ckpt = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  ckpt.save(tmp_path / "data", args=grain.checkpoint.CheckpointSave(it))
  expected = [next(it) for _ in range(6)]
  it.close()
  fresh = pipeline.make_train_iterator(cfg, list(TASKS), seed=2, sources=_sources())
  ckpt.restore(tmp_path / "data", args=grain.checkpoint.CheckpointRestore(fresh))
  _assert_same([next(fresh) for _ in range(6)], expected)
  fresh.close()


def test_state_saved_with_no_workers_restores_with_two():
  it, _ = _take(_config(worker_count=0), 5, seed=2)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(5)]
  two = pipeline.make_train_iterator(_config(worker_count=2, prefetch=1), list(TASKS), seed=2, sources=_sources())
  two.set_state(state)
  got = [next(two) for _ in range(5)]
  mid = json.loads(json.dumps(two.get_state()))
  two.close()
  _assert_same(got, expected)
  back = pipeline.make_train_iterator(_config(worker_count=0), list(TASKS), seed=2, sources=_sources())
  back.set_state(mid)  # and from two workers back to none
  _assert_same([next(back)], [next(it)])


def test_new_weights_after_restore_resume_each_task_stream():
  cfg = _config()
  per_task_ref = {}  # each task's own batch stream does not depend on the mixture weights
  _, ref = _take(cfg, 60, seed=5, weights={t: 1.0 for t in TASKS})
  for b in ref:
    per_task_ref.setdefault(int(b["task_id"][0]), []).append(b)
  it, first = _take(cfg, 7, seed=5, weights={t: 1.0 for t in TASKS})
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  changed = pipeline.make_train_iterator(cfg, list(TASKS), seed=5, sources=_sources(),
                                         weights={"fetal_head_pos_cls": 0.1, "fetal_head": 0.9})
  changed.set_state(state)
  after = [next(changed) for _ in range(10)]
  assert sum(int(b["task_id"][0]) == registry.get("fetal_head").task_id for b in after) >= 7
  seen = {}
  for b in first + after:
    seen.setdefault(int(b["task_id"][0]), []).append(b)
  for tid, stream in seen.items():
    _assert_same(stream, per_task_ref[tid][:len(stream)])


def test_process_shards_are_disjoint_cover_and_agree_on_the_task():
  sizes = {"fetal_head": 9, "thyroid_nodule_det": 9}
  cfg = _config(batch_size=3, mixture="uniform")
  cfg.transforms.train = ["resize"]
  seen, task_seqs = [], []
  for p in range(3):
    it = pipeline.make_train_iterator(cfg, list(sizes), seed=0, sources=_sources(sizes), process_index=p,
                                      process_count=3)
    batches = [next(it) for _ in range(6)]  # 3 batches of 1 per task = one epoch of this shard
    assert all(b["image"].shape[0] == 1 for b in batches)
    task_seqs.append([int(b["task_id"][0]) for b in batches])
    seen.append({i for b in batches for i in _ids(b)})
  assert task_seqs[0] == task_seqs[1] == task_seqs[2]
  assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
  want = {(registry.get(t).task_id, i) for t, n in sizes.items() for i in range(n)}
  assert seen[0] | seen[1] | seen[2] == want


def test_eval_covers_every_example_once_with_padding():
  sources = {"thyroid_nodule_det": [_record("thyroid_nodule_det", i) for i in range(11)]}
  cfg = _config(eval_batch_size=4)
  ids, lengths = [], []
  for p in range(2):
    batches = list(pipeline.make_eval_batches(cfg, "thyroid_nodule_det", process_index=p, process_count=2,
                                              sources=sources))
    lengths.append(len(batches))
    for b in batches:
      assert b["image"].shape[0] == 2
      valid = b["valid"]
      ids += [i for i, v in zip(_ids(b), valid) if v]
      assert (b["label"][~valid] == -1).all() and (b["orig_size"][~valid] == 0).all()
      np.testing.assert_array_equal(b["orig_size"][valid][:, 1], 24)
  assert lengths[0] == lengths[1] == 3
  assert sorted(i for _, i in ids) == list(range(11))


def test_bad_batch_and_mixture_config():
  with pytest.raises(ConfigError, match="batch_size"):
    pipeline.make_train_iterator(_config(batch_size=5), list(TASKS), sources=_sources(), process_count=2)
  with pytest.raises(ConfigError, match="unknown mixture"):
    pipeline.make_train_iterator(_config(mixture="zipf"), list(TASKS), sources=_sources())


def test_mixed_task_batches_when_one_task_per_batch_is_off():
  cfg = _config(one_task_per_batch=False, mixture="uniform", batch_size=6)
  cfg.transforms.train = ["resize"]
  _, batches = _take(cfg, 4, seed=0)
  tids = np.concatenate([b["task_id"] for b in batches])
  assert any(len(set(b["task_id"].tolist())) > 1 for b in batches)
  np.testing.assert_array_equal(np.bincount(tids)[np.unique(tids)], [8, 8, 8])  # uniform over 24 examples
  ids = [i for b in batches for i in _ids(b)]
  assert all(0 <= i < TASKS[registry.TASKS[t].name] for t, i in ids)
