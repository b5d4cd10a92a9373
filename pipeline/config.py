"""Typed configuration: one YAML reader, one ``--set KEY=VALUE`` parser, one loader into dataclasses.

Config files, ``--set`` values and DAG files are all read as YAML with one change: ``1e-3`` is a
float (YAML 1.2), not a string. :func:`build_config` lays mappings (nested or dotted keys) over a
dataclass's defaults; an unknown key, a wrong type or a value its dataclass rejects fails in one line
naming the key and where it came from (a file, ``--set KEY=VALUE``, a DAG stage's ``params``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..flows.errors import FlowsError
from .errors import CalodistillError

__all__ = [
    "as_config",
    "build_config",
    "config_to_dict",
    "load_config_file",
    "load_yaml",
    "parse_set",
    "parse_value",
    "set_sources",
]

T = TypeVar("T")
Source = tuple[Mapping[str, Any] | None, str]
"""A mapping of settings and the name of where it came from (used in error messages)."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` and ``2E5`` (no dot) as floats, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text (``1e-3`` a float); a CalodistillError naming ``source`` when it is invalid."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: no code runs
    except yaml.YAMLError as exc:
        raise CalodistillError(f"{source}: invalid YAML ({' '.join(str(exc).split())})") from None


def parse_value(text: str, source: str) -> Any:
    """One value written as YAML: ``3`` int, ``1e-3`` float, ``[1, 2]`` list, ``true`` bool, '' for nothing."""
    return load_yaml(text, source) if text.strip() else ""


def parse_set(text: str, form: str = "KEY=VALUE") -> tuple[str, Any]:
    """``"a.b=1e-3"`` → ``("a.b", 0.001)``: a dotted key and its value parsed as YAML.

    Raises:
        CalodistillError: ``--set TEXT: expected FORM`` when there is no ``=`` or an empty key part.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not all(key.split(".")):
        raise CalodistillError(f"--set {text}: expected {form}")
    return key, parse_value(raw, f"--set {text}")


def set_sources(items: Sequence[str]) -> list[Source]:
    """One :data:`Source` per ``--set KEY=VALUE`` item, so that an error names the item."""
    out: list[Source] = []
    for text in items:
        key, value = parse_set(text)
        out.append(({key: value}, f"--set {text}"))
    return out


def load_config_file(path: Path | str) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (CalodistillError naming the file on failure)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise CalodistillError(f"{p}: cannot read config file ({exc.strerror})") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CalodistillError(f"{p}: invalid JSON ({exc})") from None
    else:
        data = load_yaml(text, str(p))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CalodistillError(f"{p}: expected a mapping of settings at the top level")
    return data


# --------------------------------------------------------------------------------------------- loader


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (list, tuple) or tp in (list, tuple):
        return "a list"
    if typing.get_origin(tp) is dict or tp is dict:
        return "a mapping"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """``(True, value as tp)`` or ``(False, None)`` when ``value`` is not of type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, None
    if tp is type(None):
        return value is None, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple) or tp in (list, tuple):
        ok = isinstance(value, (list, tuple))
        return ok, (tuple(value) if (origin or tp) is tuple else list(value)) if ok else None
    if origin is dict or tp is dict:
        return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else None
    return True, value  # Any and other annotations: not checked here


def _expand_dotted(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise CalodistillError(f"{source}: keys must be strings, got {key!r}")
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CalodistillError(f"{source}: key '{key}' conflicts with a value set for '{part}'")
        if isinstance(value, Mapping):
            value = _expand_dotted(value, source)
            existing = node.get(parts[-1])
            if isinstance(existing, dict):
                existing.update(value)
                continue
        node[parts[-1]] = value
    return out


class _Builder:
    """Collects the values of every source, remembering which source set each key."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.default = cls()
        self.values: dict[str, Any] = {}
        self.origins: dict[str, str] = {}

    def merge(self, data: Mapping[str, Any], source: str) -> None:
        self._merge(self.cls, self.default, self.values, _expand_dotted(data, source), source, "")

    def _merge(self, cls: type, default: Any, values: dict[str, Any], data: Mapping[str, Any], source: str,
               prefix: str) -> None:
        types_ = _field_types(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in data.items():
            where = f"{prefix}{key}"
            if key not in types_:
                known = ", ".join(f"{prefix}{k}" for k in types_)
                raise CalodistillError(f"{source}: unknown key '{where}' (known: {known})")
            tp = types_[key]
            if _is_dataclass_type(tp):
                if not isinstance(value, Mapping):
                    raise CalodistillError(f"{source}: {where}: expected a mapping of settings, got {value!r}")
                self._merge(tp, getattr(default, key), values.setdefault(key, {}), value, source, f"{where}.")
            elif "keys_of" in fields[key].metadata:  # a mapping of some fields of another dataclass
                self._merge_partial(fields[key].metadata, getattr(default, key), values, key, value, source, where)
            else:
                ok, out = _coerce(value, tp)
                if not ok:
                    raise CalodistillError(f"{source}: {where}: expected {_describe(tp)}, got {value!r}")
                values[key] = out
                self.origins[where] = source

    def _merge_partial(self, meta: Mapping[str, Any], default: Mapping[str, Any], values: dict[str, Any],
                       key: str, value: Any, source: str, where: str) -> None:
        if not isinstance(value, Mapping):
            raise CalodistillError(f"{source}: {where}: expected a mapping of settings, got {value!r}")
        allowed = tuple(meta.get("keys") or (f.name for f in dataclasses.fields(meta["keys_of"])))
        hints = _field_types(meta["keys_of"])
        merged = values.setdefault(key, dict(default))
        for sub, item in value.items():
            if sub not in allowed:
                known = ", ".join(f"{where}.{k}" for k in allowed)
                raise CalodistillError(f"{source}: unknown key '{where}.{sub}' (known: {known})")
            ok, out = _coerce(item, hints[sub])
            if not ok:
                raise CalodistillError(f"{source}: {where}.{sub}: expected {_describe(hints[sub])}, got {item!r}")
            merged[sub] = out
            self.origins[f"{where}.{sub}"] = source

    def construct(self) -> Any:
        return self._construct(self.cls, self.default, self.values, "")

    def _construct(self, cls: type, default: Any, values: dict[str, Any], prefix: str) -> Any:
        types_ = _field_types(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if _is_dataclass_type(types_[f.name]):
                kwargs[f.name] = self._construct(types_[f.name], getattr(default, f.name), values.get(f.name, {}),
                                                 f"{prefix}{f.name}.")
            else:
                kwargs[f.name] = values.get(f.name, getattr(default, f.name))
        try:
            return cls(**kwargs)
        except (FlowsError, CalodistillError) as exc:
            raise self._blame(str(exc), prefix) from None

    def _blame(self, message: str, prefix: str) -> CalodistillError:
        """The dataclass's own ``"FIELD: problem"``, said of the key and the source that set it."""
        head, sep, rest = message.partition(": ")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", head):
            return CalodistillError(f"config: {prefix.rstrip('.') or self.cls.__name__}: {message}")
        key = f"{prefix}{head}"
        source = self.origins.get(key) or next(
            (s for k, s in self.origins.items() if k.startswith(f"{key}.")), "defaults")
        return CalodistillError(f"{source}: {key}: {rest}")


def build_config(cls: type[T], *sources: Source) -> T:
    """A ``cls`` instance: its defaults overridden by each ``(mapping, source name)`` in turn.

    Nested dataclass fields take nested mappings or dotted keys (``teacher.train.epochs``); a field
    whose metadata has ``keys_of`` (a dataclass) takes a mapping of some of that dataclass's fields
    (``keys``: which), merged key by key over its default.

    Raises:
        CalodistillError: ``"SOURCE: KEY: problem"`` for an unknown key, a value of the wrong type or
            one the dataclass rejects, SOURCE being the name given with the mapping that set it.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"{cls} is not a dataclass")
    builder = _Builder(cls)
    for data, source in sources:
        if data is None:
            continue
        if dataclasses.is_dataclass(data) and not isinstance(data, type):
            data = dataclasses.asdict(data)
        if not isinstance(data, Mapping):
            raise CalodistillError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        builder.merge(data, source)
    return builder.construct()


def as_config(cls: type[T], config: Mapping[str, Any] | T | None, source: str = "config") -> T:
    """``config`` itself when it is a ``cls``, else :func:`build_config` of it (None: the defaults)."""
    if isinstance(config, cls):
        return config
    return build_config(cls, (config, source))  # type: ignore[arg-type]


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able nested dict of a config dataclass."""
    return dataclasses.asdict(config)
