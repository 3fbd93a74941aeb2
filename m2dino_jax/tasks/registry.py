"""The 27 FMC_UIA ultrasound tasks that M2DINO trains on, and their clinical groups.

Task ids, types and class / point counts follow the challenge's `TASK_CONFIGURATIONS`.
Segmentation class counts include the background. The paper's clinical grouping (CG) is
not public: `DEFAULT_GROUPS` is our organ-based grouping; configs may define others.
"""

from __future__ import annotations

import dataclasses
import re

from m2dino_jax.errors import ConfigError

SEGMENTATION = "segmentation"
CLASSIFICATION = "classification"
DETECTION = "detection"
REGRESSION = "regression"
TASK_TYPES = (SEGMENTATION, CLASSIFICATION, DETECTION, REGRESSION)

# The FMC_UIA CSVs spell the type this way (note the capital R).
CSV_TYPE_NAMES = {"segmentation": SEGMENTATION, "classification": CLASSIFICATION,
                  "detection": DETECTION, "Regression": REGRESSION, "regression": REGRESSION}


@dataclasses.dataclass(frozen=True)
class Task:
  """One task: `num_classes` for seg (incl. background) / cls, 1 for detection (one box, as the official
  table), `num_points` for regression."""
  index: int  # 1-based number in the challenge table
  name: str
  type: str
  organ: str
  group: str
  num_classes: int = 0
  num_points: int = 0
  # Whether a horizontal flip keeps the label valid (False for orientation / side classes).
  flip_ok: bool = True

  @property
  def task_id(self) -> int:
    """0-based integer id used inside models (router bias, head lookup)."""
    return self.index - 1


def _t(index, name, type_, organ, group, *, c=0, k=0, flip_ok=True):
  return Task(index, name, type_, organ, group, num_classes=c, num_points=k, flip_ok=flip_ok)


TASKS: tuple[Task, ...] = (
    # Landmarks are ordered (e.g. femur end 1 / end 2): a flip would swap their meaning.
    _t(1, "FUGC", REGRESSION, "fetal", "fetal", k=2, flip_ok=False),
    _t(2, "IUGC", REGRESSION, "fetal", "fetal", k=3, flip_ok=False),
    _t(3, "fetal_femur", REGRESSION, "fetal", "fetal", k=2, flip_ok=False),
    _t(4, "breast_2cls", CLASSIFICATION, "breast", "breast", c=2),
    _t(5, "breast_3cls", CLASSIFICATION, "breast", "breast", c=3),
    _t(6, "fetal_head_pos_cls", CLASSIFICATION, "fetal", "fetal", c=8, flip_ok=False),
    _t(7, "fetal_plane_cls", CLASSIFICATION, "fetal", "fetal", c=6),
    _t(8, "fetal_sacral_pos_cls", CLASSIFICATION, "fetal", "fetal", c=8, flip_ok=False),
    _t(9, "liver_lesion_2cls", CLASSIFICATION, "liver", "other", c=2),
    _t(10, "lung_2cls", CLASSIFICATION, "lung", "lung", c=2),
    _t(11, "lung_disease_3cls", CLASSIFICATION, "lung", "lung", c=3),
    _t(12, "organ_cls", CLASSIFICATION, "abdomen", "other", c=6),
    _t(13, "spinal_cord_injury_loc", DETECTION, "spine", "other", c=1),
    _t(14, "thyroid_nodule_det", DETECTION, "thyroid", "thyroid", c=1),
    _t(15, "uterine_fibroid_det", DETECTION, "uterus", "gynaecology", c=1),
    _t(16, "breast_lesion", SEGMENTATION, "breast", "breast", c=2),
    _t(17, "cardiac_multi", SEGMENTATION, "heart", "cardiovascular", c=4),
    _t(18, "carotid_artery", SEGMENTATION, "vessel", "cardiovascular", c=2),
    _t(19, "cervix", SEGMENTATION, "cervix", "gynaecology", c=2),
    _t(20, "cervix_multi", SEGMENTATION, "cervix", "gynaecology", c=3),
    _t(21, "fetal_abdomen_multi", SEGMENTATION, "fetal", "fetal", c=5),
    _t(22, "fetal_head", SEGMENTATION, "fetal", "fetal", c=2),
    _t(23, "fetal_heart", SEGMENTATION, "fetal", "fetal", c=2),
    _t(24, "head_symphysis_multi", SEGMENTATION, "fetal", "fetal", c=3),
    _t(25, "lung", SEGMENTATION, "lung", "lung", c=2),
    _t(26, "ovary_tumor", SEGMENTATION, "ovary", "gynaecology", c=2),
    _t(27, "thyroid_nodule", SEGMENTATION, "thyroid", "thyroid", c=2),
)

BY_NAME: dict[str, Task] = {t.name: t for t in TASKS}
NUM_TASKS = len(TASKS)


def get(name: str) -> Task:
  """Looks a task up by its challenge id; unknown names raise a ConfigError listing the valid ones."""
  try:
    return BY_NAME[name]
  except KeyError:
    raise ConfigError("tasks", f"unknown task '{name}'; known: {', '.join(BY_NAME)}") from None


def by_type(type_: str) -> list[Task]:
  return [t for t in TASKS if t.type == type_]


def default_groups() -> dict[str, list[str]]:
  """Organ-based clinical groups (our default for the CG paradigm)."""
  groups: dict[str, list[str]] = {}
  for t in TASKS:
    groups.setdefault(t.group, []).append(t.name)
  return groups


def resolve(names) -> list[Task]:
  """Task names (list, or a string split on , + or :; "all" = every task) to Task objects, in registry order."""
  if isinstance(names, str):
    names = [n.strip() for n in re.split(r"[,+:]", names) if n.strip()]
  if list(names) == ["all"]:
    return list(TASKS)
  wanted = {get(n).name for n in names}
  return [t for t in TASKS if t.name in wanted]
