"""The pipeline on the real source kinds (sonosynth in memory, FMC_UIA folder, TFDS ArrayRecord) and
global batches on 4 simulated devices."""

import pytest

from m2dino_jax.data import pipeline, records
from tests.util import run_with_devices

TASKS = ["fetal_head", "breast_2cls"]


def _config(**source):
  cfg = pipeline.default_data_config()
  cfg.image_size, cfg.batch_size, cfg.eval_batch_size, cfg.prefetch = 32, 2, 2, 0
  cfg.source.update(source)
  return cfg


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
  from m2dino_jax.data import sonosynth
  root = tmp_path_factory.mktemp("synth") / "fmc_uia"
  sonosynth.write_dataset(root, seed=0, scale=0.01, size=64, tasks=TASKS)
  return root


def _eval_images(cfg, task):
  """Every valid eval image of a task, as a sorted list of checksums (order-free comparison)."""
  sums = []
  for b in pipeline.make_eval_batches(cfg, task):
    sums += [round(float(x), 3) for x in b["image"][b["valid"]].sum(axis=(1, 2, 3))]
  return sorted(sums)


def test_folder_and_tfds_sources_give_the_same_examples(synth_root, tmp_path):
  from m2dino_jax.data import tfds as tfds_data
  folder = _config(kind="folder", adapter="fmc_uia", root=str(synth_root))
  built = tfds_data.build("fmc_uia", synth_root, tmp_path / "tfds")
  tfds_cfg = _config(kind="tfds", dataset="fmc_uia", data_dir=str(tmp_path / "tfds"))
  sizes = pipeline.task_sizes(folder, TASKS)
  assert sizes == pipeline.task_sizes(tfds_cfg, TASKS)
  assert sum(sizes.values()) == built["train"]
  for task in TASKS:
    assert _eval_images(folder, task) == _eval_images(tfds_cfg, task)
  it = pipeline.make_train_iterator(tfds_cfg, TASKS, seed=0)
  batch = next(it)
  it.close()
  assert set(batch) == set(records.EXAMPLE_KEYS) | {"valid"} and batch["image"].shape == (2, 32, 32, 3)


def test_synthetic_source_in_memory():
  cfg = _config(kind="synthetic", synthetic_count=3, synthetic_size=64)
  assert pipeline.task_sizes(cfg, TASKS) == {"fetal_head": 3, "breast_2cls": 3}
  it = pipeline.make_train_iterator(cfg, TASKS, seed=0)
  batches = [next(it) for _ in range(2)]
  it.close()
  ids = sorted(int(b["task_id"][0]) for b in batches)
  assert ids == [3, 21]  # uniform sizes: one batch of each task
  seg = next(b for b in batches if b["task_id"][0] == 21)
  assert seg["mask"].max() == 1 and (seg["orig_size"] == 64).all()


def test_pipeline_batches_shard_over_four_devices():
  out = run_with_devices("""
    import numpy as np
    from m2dino_jax.data import pipeline, records
    from m2dino_jax import mesh as mesh_lib
    cfg = pipeline.default_data_config()
    cfg.image_size, cfg.batch_size, cfg.prefetch = 16, 4, 0
    recs = {"fetal_plane_cls": [records.Record(np.full((20, 20), i, np.uint8), "fetal_plane_cls", label=i % 6)
                                for i in range(8)]}
    it = pipeline.make_train_iterator(cfg, list(recs), seed=0, sources=recs)
    local = next(pipeline.make_train_iterator(cfg, list(recs), seed=0, sources=recs))
    mesh = mesh_lib.make_mesh({"data": 4})
    batch = mesh_lib.shard_batch(next(it), mesh, mesh_lib.get_rules("dp"))
    assert batch["image"].shape == (4, 16, 16, 3) and len(batch["image"].sharding.device_set) == 4
    for k in local:
      np.testing.assert_array_equal(np.asarray(batch[k]), local[k])
    print("ok", batch["image"].addressable_shards[1].data.shape)
  """, devices=4)
  assert "ok (1, 16, 16, 3)" in out
