"""The task-type table (tasks/types.py) and the per-type tables kept beside it cover the same types, and an
unknown type is the same ConfigError naming the type at every entry point."""

import numpy as np
import pytest
from flax import nnx

from m2dino_jax.data import records
from m2dino_jax.errors import ConfigError
from m2dino_jax.infer import challenge
from m2dino_jax.models import heads
from m2dino_jax.tasks import metrics, registry, types

UNKNOWN = registry.Task(99, "caption_task", "captioning", "none", "other", num_classes=2)


def test_every_per_type_table_covers_exactly_the_types_of_the_table():
  names = set(types.TYPES)
  assert names == set(registry.TASK_TYPES) == {t.type for t in registry.TASKS}
  assert set(records.CHECKS) == names  # data side (below the table)
  assert set(challenge.FORMATS) == names  # the challenge's prediction files (above the table)
  assert set(metrics.METRICS_BY_TYPE) == names
  for name, kind in types.TYPES.items():
    assert kind.name == name
    assert kind.metrics == metrics.METRICS_BY_TYPE[name]
    assert isinstance(kind.accumulator, metrics.Accumulator)
  # Exactly the JSON types have a prediction file, each its own.
  files = [f.file for f in challenge.FORMATS.values() if f.file]
  assert len(files) == len(set(files)) == 3 and challenge.FORMATS[registry.SEGMENTATION].file is None


def _assert_unknown(fn):
  with pytest.raises(ConfigError, match="unknown task type 'captioning'") as info:
    fn()
  assert info.value.key == "tasks"
  assert all(t in str(info.value) for t in registry.TASK_TYPES)  # lists the known types


def test_an_unknown_type_is_a_config_error_naming_it_at_every_entry_point(tmp_path, monkeypatch):
  batch = {"image": np.zeros((1, 8, 8, 1), np.float32), "label": np.zeros(1, np.int32), "valid": np.ones(1, bool)}
  _assert_unknown(lambda: types.of("captioning"))
  _assert_unknown(lambda: types.of(UNKNOWN))
  _assert_unknown(lambda: types.build_head(UNKNOWN, 8, 4, 1, heads.default_heads_config(), rngs=nnx.Rngs(0)))
  _assert_unknown(lambda: types.task_loss(UNKNOWN, np.zeros((1, 2), np.float32), batch))
  _assert_unknown(lambda: metrics.primary_metric("captioning"))
  _assert_unknown(lambda: metrics.TaskEvaluator(UNKNOWN))
  _assert_unknown(lambda: challenge.format_of("captioning"))
  _assert_unknown(lambda: challenge.Submission(tmp_path).add(UNKNOWN, "img/a.png", np.zeros(2), (8, 8)))
  monkeypatch.setitem(registry.BY_NAME, UNKNOWN.name, UNKNOWN)
  _assert_unknown(lambda: records.validate(records.Record(np.zeros((8, 8), np.uint8), UNKNOWN.name)))
  # primary_metric raised a ValueError before the table existed; callers catching that still do.
  with pytest.raises(ValueError):
    metrics.primary_metric("captioning")


def test_per_class_scores_come_from_the_type_row():
  seg, cls = metrics.TaskEvaluator("cervix_multi"), metrics.TaskEvaluator("breast_3cls")
  assert seg.per_class() == {} and cls.per_class() == {}  # nothing added yet
  a = np.zeros((6, 6), np.uint8)
  a[1:3, 1:3], a[4:6, 4:6] = 1, 2
  b = a.copy()
  b[1, 1] = 0  # class 1: 3 of 4 pixels found -> Dice 2*3/(3+4); class 2 exact
  seg.add(b, a)
  cls.add([0.2, 0.5, 0.3], 1)
  per = seg.per_class()
  assert per["dice"] == pytest.approx([6 / 7, 1.0]) and per["hd"][1] == 0.0
  assert cls.per_class() == {}
  assert seg.result()["dice"] == pytest.approx((6 / 7 + 1.0) / 2)
