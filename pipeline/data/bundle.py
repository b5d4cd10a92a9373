"""One model, opened once: geometry, particle, preprocessing, Flow I, Flow II and provenance.

A model directory (written by the train-teacher and distill stages) holds ``preprocessing.json``,
``flow1.pt``, ``teacher.pt`` and/or ``student.pt`` and the JSON records of the stage that wrote it.
:meth:`ModelBundle.open` finds it (:func:`~calodistill.pipeline.data.store.resolve_model_dir`: a directory,
a logged MLflow pyfunc directory or an MLflow model URI), reads its JSON files once and loads each flow on
first use with ``torch.load(weights_only=True)``. generate, evaluate, bench, the MLflow pyfunc and the
notebooks open models here. The geometry a model was trained on travels with it (the whole geometry
record in ``provenance.json``); :meth:`ModelBundle.check_geometry` refuses data on another one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ...flows.errors import FlowsError
from ...flows.models import IAF, MAF
from ...flows.preprocessing import CaloFlowPreprocessor
from ...flows.sampling import ShowerGenerator
from ...flows.serialization import FLOW1_FILE, PREPROCESSING_FILE, STUDENT_FILE, TEACHER_FILE, load_flow
from ..errors import CalodistillError
from .geometry import Geometry, get_geometry, infer_geometry
from .store import resolve_model_dir

__all__ = ["KINDS", "ModelBundle"]

logger = logging.getLogger(__name__)

#: Flow II kinds, in the order a directory holding both is opened as.
KINDS: tuple[str, ...] = ("student", "teacher")
FLOW2_FILES: dict[str, str] = {"student": STUDENT_FILE, "teacher": TEACHER_FILE}
_FLOW2_CLASS: dict[str, type] = {"student": IAF, "teacher": MAF}
#: JSON records that are the model's provenance (what the stage that wrote it records).
PROVENANCE_FILES: tuple[str, ...] = ("provenance.json", "train_config.json", "distill_config.json", "metrics.json")
#: The files sampling depends on (what :attr:`ModelBundle.weights_digest` hashes).
WEIGHTS_FILES: tuple[str, ...] = (PREPROCESSING_FILE, FLOW1_FILE, TEACHER_FILE, STUDENT_FILE)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


class ModelBundle:
    """A model directory opened once (use :meth:`open`).

    Attributes:
        path: the local model directory.
        kind: "student" (IAF Flow II) or "teacher" (MAF Flow II): the Flow II this bundle samples with.
        kinds: the Flow II kinds present in the directory (a directory may hold both).
        records: every top-level JSON file of the directory, parsed (name → content).
    """

    def __init__(self, path: Path, kind: str, kinds: tuple[str, ...], records: dict[str, Any]) -> None:
        self.path = path
        self.kind = kind
        self.kinds = kinds
        self.records = records
        self._preprocessing: CaloFlowPreprocessor | None = None
        self._flow1: MAF | None = None
        self._flow2: dict[str, MAF | IAF] = {}
        self._generator: ShowerGenerator | None = None
        self._geometry: Geometry | None = None
        self._digest: str | None = None

    # ------------------------------------------------------------------------------------------ open
    @classmethod
    def open(cls, model: str | os.PathLike[str], tracking_uri: str | None = None, cache_dir: Path | None = None,
             *, kind: str | None = None, flow2_only: bool = False, label: str = "--model") -> ModelBundle:
        """Find and open a model.

        Args:
            model: a model directory, a logged MLflow pyfunc directory or an MLflow model URI
                (``models:/NAME@ALIAS``, ``runs:/RUN_ID/student``).
            tracking_uri: MLflow tracking URI for URIs (default: ``MLFLOW_TRACKING_URI``, else ``mlflow.db``).
            cache_dir: where a URI's model is downloaded (default: a new temporary directory).
            kind: "student" or "teacher" to insist on one Flow II; None takes the student when both exist.
            flow2_only: accept a directory with only ``teacher.pt``/``student.pt`` (the benchmark's models);
                preprocessing, Flow I and the generator are then unavailable.
            label: how resolution errors name the model (the command-line option it came from).

        Raises:
            CalodistillError: one line naming the path and the problem (missing, not a model, wrong kind,
                unreadable preprocessing).
        """
        if kind is not None and kind not in KINDS:
            raise CalodistillError(f"kind: must be 'student', 'teacher' or None, got {kind!r}")
        path = resolve_model_dir(str(model), cache_dir=cache_dir, tracking_uri=tracking_uri,
                                 flow2_only=flow2_only, label=label)
        kinds = tuple(k for k in KINDS if (path / FLOW2_FILES[k]).is_file())
        if kind is not None and kind not in kinds:
            raise CalodistillError(f"{path}: no {FLOW2_FILES[kind]} (the directory holds a {kinds[0]} model, "
                                   f"not a {kind})")
        bundle = cls(path, kind or kinds[0], kinds, cls._read_records(path))
        if not flow2_only or (path / PREPROCESSING_FILE).is_file():
            bundle._load_preprocessing()
        logger.debug("opened %s model %s", bundle.kind, path)
        return bundle

    @staticmethod
    def _read_records(path: Path) -> dict[str, Any]:
        records: dict[str, Any] = {}
        for p in sorted(path.glob("*.json")):
            try:
                records[p.name] = json.loads(p.read_text())
            except (OSError, ValueError) as exc:
                if p.name == PREPROCESSING_FILE:
                    raise CalodistillError(f"{p}: not valid JSON ({_one_line(exc)})") from None
                logger.debug("%s: skipped (%s)", p, exc)
        return records

    def _load_preprocessing(self) -> None:
        state = self.records.get(PREPROCESSING_FILE)
        if state is None:
            raise CalodistillError(f"{self.path}: missing {PREPROCESSING_FILE}")
        if not isinstance(state, dict):
            raise CalodistillError(f"{self.path / PREPROCESSING_FILE}: expected a JSON object")
        try:
            self._preprocessing = CaloFlowPreprocessor.from_state_dict(
                state, source=str(self.path / PREPROCESSING_FILE))
        except FlowsError as exc:
            raise CalodistillError(_one_line(exc)) from None

    # ------------------------------------------------------------------------------ what it records
    @property
    def preprocessing(self) -> CaloFlowPreprocessor:
        """The fitted preprocessing (read at :meth:`open`)."""
        if self._preprocessing is None:
            raise CalodistillError(f"{self.path}: missing {PREPROCESSING_FILE} (a Flow II-only directory)")
        return self._preprocessing

    @property
    def layer_sizes(self) -> list[int]:
        """Voxels per calorimeter layer."""
        return list(self.preprocessing.layer_sizes)

    @property
    def n_voxels(self) -> int:
        """Voxels per shower (Flow II's dimension)."""
        return int(sum(self.layer_sizes))

    @property
    def geometry(self) -> Geometry:
        """The geometry recorded in a JSON file of the directory (a whole geometry record, or a preset's
        name), else the preset with this many voxels."""
        if self._geometry is None:
            self._geometry = self._recorded_geometry() or infer_geometry(self.n_voxels, source=str(self.path))
        return self._geometry

    def _voxel_count(self) -> int | None:
        if self._preprocessing is not None:
            return self.n_voxels
        flow2 = self.path / FLOW2_FILES[self.kind]
        return int(self.flow2.config.features) if flow2.is_file() else None

    def _recorded_geometry(self) -> Geometry | None:
        """A whole geometry record first, else a preset named in a record; None when none fits."""
        n_voxels = self._voxel_count()
        found: list[Geometry] = []
        for key, data in self.records.items():
            geo = data.get("geometry") if isinstance(data, dict) else None
            try:
                if isinstance(geo, dict) and "layers" in geo:
                    found.insert(0, Geometry.from_dict(geo, str(self.path / key)))
                elif isinstance(geo, dict) and isinstance(geo.get("name"), str):
                    found.append(get_geometry(geo["name"]))
                elif isinstance(geo, str) and geo:
                    found.append(get_geometry(geo))
            except CalodistillError:
                continue
        return next((g for g in found if n_voxels is None or g.n_voxels == n_voxels), None)

    def check_geometry(self, geometry: Geometry, what: str) -> None:
        """Refuse ``what`` on ``geometry`` when this model was trained on another geometry (one line).

        Models that record no geometry are checked by their voxels per layer (or in all).
        """
        recorded = self._recorded_geometry()
        if recorded is not None:
            if recorded.same_cells(geometry):
                return
            mine = recorded.describe()
        else:
            sizes = self.layer_sizes if self._preprocessing is not None else None
            if sizes is not None and list(sizes) == list(geometry.layer_sizes):
                return
            count = self._voxel_count()
            if sizes is None and (count is None or count == geometry.n_voxels):
                return
            mine = f"layers of {sizes} voxels" if sizes is not None else f"{count} voxels"
        raise CalodistillError(f"{what} is on geometry {geometry.describe()}, but model {self.path} was trained on "
                               f"{mine}: a model only generates the geometry it was trained on")

    @property
    def particle(self) -> str:
        """The particle recorded in a JSON file of the directory, else the geometry's."""
        for data in self.records.values():
            if isinstance(data, dict) and isinstance(data.get("particle"), str) and data["particle"]:
                return data["particle"]
        return self.geometry.particle

    @property
    def energy_range(self) -> tuple[float, float] | None:
        """Incident-energy range (MeV) of the training data, if a record has ``incident_energy_range``
        (``provenance.json``, written by the train-teacher and distill stages)."""
        for data in self.records.values():
            rng = data.get("incident_energy_range") if isinstance(data, dict) else None
            if isinstance(rng, list | tuple) and len(rng) == 2:
                return float(rng[0]), float(rng[1])
        return None

    @property
    def provenance(self) -> dict[str, Any]:
        """What the stage that wrote the model recorded: ``provenance`` (dataset and teacher digests,
        settings, training energy range), ``train_config``, ``distill_config``, ``metrics`` (those
        present), and ``dataset_digest`` when a record has one."""
        out = {name.removesuffix(".json"): self.records[name] for name in PROVENANCE_FILES if name in self.records}
        for data in self.records.values():
            digest = (data.get("dataset_digest") or data.get("dataset_hash")) if isinstance(data, dict) else None
            if isinstance(digest, str):
                out["dataset_digest"] = digest
                break
        return out

    @property
    def history(self) -> Any | None:
        """Per-epoch training metrics (``history.json``), if recorded."""
        return self.records.get("history.json")

    @property
    def digest(self) -> str:
        """Content hash (16 hex digits) of the flow and JSON files: changes when the model does."""
        if self._digest is None:
            h = hashlib.sha256()
            for p in sorted(self.path.glob("*.pt")) + sorted(self.path.glob("*.json")):
                h.update(p.name.encode())
                h.update(p.read_bytes())
            self._digest = h.hexdigest()[:16]
        return self._digest

    @property
    def weights_digest(self) -> str:
        """Content hash (16 hex digits) of the preprocessing and the flow files only.

        What a student records of its teacher: records such as ``metrics.json`` change when a finished
        run is repeated, the model does not.
        """
        h = hashlib.sha256()
        for name in WEIGHTS_FILES:
            p = self.path / name
            if p.is_file():
                h.update(name.encode())
                h.update(p.read_bytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------------------------- the flows
    @property
    def flow1(self) -> MAF:
        """Flow I (layer energies | incident energy), loaded on first use."""
        if self._flow1 is None:
            self.preprocessing  # noqa: B018 - a Flow II-only directory has no Flow I either
            flow = self._load(self.path / FLOW1_FILE)
            if not isinstance(flow, MAF):
                raise CalodistillError(f"{self.path / FLOW1_FILE}: holds {type(flow).__name__}, expected a MAF")
            self._flow1 = flow
        return self._flow1

    @property
    def flow2(self) -> MAF | IAF:
        """Flow II of :attr:`kind` (the IAF student or the MAF teacher), loaded on first use."""
        return self.flow2_of(self.kind)

    def flow2_of(self, kind: str) -> MAF | IAF:
        """Flow II of ``kind`` ("student" or "teacher", one of :attr:`kinds`), loaded once."""
        if kind not in self.kinds:
            raise CalodistillError(f"{self.path}: no {FLOW2_FILES.get(kind, kind)} (holds {', '.join(self.kinds)})")
        if kind not in self._flow2:
            path = self.path / FLOW2_FILES[kind]
            flow = self._load(path)
            expected = _FLOW2_CLASS[kind]
            if not isinstance(flow, expected):
                raise CalodistillError(f"{path}: holds {type(flow).__name__}, a {kind} must be "
                                       f"{'an IAF' if kind == 'student' else 'a MAF'}")
            self._flow2[kind] = flow
        return self._flow2[kind]

    @staticmethod
    def _load(path: Path) -> MAF | IAF:
        try:
            return load_flow(path)
        except FlowsError as exc:
            raise CalodistillError(_one_line(exc)) from None

    def generator(self, device: str | torch.device | None = None) -> ShowerGenerator:
        """The :class:`~calodistill.flows.sampling.ShowerGenerator` (built once; moved to ``device`` if given).

        Args:
            device: where sampling runs (None: CUDA when available on first use, else where it is).
        """
        if self._generator is None:
            try:
                self._generator = ShowerGenerator(self.preprocessing, self.flow1, self.flow2, device=device)
            except FlowsError as exc:
                raise CalodistillError(f"{self.path}: {_one_line(exc)}") from None
        elif device is not None and torch.device(device) != self._generator.device:
            self._generator.to(device)
        return self._generator

    def __repr__(self) -> str:
        return f"ModelBundle({str(self.path)!r}, kind={self.kind!r})"
