"""ArrayRecord datasets built from the adapters with TFDS (no TensorFlow), and read back for Grain.

  build('fmc_uia', manual_dir, data_dir)      -> {split: number of examples}
  source('fmc_uia', 'train', data_dir)        -> random-access source of Record-field dicts
  records.Record(**source(...)[i])            -> the Record the adapter produced

The builder lives in `builder.py` (importing it registers `m2dino_ultrasound` with TFDS); it is
imported lazily so that `import m2dino_jax.data.tfds` stays cheap.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from m2dino_jax import fileio
from m2dino_jax.data import adapters, records
from m2dino_jax.errors import DataError

BUILDER_NAME = "m2dino_ultrasound"
TASKS_FILE = "m2dino_tasks.json"  # per split, the task of every example (no decoding needed)
SKIPPED_FILE = "skipped.json"


def dataset_dir(dataset: str, data_dir) -> Path:
  """Where the built files of `dataset` live under `data_dir`."""
  from m2dino_jax.data.tfds import builder
  return Path(data_dir) / BUILDER_NAME / dataset / builder.VERSION


def build(dataset: str, manual_dir, data_dir, *, skip_bad: bool = False, skipped_log=None,
          overwrite: bool = False) -> dict[str, int]:
  """Converts the dataset in `manual_dir` (released layout) to ArrayRecord under `data_dir`.

  Splits the adapter finds empty are left out. With `skip_bad`, bad records are skipped and
  listed (with split and reason) in `skipped_log`, by default `skipped.json` beside the data.
  An existing build is kept unless `overwrite`. Returns the number of examples per split.
  """
  import tensorflow_datasets as tfds

  from m2dino_jax.data.tfds import builder as builder_lib
  mod = adapters.module(dataset)
  manual_dir = Path(manual_dir)
  if not manual_dir.is_dir() or not any(manual_dir.iterdir()):
    raise DataError(manual_dir, "manual directory is missing or empty")
  nonempty, errors = [], []
  for split in adapters.splits(dataset):  # a release may lack a split (e.g. no val/ folder)
    try:
      if next(iter(mod.items(manual_dir, split)), None) is not None:
        nonempty.append(split)
    except DataError as e:
      errors.append(e)
  if not nonempty:
    if errors:
      raise errors[0]
    raise DataError(manual_dir, f"no {dataset} data found for splits {', '.join(adapters.splits(dataset))}")
  bld = builder_lib.M2dinoUltrasound(config=dataset, data_dir=str(data_dir), file_format="array_record")
  bld.skip_bad, bld.skipped, bld.nonempty_splits, bld.task_index = skip_bad, [], tuple(nonempty), {}
  mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite else \
      tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  already = (dataset_dir(dataset, data_dir) / "dataset_info.json").is_file() and not overwrite
  with tempfile.TemporaryDirectory(prefix="m2dino_tfds_dl_") as dl_dir:
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir), download_mode=mode)
    try:
      bld.download_and_prepare(download_dir=dl_dir, download_config=config)
    except AssertionError as e:  # TFDS's way of saying a split yielded nothing (all records bad)
      if "No examples were yielded" not in str(e):
        raise
      raise DataError(manual_dir, f"{e} (every record of the split was bad; see the skipped list)") from None
  out_dir = dataset_dir(dataset, data_dir)
  if not already:
    fileio.write_json(out_dir / TASKS_FILE, bld.task_index, indent=None)
    if skip_bad:
      from m2dino_jax.data.adapters import base
      base.write_skipped(skipped_log or out_dir / SKIPPED_FILE, bld.skipped)
  return {split: int(info.num_examples) for split, info in bld.info.splits.items()}


class RecordSource:
  """Random access to a built split: `src[i]` is a dict of Record fields (see builder.decode).

  Has `__len__`/`__getitem__` (what grain.MapDataset.source needs) and pickles for Grain workers.
  """

  def __init__(self, dataset: str, split: str, data_dir):
    import tensorflow_datasets as tfds

    from m2dino_jax.data.tfds import builder as builder_lib
    self.dataset, self.split, self.data_dir = dataset, split, str(data_dir)
    out_dir = dataset_dir(dataset, data_dir)
    info_path = out_dir / "dataset_info.json"
    if not info_path.is_file():
      raise DataError(out_dir, f"no built dataset '{dataset}' here; run `m2dino data build --dataset {dataset}`")
    built = [s["name"] for s in fileio.read_json(info_path, "dataset info").get("splits", [])]
    if split not in built:
      raise DataError(out_dir, f"split '{split}' not built; available: {', '.join(built)}")
    self._decode = builder_lib.decode
    self._source = tfds.data_source(f"{BUILDER_NAME}/{dataset}", split=split, data_dir=self.data_dir,
                                    download=False)
    self._tasks = None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return self._decode(self._source[index])

  def __getitems__(self, indices) -> list[dict]:
    return [self._decode(ex) for ex in self._source.__getitems__(list(indices))]

  def raw_task(self, index: int) -> str:
    task = self._source[index]["task"]
    return task.decode() if isinstance(task, bytes) else str(task)

  @property
  def tasks(self) -> list[str]:
    """The task of every example, from the index written at build time (or one scan if missing)."""
    if self._tasks is None:
      path = dataset_dir(self.dataset, self.data_dir) / TASKS_FILE
      index = fileio.read_json(path, "task index") if path.is_file() else {}
      self._tasks = index.get(self.split) or [self.raw_task(i) for i in range(len(self))]
    return self._tasks

  def record(self, index: int) -> records.Record:
    return records.Record(**self[index])

  def __repr__(self) -> str:
    return f"RecordSource({self.dataset!r}, {self.split!r}, {self.data_dir!r}, n={len(self)})"


def source(dataset: str, split: str, data_dir) -> RecordSource:
  """A random-access source of the built `dataset` split under `data_dir` (Record-field dicts)."""
  adapters.module(dataset)  # unknown names raise a ConfigError listing the known ones
  return RecordSource(dataset, split, data_dir)
