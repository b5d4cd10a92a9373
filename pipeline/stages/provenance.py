"""What a model directory was made from, and whether a rerun into it may resume.

``train-teacher`` and ``distill`` write ``provenance.json`` into their model directory before training:
the stage, the dataset's digest, the teacher's digest (a student), the settings and the incident-energy
range of the training split (read back by :attr:`~calodistill.pipeline.data.bundle.ModelBundle.energy_range`).
A rerun into the same directory resumes only when all of these match; otherwise it is refused in one
line naming what differs, before anything is written (``--overwrite`` starts over instead).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json
from ..errors import CalodistillError
from ..outputs import check_writable_parent

__all__ = ["PROVENANCE_FILE", "ModelDirPlan", "check_model_dir", "compared_config", "start_model_dir"]

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
#: Settings that do not change the model (a rerun may differ in them and still resume).
COSMETIC_KEYS = frozenset({"progress"})
#: What a directory written by train-teacher or distill may hold (anything else: not ours, never replaced).
_MODEL_DIR_NAMES = frozenset({PROVENANCE_FILE, "preprocessing.json", "flow1.pt", "teacher.pt", "student.pt",
                              "train_config.json", "distill_config.json", "metrics.json", "history.json",
                              "checkpoints"})
#: The provenance entries a resume must match, with how messages name them.
_COMPARED = (("dataset_digest", "dataset", "dataset_dir"), ("teacher_digest", "teacher", "teacher_dir"))


def compared_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a resume must match: the whole config without :data:`COSMETIC_KEYS`."""
    return {k: v for k, v in config.items() if k not in COSMETIC_KEYS}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, Mapping):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between a recorded provenance and a new one, in words (empty: the same)."""
    diffs: list[str] = []
    for key, name, where in _COMPARED:
        if old.get(key) != new.get(key):
            diffs.append(f"{name} {old.get(where)} (digest {_short(old.get(key))}) vs {new.get(where)} "
                         f"(digest {_short(new.get(key))})")
    a, b = _flatten(old.get("config", {})), _flatten(new.get("config", {}))
    changed = [k for k in sorted(set(a) | set(b)) if k.split(".")[0] not in COSMETIC_KEYS and a.get(k) != b.get(k)]
    for k in changed[:4]:
        diffs.append(f"{k} {a.get(k, '(unset)')!r} vs {b.get(k, '(unset)')!r}")
    if len(changed) > 4:
        diffs.append(f"{len(changed) - 4} more setting(s)")
    return diffs


@dataclass(frozen=True)
class ModelDirPlan:
    """What :func:`start_model_dir` will do: ``new`` (create), ``resume`` (continue) or ``replace`` (start over).

    Attributes:
        path: the model directory.
        mode: ``new``, ``resume`` or ``replace``.
    """

    path: Path
    mode: str

    @property
    def resumed(self) -> bool:
        return self.mode == "resume"


def _is_model_dir(path: Path) -> bool:
    names = {p.name for p in path.iterdir()}
    return bool(names) and names <= _MODEL_DIR_NAMES | {n for n in names if n.startswith(".")}


def check_model_dir(out_dir: Path, record: Mapping[str, Any], *, overwrite: bool, option: str = "--out") -> ModelDirPlan:
    """Decide, writing nothing, whether ``out_dir`` may receive the model described by ``record``.

    Args:
        out_dir: the model directory (``--out``).
        record: the new provenance: ``stage``, ``dataset_digest``, ``config`` (see
            :func:`compared_config`) and, for a student, ``teacher_digest``.
        overwrite: start over in an existing model directory instead of resuming (``--overwrite``).
        option: how messages name the directory.

    Raises:
        CalodistillError: ``out_dir`` is a file or unwritable; it holds a model made from other inputs or
            settings (named), or one without a provenance record, and ``overwrite`` is not given; or it is
            a directory calodistill did not write (never replaced).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CalodistillError(f"{option} {out_dir}: is a file, not a directory")
    if not out_dir.exists():
        check_writable_parent(out_dir, option)
        return ModelDirPlan(out_dir, "new")
    if not any(out_dir.iterdir()):
        check_writable_parent(out_dir / "x", option)
        return ModelDirPlan(out_dir, "new")
    if not _is_model_dir(out_dir):
        raise CalodistillError(f"{option} {out_dir}: exists and is not a model directory written by calodistill; "
                               "refusing to write into it (choose a new or empty directory)")
    check_writable_parent(out_dir / "x", option)
    if overwrite:
        return ModelDirPlan(out_dir, "replace")
    try:
        old = json.loads((out_dir / PROVENANCE_FILE).read_text())
    except FileNotFoundError:
        raise CalodistillError(f"{option} {out_dir}: holds a model without {PROVENANCE_FILE} (written by an older "
                               "calodistill), so a rerun cannot tell what it was made from; pass --overwrite to "
                               "start over") from None
    except (OSError, ValueError) as exc:
        raise CalodistillError(f"{option} {out_dir}: unreadable {PROVENANCE_FILE} ({' '.join(str(exc).split())}); "
                               "pass --overwrite to start over") from None
    if not isinstance(old, dict) or old.get("stage") != record.get("stage"):
        made_by = old.get("stage") if isinstance(old, dict) else None
        raise CalodistillError(f"{option} {out_dir}: holds a model made by {made_by or 'another command'}, not "
                               f"{record.get('stage')}; pass --overwrite to start over")
    diffs = _differences(old, json.loads(json.dumps(record, default=str)))  # compared as it is stored
    if diffs:
        raise CalodistillError(f"{option} {out_dir}: holds a {record.get('stage')} run made from other inputs or "
                               f"settings, which cannot be resumed with these (recorded vs now): {'; '.join(diffs)}; "
                               "pass --overwrite to start over, or choose another --out")
    logger.info("%s: resuming the run in %s (same inputs and settings)", record.get("stage"), out_dir)
    return ModelDirPlan(out_dir, "resume")


def start_model_dir(plan: ModelDirPlan, record: Mapping[str, Any], config_file: str,
                    config: Mapping[str, Any]) -> None:
    """Create (or clear) the model directory and write its records, once every check has passed.

    On a resume nothing is written: the directory already records these inputs and settings.

    Args:
        plan: from :func:`check_model_dir`.
        record: the provenance to write (``provenance.json``).
        config_file: the settings file's name (``train_config.json``).
        config: the full settings to write there.
    """
    if plan.resumed:
        return
    if plan.mode == "replace":
        logger.info("--overwrite: removing the previous run in %s", plan.path)
        for child in plan.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    plan.path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan.path / PROVENANCE_FILE, dict(record))
    atomic_write_json(plan.path / config_file, dict(config))
