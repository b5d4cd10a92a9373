"""Pipeline DAGs as data: parse and validate ``dags/*.yaml`` into typed objects.

A DAG file (dags/quickstart.yaml is one) names a pipeline, its ``tracking`` and ``cluster`` settings
and its stages. Each stage has a ``kind`` (a registered stage function), named ``inputs`` (another
stage's output ``STAGE.OUTPUT``, a URI such as ``synth:calogan?n=1000``, or an existing file, relative to
the working directory), named ``outputs`` (paths inside the stage's directory of the run) and ``params``
(passed to the stage function).

Everything is checked on load: unknown keys at every level, unknown stage kinds, unknown or missing
inputs, references to undeclared outputs, missing files, cycles, and each stage's params against its
typed config. Errors are :class:`~pipeline.errors.CalodistillError` with a one-line message naming the
file (or the ``--set`` to blame), the stage and the key.

``--set stage.key=value`` overrides (:func:`apply_overrides`) set ``params.key`` (dotted keys reach into
nested mappings; ``stage.inputs.name``, ``stage.gpu`` and ``stage.resources`` are spelled out); the
value is parsed as YAML by :mod:`pipeline.config`: ``3`` is an int, ``1e-3`` a float, ``[a, b]`` a list.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import build_config, load_yaml, parse_set
from ..errors import CalodistillError
from .cluster import ClusterSpec, parse_cluster

__all__ = [
    "ClusterSpec",
    "DagSpec",
    "FileInput",
    "InputValue",
    "LiteralInput",
    "StageRef",
    "StageSpec",
    "TrackingSpec",
    "apply_overrides",
    "load_dag",
    "parse_dag",
    "parse_override",
]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")

_TOP_KEYS = {"name", "description", "tracking", "cluster", "stages"}
_STAGE_KEYS = {"kind", "description", "inputs", "outputs", "params", "gpu", "resources"}


@dataclass(frozen=True)
class StageRef:
    """An input that is another stage's output: ``stage.output``."""

    stage: str
    output: str

    def __str__(self) -> str:
        return f"{self.stage}.{self.output}"


@dataclass(frozen=True)
class FileInput:
    """An input that is an existing file or directory (resolved to an absolute path)."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class LiteralInput:
    """An input given as a URI that names data rather than a file (``synth:calogan?n=1000``)."""

    value: str

    def __str__(self) -> str:
        return self.value


InputValue = StageRef | FileInput | LiteralInput


@dataclass(frozen=True)
class TrackingSpec:
    """MLflow settings of a pipeline.

    Attributes:
        experiment: MLflow experiment name.
        registered_model: registry name the student of this pipeline is registered under (None: none).
        alias: registry alias set on the newly registered student version.
        system_metrics_interval: seconds between system-metrics samples of a stage run.
    """

    experiment: str = "calodistill"
    registered_model: str | None = None
    alias: str = "champion"
    system_metrics_interval: float = 5.0


@dataclass(frozen=True)
class StageSpec:
    """One stage of a DAG.

    Attributes:
        name: the stage name (also its MLflow run name and its directory in the run).
        kind: registered stage kind (see :mod:`pipeline.stages`).
        inputs: input name → one value or a tuple of values (for inputs that take several).
        outputs: output name → path relative to the stage directory.
        params: parameters passed to the stage function (plain YAML data).
        gpu: request one ``GPU`` Dask worker resource for this stage.
        resources: extra Dask worker resources requested (merged with ``gpu``).
        description: free text.
    """

    name: str
    kind: str
    inputs: dict[str, InputValue | tuple[InputValue, ...]]
    outputs: dict[str, str]
    params: dict[str, Any]
    gpu: bool = False
    resources: dict[str, float] = field(default_factory=dict)
    description: str = ""

    @property
    def upstream(self) -> list[str]:
        """Names of the stages whose outputs this stage reads, in first-use order."""
        names: list[str] = []
        for value in self.inputs.values():
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, StageRef) and item.stage not in names:
                    names.append(item.stage)
        return names

    def dask_resources(self) -> dict[str, float] | None:
        """Worker resources to request in ``client.submit`` (None when the stage needs none)."""
        res = dict(self.resources)
        if self.gpu:
            res.setdefault("GPU", 1)
        return res or None


@dataclass(frozen=True)
class DagSpec:
    """A validated pipeline.

    Attributes:
        name: pipeline name (names the run directory ``runs/<name>``).
        path: the YAML file it was read from.
        stages: stage name → spec, in file order.
        order: stage names in a topological order (file order among independent stages).
        tracking: MLflow settings.
        cluster: where the stages run (the ``cluster:`` section, :class:`.cluster.ClusterSpec`).
        description: free text.
        raw: the parsed YAML after overrides (for logging).
    """

    name: str
    path: Path
    stages: dict[str, StageSpec]
    order: list[str]
    tracking: TrackingSpec
    cluster: ClusterSpec
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _fail(source: str, where: str, problem: str) -> CalodistillError:
    return CalodistillError(f"{source}: {where}: {problem}" if where else f"{source}: {problem}")


def _check_keys(data: Mapping[str, Any], allowed: set[str], source: str, where: str) -> None:
    for key in data:
        if key not in allowed:
            raise _fail(source, where, f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")


def _as_mapping(value: Any, source: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(source, where, f"expected a mapping, got {type(value).__name__}")
    return dict(value)


def parse_override(text: str) -> tuple[str, list[str], Any]:
    """Split ``stage.key.sub=value`` into ``(stage, [key, sub], value)``, the value parsed as YAML.

    Raises:
        CalodistillError: when the text has no ``=`` or no ``stage.key`` part.
    """
    lhs, value = parse_set(text, form="STAGE.KEY=VALUE")
    parts = lhs.split(".")
    if len(parts) < 2:
        raise CalodistillError(f"--set {text}: expected STAGE.KEY=VALUE (e.g. train_teacher.epochs=3)")
    return parts[0], parts[1:], value


def _stage_path(keys: list[str]) -> list[str]:
    """Keys inside a stage: ``key`` means ``params.key`` unless it is a stage key (``inputs``, ``gpu``…)."""
    return keys if keys[0] in _STAGE_KEYS else ["params", *keys]


def _put(node: dict[str, Any], keys: list[str], value: Any, error: str) -> None:
    """``node[k0][k1]… = value``, creating mappings on the way; ``error`` (with the path) if one is not."""
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise CalodistillError(f"{error}: {'.'.join(keys[: depth + 1])} is not a mapping")
        node = child
    node[keys[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str], source: str) -> dict[str, Any]:
    """Return a copy of the parsed YAML with ``--set stage.key=value`` overrides applied.

    ``stage.key`` means ``stage.params.key`` unless ``key`` is one of ``inputs``, ``params``, ``gpu``,
    ``resources``, ``outputs``, ``kind`` or ``description``.

    Raises:
        CalodistillError: for an unknown stage or a key that descends into a non-mapping.
    """
    data = copy.deepcopy(raw)
    stages = data.get("stages")
    for text in overrides:
        stage, keys, value = parse_override(text)
        if not isinstance(stages, dict) or stage not in stages:
            known = ", ".join(stages) if isinstance(stages, dict) else ""
            raise CalodistillError(f"{source}: --set {text}: unknown stage {stage!r} (stages: {known})")
        if stages[stage] is None:
            stages[stage] = {}
        _put(stages[stage], _stage_path(keys), value, f"{source}: --set {text}: stage {stage!r}")
    return data


def _params_problem(kind: Any, params: dict[str, Any]) -> str | None:
    """What is wrong with a stage's params (one line), or None."""
    if kind.params is not None:
        for key in params:
            if key not in kind.params:
                return f"params: unknown key {key!r} for kind {kind.name!r} (allowed: {', '.join(sorted(kind.params))})"
    if kind.validate_params is not None:
        try:
            kind.validate_params(params)
        except CalodistillError as exc:
            return " ".join(str(exc).split())
    return None


def _check_params(kind: Any, params: dict[str, Any], source: str, where: str,
                  file_params: dict[str, Any] | None, param_sets: Sequence[tuple[str, list[str], Any]]) -> None:
    """Validate a stage's params; blame the ``--set`` that made valid params from the file invalid."""
    problem = _params_problem(kind, params)
    if problem is None:
        return
    if param_sets and _params_problem(kind, file_params or {}) is None:
        current = copy.deepcopy(file_params or {})
        for text, keys, value in param_sets:
            _put(current, keys, value, f"{source}: --set {text}: {where}: params")
            found = _params_problem(kind, current)
            if found is not None:
                raise CalodistillError(f"{source}: --set {text}: {where}: {found}")
    raise _fail(source, where, problem)


def _parse_input_value(
    value: Any, stage_names: set[str], source: str, where: str, base_dir: Path
) -> InputValue:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise _fail(source, where, f"expected a STAGE.OUTPUT reference, a file path or a URI, got {value!r}")
    head = value.split(".", 1)[0]
    if "." in value and head in stage_names and "/" not in head:
        return StageRef(head, value.split(".", 1)[1])
    match = _SCHEME_RE.match(value)
    if match and match.group(1).lower() != "file" and len(match.group(1)) > 1:
        return LiteralInput(value)
    path_text = value[5:] if value.startswith("file:") else value
    path = Path(path_text).expanduser()
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    if not path.exists():
        hint = f" (and {head!r} is not a stage)" if "." in value and "/" not in value else ""
        raise _fail(source, where, f"input file {path_text!r} does not exist{hint}")
    return FileInput(path)


def _parse_stage(
    name: str, data: Any, stage_names: set[str], source: str, base_dir: Path,
    file_params: dict[str, Any] | None = None, param_sets: Sequence[tuple[str, list[str], Any]] = (),
) -> StageSpec:
    from .registry import get_stage_kind, stage_kind_names

    where = f"stage {name!r}"
    if not _NAME_RE.match(name):
        raise _fail(source, where, "stage names are letters, digits, '_' and '-' (no dots)")
    data = _as_mapping(data, source, where)
    _check_keys(data, _STAGE_KEYS, source, where)
    if "kind" not in data:
        raise _fail(source, where, "missing key 'kind'")
    kind_name = data["kind"]
    try:
        kind = get_stage_kind(str(kind_name))
    except KeyError:
        raise _fail(
            source, where, f"kind: unknown stage kind {kind_name!r} (known: {', '.join(stage_kind_names())})"
        ) from None

    # inputs
    raw_inputs = _as_mapping(data.get("inputs"), source, f"{where}: inputs")
    inputs: dict[str, InputValue | tuple[InputValue, ...]] = {}
    for key, value in raw_inputs.items():
        spec = kind.inputs.get(key)
        if spec is None:
            allowed = ", ".join(kind.inputs) or "none"
            raise _fail(source, where, f"inputs: unknown key {key!r} for kind {kind.name!r} (allowed: {allowed})")
        ikey = f"{where}: inputs.{key}"
        if isinstance(value, list | tuple):
            if not spec.multiple:
                raise _fail(source, ikey, "takes one value, got a list")
            if not value and spec.required:
                raise _fail(source, ikey, "empty list")
            inputs[key] = tuple(
                _parse_input_value(v, stage_names, source, f"{ikey}[{i}]", base_dir) for i, v in enumerate(value)
            )
        else:
            parsed = _parse_input_value(value, stage_names, source, ikey, base_dir)
            inputs[key] = (parsed,) if spec.multiple else parsed
    for key, spec in kind.inputs.items():
        if spec.required and key not in inputs:
            raise _fail(source, where, f"inputs: missing input {key!r} required by kind {kind.name!r}")

    # outputs
    raw_outputs = data.get("outputs")
    outputs: dict[str, str] = {}
    if raw_outputs is None:
        outputs = dict(kind.outputs)
    elif isinstance(raw_outputs, list | tuple):
        for out in raw_outputs:
            if out not in kind.outputs:
                raise _fail(source, where, f"outputs: unknown output {out!r} for kind {kind.name!r} "
                            f"(allowed: {', '.join(kind.outputs)})")
            outputs[str(out)] = kind.outputs[out]
    elif isinstance(raw_outputs, Mapping):
        for out, rel in raw_outputs.items():
            if out not in kind.outputs:
                raise _fail(source, where, f"outputs: unknown output {out!r} for kind {kind.name!r} "
                            f"(allowed: {', '.join(kind.outputs)})")
            rel_s = str(rel) if rel is not None else kind.outputs[out]
            if Path(rel_s).is_absolute() or ".." in Path(rel_s).parts or rel_s.startswith("_"):
                raise _fail(source, f"{where}: outputs.{out}", f"{rel_s!r} must be a relative path inside the stage directory")
            outputs[str(out)] = rel_s
    else:
        raise _fail(source, f"{where}: outputs", "expected a list of output names or a mapping name → path")
    for out in kind.outputs:
        if out not in outputs:
            raise _fail(source, where, f"outputs: missing output {out!r} produced by kind {kind.name!r}")

    params = _as_mapping(data.get("params"), source, f"{where}: params")
    _check_params(kind, params, source, where, file_params, param_sets)

    gpu = data.get("gpu", False)
    if not isinstance(gpu, bool):
        raise _fail(source, f"{where}: gpu", f"expected true or false, got {gpu!r}")
    resources = _as_mapping(data.get("resources"), source, f"{where}: resources")
    for rkey, rval in resources.items():
        if not isinstance(rval, int | float) or isinstance(rval, bool) or rval < 0:
            raise _fail(source, f"{where}: resources.{rkey}", f"expected a non-negative number, got {rval!r}")
    description = data.get("description") or ""
    return StageSpec(
        name=name,
        kind=kind.name,
        inputs=inputs,
        outputs=outputs,
        params=params,
        gpu=gpu,
        resources={str(k): float(v) for k, v in resources.items()},
        description=str(description),
    )


def _topological_order(stages: Mapping[str, StageSpec], source: str) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise CalodistillError(f"{source}: stage {name!r}: inputs: cycle {' -> '.join(cycle)}")
        state[name] = 1
        for up in stages[name].upstream:
            visit(up, [*path, name])
        state[name] = 2
        order.append(name)

    for name in stages:
        visit(name, [])
    return order


def parse_dag(raw: Any, source: str | Path, base_dir: Path | None = None, overrides: Sequence[str] = ()) -> DagSpec:
    """Validate parsed YAML (a mapping) into a :class:`DagSpec`.

    Args:
        raw: the YAML document.
        source: file name used in error messages.
        base_dir: directory relative file inputs are resolved against (default: the working directory).
        overrides: ``stage.key=value`` strings (``--set``) applied to ``raw`` first.

    Raises:
        CalodistillError: naming the file (or the ``--set``), the stage and the key of the first problem found.
    """
    src = str(source)
    base = Path.cwd() if base_dir is None else base_dir
    file_data = _as_mapping(raw, src, "")
    data = apply_overrides(file_data, overrides, src)
    param_sets: dict[str, list[tuple[str, list[str], Any]]] = {}
    for text in overrides:
        stage, keys, value = parse_override(text)
        path = _stage_path(keys)
        if path[0] == "params" and len(path) > 1:
            param_sets.setdefault(stage, []).append((text, path[1:], value))
    _check_keys(data, _TOP_KEYS, src, "")
    name = data.get("name") or Path(src).stem
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _fail(src, "name", f"{name!r} is not a valid pipeline name (letters, digits, '_', '-')")
    tracking = build_config(TrackingSpec, (_as_mapping(data.get("tracking"), src, "tracking"), f"{src}: tracking"))
    cluster = parse_cluster(data.get("cluster"), src)
    raw_stages = _as_mapping(data.get("stages"), src, "stages")
    if not raw_stages:
        raise _fail(src, "stages", "no stages")
    names = set(raw_stages)
    file_stages = file_data.get("stages") if isinstance(file_data.get("stages"), dict) else {}
    stages = {}
    for n, d in raw_stages.items():
        file_stage = file_stages.get(n) if isinstance(file_stages.get(n), dict) else {}
        file_params = file_stage.get("params") if isinstance(file_stage.get("params"), dict) else {}
        stages[n] = _parse_stage(n, d, names, src, base, file_params, param_sets.get(n, ()))
    # references must name declared outputs
    for stage in stages.values():
        for key, value in stage.inputs.items():
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, StageRef) and item.output not in stages[item.stage].outputs:
                    raise _fail(src, f"stage {stage.name!r}", f"inputs.{key}: stage {item.stage!r} has no output "
                                f"{item.output!r} (outputs: {', '.join(stages[item.stage].outputs)})")
                if isinstance(item, StageRef) and item.stage == stage.name:
                    raise _fail(src, f"stage {stage.name!r}", f"inputs.{key}: cycle {stage.name} -> {stage.name}")
    order = _topological_order(stages, src)
    return DagSpec(
        name=name,
        path=Path(src),
        stages=stages,
        order=order,
        tracking=tracking,
        cluster=cluster,
        description=str(data.get("description") or ""),
        raw=data,
    )


def load_dag(path: str | Path, overrides: Sequence[str] = ()) -> DagSpec:
    """Read, override and validate a DAG file.

    Args:
        path: the YAML file.
        overrides: ``stage.key=value`` strings (``--set``).

    Raises:
        CalodistillError: unreadable file, invalid YAML, or any validation problem (see :func:`parse_dag`).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CalodistillError(f"{path}: cannot read DAG file ({exc.strerror or exc})") from exc
    raw = _as_mapping(load_yaml(text, str(path)), str(path), "")
    return parse_dag(raw, path, overrides=overrides)
