"""What every adapter shares: lazy items, validation, skip-bad bookkeeping and deterministic splits.

An adapter lists its data as `Item`s (where a record comes from, and how to load it); `read_items`
loads, validates and yields them, and decides what happens to a bad one: raise (default) or skip
and record why (`skip_bad`). Loading is lazy, so listing a large dataset costs no decoding.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from m2dino_jax import fileio
from m2dino_jax.data import records
from m2dino_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SKIPPED_FIELDS = ("source", "row", "reason")


@dataclasses.dataclass
class Item:
  """One unit of data on disk: `load()` returns a Record or an iterable of Records (cine frames)."""
  source: str
  row: int | None
  load: Callable[[], records.Record | Iterable[records.Record]]


def failing(source, message: str, row: int | None = None) -> Item:
  """An item that raises when loaded: a file-level problem (empty CSV) that skip_bad may skip."""
  def load():
    raise DataError(source, message, row=row)
  return Item(str(source), row, load)


def read_items(items: Iterable[Item], *, skip_bad: bool = False, skipped_log=None,
               skipped: list | None = None) -> Iterator[records.Record]:
  """Loads and validates items; bad ones raise, or with skip_bad are skipped, logged and listed.

  The skipped list ({source, row, reason} dicts) goes to `skipped_log` when given, and is also
  appended to `skipped` when the caller passes a list (builders gather several splits' lists).
  """
  skipped = [] if skipped is None else skipped
  start = len(skipped)
  try:
    for item in items:
      try:
        loaded = item.load()
        recs = [loaded] if isinstance(loaded, records.Record) else loaded
        for rec in recs:
          yield records.validate(rec)
      except DataError as e:
        if not skip_bad:
          raise
        skipped.append({"source": e.path, "row": e.row, "reason": str(e)})
        log.warning("skipped bad record: %s", e)
  finally:
    if skipped_log is not None:
      write_skipped(skipped_log, skipped[start:])
    if len(skipped) > start:
      log.warning("skipped %d bad record(s)%s", len(skipped) - start,
                  f"; list in {skipped_log}" if skipped_log is not None else "")


def write_skipped(path, skipped: list[dict]) -> Path:
  """Writes the skipped list atomically: JSON (list of {source,row,reason}) or CSV by suffix."""
  path = Path(path)
  if path.suffix.lower() == ".json":
    return fileio.write_json(path, skipped)
  if path.suffix.lower() == ".csv":
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SKIPPED_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(skipped)
    return fileio.write_text(path, buf.getvalue())
  raise ConfigError("skipped_log", f"'{path}' must end in .json or .csv")


def hashed_split(key: str, val_percent: int = 20, test_percent: int = 0) -> str:
  """'train', 'val' (or 'test') from a stable hash of `key` (a patient, video or file name).

  For releases without an official split: the same key always lands in the same split, whatever
  order the files are listed in, and all frames of one patient / video stay together.
  """
  bucket = zlib.crc32(key.encode()) % 100
  if bucket < test_percent:
    return "test"
  return "val" if bucket < test_percent + val_percent else "train"


def remap_mask(mask, mapping: dict[int, int], source, what: str = "mask"):
  """Maps released label values to class ids; a value not in `mapping` raises naming the file."""
  values = np.unique(mask)
  bad = [int(v) for v in values if int(v) not in mapping]
  if bad:
    raise DataError(source, f"{what} value {bad[0]} not one of {sorted(mapping)}")
  lut = np.zeros(int(values.max()) + 1, np.uint8)
  for k, v in mapping.items():
    if k < lut.size:
      lut[k] = v
  return lut[mask]


def find_root(root, *names: str) -> Path:
  """`root` itself, or the release's top folder `root/name` when the user points one level up."""
  root = Path(root)
  for name in names:
    if (root / name).is_dir():
      return root / name
  return require_dir(root, "dataset")


def check_split(split: str, known: Iterable[str], dataset: str) -> str:
  known = tuple(known)
  if split != "all" and split not in known:
    raise ConfigError("split", f"dataset '{dataset}' has splits {', '.join(known)} (or 'all'), not '{split}'")
  return split


def in_split(split: str, actual: str) -> bool:
  return split == "all" or split == actual


def require_dir(path, what: str) -> Path:
  path = Path(path)
  if not path.is_dir():
    raise DataError(path, f"{what} folder not found")
  return path


def read_csv_rows(path, delimiter: str = ",") -> tuple[list[str], list[tuple[int, dict]]]:
  """(header, [(line number, row dict)]) of a CSV; an unreadable file raises a DataError.

  Line numbers count the header as line 1, as an editor shows them.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(path, "CSV file not found")
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f, delimiter=delimiter)
      header = [h.strip() for h in (reader.fieldnames or [])]
      reader.fieldnames = header
      rows = [(reader.line_num, {k: (v.strip() if isinstance(v, str) else v) for k, v in r.items()})
              for r in reader]
  except (UnicodeDecodeError, csv.Error) as e:
    raise DataError(path, f"unreadable CSV ({e})") from None
  return header, rows


MISSING = ("", "nan", "NaN", "None", "none", "null")


def cell(row: dict, key: str) -> str | None:
  """A CSV cell with pandas' ways of writing 'missing' mapped to None."""
  v = row.get(key)
  return None if v is None or v in MISSING else v
