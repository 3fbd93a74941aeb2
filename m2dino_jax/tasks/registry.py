"""The 27 FMC_UIA ultrasound tasks that M2DINO trains on, and their clinical groups.

Task ids, types and class / point counts follow the challenge's `TASK_CONFIGURATIONS`.
Segmentation class counts include the background.

Clinical groups (CG paradigm). The paper's full membership is not public; its Fig. 2 names groups Abd
(Abdomen), MO (Multi-organ), Breast and Lung. `GROUP_PRESETS` holds named groupings, picked by
`config.groups` (`parse_groups`):
  paper  (default) our reading of Fig. 2, eight groups; every task's place and why:
    Fetal    FUGC, IUGC, fetal_femur (obstetric biometry landmarks), fetal_head_pos_cls,
             fetal_plane_cls, fetal_sacral_pos_cls (obstetric views and positions), fetal_head,
             fetal_heart, head_symphysis_multi (obstetric segmentation)
    Abd      fetal_abdomen_multi (abdominal structures, FASS), liver_lesion_2cls (liver): the abdominal
             anatomy tasks, adult and fetal, read in abdominal sonography
    MO       organ_cls (which of 6 organs: the paper's "multi-organ classification"),
             spinal_cord_injury_loc (the spine at several levels): tasks that span several organs
    Breast   breast_2cls, breast_3cls, breast_lesion
    Lung     lung_2cls, lung_disease_3cls, lung
    Thyroid  thyroid_nodule_det, thyroid_nodule
    Cardiac  cardiac_multi (echocardiography), carotid_artery (vascular)
    Gyn      cervix, cervix_multi, ovary_tumor, uterine_fibroid_det (gynaecology)
  organ  the earlier organ-based grouping (Task.group): fetal, breast, lung, thyroid, cardiovascular,
         gynaecology, other (liver, organ classification, spine)
  type   one group per task type (segmentation / classification / detection / regression): grouping by
         task trait, the alternative the paper recommends looking at
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path

from m2dino_jax import fileio
from m2dino_jax.errors import ConfigError

SEGMENTATION = "segmentation"
CLASSIFICATION = "classification"
DETECTION = "detection"
REGRESSION = "regression"
TASK_TYPES = (SEGMENTATION, CLASSIFICATION, DETECTION, REGRESSION)


class UnknownTaskType(ConfigError, ValueError):
  """A task type no table knows (a ConfigError; also a ValueError, which `metrics.primary_metric` raised
  before the task-type table existed)."""


def unknown_type(name, key: str = "tasks") -> UnknownTaskType:
  """The one error for an unknown task type, raised by every per-type lookup (tasks/types.py's table and the
  per-type tables kept below or beside it: data/records.py's target checks, infer/challenge.py's formats)."""
  return UnknownTaskType(key, f"unknown task type '{name}'; known: {', '.join(TASK_TYPES)}")


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


def suggest(name: str) -> str:
  """"; did you mean 'x'?" for the closest task names (difflib), or "" when none is close."""
  close = difflib.get_close_matches(str(name), list(BY_NAME), n=2, cutoff=0.6)
  return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def get(name: str, key: str = "tasks") -> Task:
  """Looks a task up by its challenge id; an unknown name raises a ConfigError naming the config `key` it
  came from, suggesting the closest tasks and listing the valid ones."""
  try:
    return BY_NAME[name]
  except KeyError:
    raise ConfigError(key, f"unknown task '{name}'{suggest(name)} (known: {', '.join(BY_NAME)})") from None


def by_type(type_: str) -> list[Task]:
  return [t for t in TASKS if t.type == type_]


PAPER_GROUPS: dict[str, tuple[str, ...]] = {
    "Fetal": ("FUGC", "IUGC", "fetal_femur", "fetal_head_pos_cls", "fetal_plane_cls", "fetal_sacral_pos_cls",
              "fetal_head", "fetal_heart", "head_symphysis_multi"),
    "Abd": ("fetal_abdomen_multi", "liver_lesion_2cls"),
    "MO": ("organ_cls", "spinal_cord_injury_loc"),
    "Breast": ("breast_2cls", "breast_3cls", "breast_lesion"),
    "Lung": ("lung_2cls", "lung_disease_3cls", "lung"),
    "Thyroid": ("thyroid_nodule_det", "thyroid_nodule"),
    "Cardiac": ("cardiac_multi", "carotid_artery"),
    "Gyn": ("cervix", "cervix_multi", "ovary_tumor", "uterine_fibroid_det"),
}


def _by_field(field: str) -> dict[str, list[str]]:
  groups: dict[str, list[str]] = {}
  for t in TASKS:
    groups.setdefault(getattr(t, field), []).append(t.name)
  return groups


GROUP_PRESETS = {
    "paper": lambda: {g: list(names) for g, names in PAPER_GROUPS.items()},
    "organ": lambda: _by_field("group"),
    "type": lambda: _by_field("type"),
}
DEFAULT_GROUP_PRESET = "paper"


def default_groups() -> dict[str, list[str]]:
  """The default clinical groups of the CG paradigm (the `paper` preset)."""
  return GROUP_PRESETS[DEFAULT_GROUP_PRESET]()


def parse_groups(spec) -> dict[str, list[str]]:
  """Groups from a spec: '' (the default preset), a preset name (`GROUP_PRESETS`), 'name:task+task;name:task'
  or the path of a JSON file {name: [task, ...]}. Task names are checked; a ConfigError names `groups`."""
  spec = str(spec or "").strip()
  if not spec:
    return default_groups()
  if spec in GROUP_PRESETS:
    return GROUP_PRESETS[spec]()
  if spec.endswith(".json"):
    obj = fileio.read_json(Path(spec), "groups file")
    if not isinstance(obj, dict) or not all(isinstance(v, list | str) for v in obj.values()):
      raise ConfigError("groups", f"{spec}: expected an object {{group: [task, ...]}}")
    groups = {str(k): _split(v) if isinstance(v, str) else [str(x) for x in v] for k, v in obj.items()}
  else:
    groups = {}
    for item in filter(None, (g.strip() for g in spec.split(";"))):
      name, sep, members = item.partition(":")
      if not sep or not name.strip() or not members.strip():
        raise ConfigError("groups", f"bad group '{item}'; use a preset ({', '.join(GROUP_PRESETS)}), "
                          "name:task+task;name:task or a JSON file")
      groups[name.strip()] = _split(members)
  for members in groups.values():
    for m in members:
      if m not in BY_NAME:
        raise ConfigError("groups", f"unknown task '{m}' in the groups{suggest(m)} (known: {', '.join(BY_NAME)})")
  return groups


def _split(members: str) -> list[str]:
  return [m.strip() for m in members.replace(",", "+").split("+") if m.strip()]


def group_of(groups: dict[str, list[str]]) -> dict[str, str]:
  """{task: group} from {group: [task, ...]}."""
  return {t: g for g, members in groups.items() for t in members}


def resolve(names, key: str = "tasks") -> list[Task]:
  """Task names (list, or a string split on , + or :; "all" = every task) to Task objects, in registry order;
  an unknown name is a ConfigError naming `key` (the config key the names came from)."""
  if isinstance(names, str):
    names = [n.strip() for n in re.split(r"[,+:]", names) if n.strip()]
  if list(names) == ["all"]:
    return list(TASKS)
  wanted = {get(n, key).name for n in names}
  return [t for t in TASKS if t.name in wanted]
