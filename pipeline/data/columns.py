"""The column mapping: which columns, branches or datasets of a file hold what, and how they are encoded.

One mapping serves every table-like input: CSV and Parquet columns, ROOT branches (:mod:`.root`) and
HDF5 datasets (:mod:`.hdf5`). It is given as ``--columns key=value,...`` or ``--columns FILE.yaml``::

    tree: h                    # ROOT: the TTree (default: the file's only tree); HDF5: a group ("": the root)
    incident_energy: en_in     # incident energy per entry
    energy_unit: keV           # keV | MeV | GeV (incident energy)
    voxels: shower             # one (multi-dimensional or fixed-size) branch, or a pattern layer_* / v*
    voxel_unit: keV            # keV | MeV | GeV (cell energies)
    voxel_encoding: log10      # linear | log10 (the value is log10 of the energy in voxel_unit)
    empty_value: -5            # log10 only: values <= this are empty cells (energy 0)
    particle: primary          # optional particle column: names, or codes mapped by particle_codes
    particle_codes: {0: gamma, 1: e-, -1: e+}   # or "pdg" (11 → e-, 22 → gamma, 211 → pi+, ...)
    filter: "en_in > 0 and primary != 0"         # optional entry filter: BRANCH OP NUMBER, joined by 'and'

Voxel order: the voxel columns' values of one entry, each flattened in C order and concatenated, are the
geometry's flat voxel vector (layer, then row, then column; :mod:`.geometry`). A branch of shape
``[layers][rows][columns]`` (trailing axes of length 1 are ignored) is read as it is; store yours in that
order. Decoding is done before validation: NaN/inf in the raw values, negative decoded energies, wrong
widths and unknown particle codes are one-line errors naming the file, the column and the row.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalodistillError

__all__ = ["ColumnSpec", "PDG_PARTICLES", "UNITS_MEV"]

#: MeV per unit.
UNITS_MEV: dict[str, float] = {"keV": 1e-3, "MeV": 1.0, "GeV": 1e3}
#: PDG Monte Carlo particle numbers → the names calodistill uses.
PDG_PARTICLES: dict[int, str] = {
    11: "e-", -11: "e+", 22: "gamma", 13: "mu-", -13: "mu+", 111: "pi0", 211: "pi+", -211: "pi-",
    130: "K0L", 321: "K+", -321: "K-", 2112: "neutron", -2112: "antineutron", 2212: "proton", -2212: "antiproton",
}
_ENCODINGS = ("linear", "log10")
_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(==|!=|<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_OPS = {"==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}


def _unit(value: str, key: str, origin: str) -> str:
    for unit in UNITS_MEV:
        if str(value).lower() == unit.lower():
            return unit
    raise CalodistillError(f"{origin}: {key}: must be keV, MeV or GeV, got {value!r}")


def _gap_message(source: str, prefix: str, numbers: list[int]) -> str:
    """Why numbered voxel columns (sorted ``numbers``) are not ``prefix0 .. prefixN``: name what is missing."""
    missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
    if not missing:
        twice = next(a for a, b in zip(numbers, numbers[1:]) if a == b)
        return f"{source}: voxel column number {twice} appears twice ({prefix}{twice} under two names)"
    shown = ", ".join(f"{prefix}{i}" for i in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return (f"{source}: voxel column{'s' if len(missing) > 1 else ''} {shown} {'are' if len(missing) > 1 else 'is'} missing "
            f"(found {len(numbers)} of {prefix}0..{prefix}{numbers[-1]})")


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns hold what, in which units and encodings (the module docstring has the file form).

    Args:
        incident_energy: name of the incident-energy column.
        energy_unit: ``keV``, ``MeV`` or ``GeV`` (incident energy).
        voxels: a column's name, or a prefix pattern ending in ``*`` (``"v*"`` → ``v0, v1, ...``); ``|``
            separates alternatives tried in order.
        particle: name of the optional particle column.
        event_id: name of the optional event-id column.
        tree: ROOT tree (default: the only one in the file) or HDF5 group.
        voxel_unit: ``keV``, ``MeV`` or ``GeV`` (cell energies).
        voxel_encoding: ``linear`` or ``log10``.
        energy_encoding: ``linear`` or ``log10`` (incident energy).
        empty_value: with a log10 encoding, values at or below it are empty cells (energy 0).
        particle_codes: ``""`` (numeric codes kept as text), ``"pdg"``, or ``((code, name), ...)``.
        filter: entry-filter conditions ``"BRANCH OP NUMBER"`` (all must hold), on the raw values.
        origin: the file the mapping was read from (error messages); not part of its identity.
    """

    incident_energy: str = "incident_energy"
    energy_unit: str = "MeV"
    voxels: str = "voxels|v*"
    particle: str = "particle"
    event_id: str = "event_id"
    tree: str = ""
    voxel_unit: str = "MeV"
    voxel_encoding: str = "linear"
    energy_encoding: str = "linear"
    empty_value: float | None = None
    particle_codes: str | tuple[tuple[int, str], ...] = ""
    filter: tuple[str, ...] = ()
    origin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = self.origin or "columns"
        for key in ("incident_energy", "voxels", "particle", "event_id", "tree"):
            if not isinstance(getattr(self, key), str):
                raise CalodistillError(f"{where}: {key}: expected a column name, got {getattr(self, key)!r}")
        object.__setattr__(self, "energy_unit", _unit(self.energy_unit, "energy_unit", where))
        object.__setattr__(self, "voxel_unit", _unit(self.voxel_unit, "voxel_unit", where))
        for key in ("voxel_encoding", "energy_encoding"):
            if getattr(self, key) not in _ENCODINGS:
                raise CalodistillError(f"{where}: {key}: must be linear or log10, got {getattr(self, key)!r}")
        if self.empty_value is not None:
            if isinstance(self.empty_value, bool) or not isinstance(self.empty_value, (int, float)) \
                    or not math.isfinite(self.empty_value):
                raise CalodistillError(f"{where}: empty_value: expected a number, got {self.empty_value!r}")
            if self.voxel_encoding != "log10":
                raise CalodistillError(f"{where}: empty_value: only meaningful with voxel_encoding: log10")
        codes = self.particle_codes
        if isinstance(codes, str):
            if codes not in ("", "pdg"):
                raise CalodistillError(f"{where}: particle_codes: expected 'pdg' or a map code → name, got {codes!r}")
        elif not all(isinstance(c, int) and isinstance(n, str) and n for c, n in codes):
            raise CalodistillError(f"{where}: particle_codes: expected integer codes mapped to names, got {dict(codes)!r}")
        for cond in self.filter:
            if not _CONDITION.match(cond):
                raise CalodistillError(f"{where}: filter: {cond!r} is not BRANCH OP NUMBER (OP one of == != < <= > >=)")

    # -------------------------------------------------------------------------------------- parsing
    @classmethod
    def parse(cls, text: str | dict[str, Any] | ColumnSpec | None) -> ColumnSpec:
        """From ``None`` (defaults), a dict, a mapping file (``.yaml``/``.yml``/``.json``) or ``"key=value,..."``."""
        if text is None:
            return cls()
        if isinstance(text, ColumnSpec):
            return text
        origin = "columns"
        if isinstance(text, (str, Path)) and (Path(text).suffix.lower() in _FILE_SUFFIXES or Path(text).is_file()):
            origin = str(text)
            items = _read_mapping_file(Path(text))
        elif isinstance(text, str):
            items = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                key, sep, value = part.partition("=")
                if not sep:
                    raise CalodistillError(f"columns: expected key=value or a mapping file, got {part!r}")
                items[key.strip()] = value.strip()
        else:
            items = dict(text)
        known = [f.name for f in fields(cls) if f.name != "origin"]
        unknown = sorted(str(k) for k in set(items) - set(known))
        if unknown:
            raise CalodistillError(f"{origin}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
        return cls(**_coerce(items, origin), origin=origin if origin != "columns" else "")

    def with_tree(self, tree: str) -> ColumnSpec:
        """The same mapping reading ``tree`` (the ``file.root:tree`` form)."""
        return replace(self, tree=tree)

    @property
    def is_default(self) -> bool:
        """Whether this is the default mapping (no option given)."""
        return self == ColumnSpec()

    def voxel_columns(self, names: list[str], source: str) -> tuple[str, list[str]]:
        """Resolve the voxel columns among a table's ``names``: ``("list", [name])`` or ``("scalar", [v0..])``."""
        for option in self.voxels.split("|"):
            if option.endswith("*"):
                prefix = option[:-1]
                pattern = re.compile(re.escape(prefix) + r"(\d+)$")
                found = sorted((int(m.group(1)), n) for n in names if (m := pattern.match(n)))
                if found:
                    numbers = [i for i, _ in found]
                    if numbers != list(range(len(numbers))):
                        raise CalodistillError(_gap_message(source, prefix, numbers))
                    return "scalar", [n for _, n in found]
            elif option in names:
                return "list", [option]
        raise CalodistillError(f"{source}: missing voxel columns (looked for {self.voxels!r}; found {', '.join(names[:12])})")

    # ------------------------------------------------------------------------------------- decoding
    @property
    def filter_columns(self) -> list[str]:
        """Columns the entry filter reads."""
        return list(dict.fromkeys(_CONDITION.match(c).group(1) for c in self.filter))  # type: ignore[union-attr]

    def entry_mask(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """Which entries pass the filter, from the raw filter columns (all conditions must hold)."""
        n = len(next(iter(values.values()))) if values else 0
        keep = np.ones(n, dtype=bool)
        for cond in self.filter:
            name, op, number = _CONDITION.match(cond).groups()  # type: ignore[union-attr]
            keep &= _OPS[op](values[name], float(number))
        return keep

    def incident_to_mev(self, raw: np.ndarray, path: str, row_offset: int = 0) -> np.ndarray:
        """Incident energies in MeV (float64) from the raw column."""
        e = np.asarray(raw, dtype=np.float64).reshape(-1)
        if self.energy_encoding == "log10":
            _check_finite(e, path, self.incident_energy, row_offset)
            e = 10.0**e
        if self.energy_unit != "MeV":
            e = e * UNITS_MEV[self.energy_unit]
        return e

    def voxels_to_mev(self, raw: np.ndarray, path: str, row_offset: int = 0) -> np.ndarray:
        """Cell energies in MeV, ``(N, D)`` float32, from the raw values (log10 decoded, sentinel → 0)."""
        if self.voxel_encoding == "linear" and self.voxel_unit == "MeV":
            return np.asarray(raw, dtype=np.float32)
        v = np.asarray(raw, dtype=np.float64)
        if self.voxel_encoding == "log10":
            _check_finite(v, path, self.voxels, row_offset)
            with np.errstate(over="ignore"):
                e = 10.0**v
            if self.empty_value is not None:
                e[v <= self.empty_value] = 0.0
        else:
            e = v
        return (e * UNITS_MEV[self.voxel_unit]).astype(np.float32)

    def particles(self, raw: np.ndarray, path: str, row_offset: int = 0) -> np.ndarray:
        """Particle names (object array) from a column of names or of integer codes."""
        arr = np.asarray(raw).reshape(-1)
        if arr.dtype.kind in "OSU":
            return np.asarray([x.decode() if isinstance(x, bytes) else str(x) for x in arr], dtype=object)
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
                i = int(np.argmax(~np.isfinite(arr) | (arr != np.round(arr))))
                raise CalodistillError(f"{path}: column {self.particle!r}: particle code {arr[i]!r} in row {row_offset + i} is not an integer")
            arr = arr.astype(np.int64)
        elif arr.dtype.kind not in "iub":
            raise CalodistillError(f"{path}: column {self.particle!r} of type {arr.dtype} holds no particle names or codes")
        codes = self.particle_codes
        if codes == "":
            return arr.astype(str).astype(object)
        table = PDG_PARTICLES if codes == "pdg" else dict(codes)  # type: ignore[arg-type]
        uniq, inverse = np.unique(arr, return_inverse=True)
        missing = [int(u) for u in uniq if int(u) not in table]
        if missing:
            i = int(np.argmax(arr == missing[0]))
            kind = "PDG code" if codes == "pdg" else "code"
            raise CalodistillError(f"{path}: column {self.particle!r}: {kind} {missing[0]} in row {row_offset + i} is not "
                                   f"in particle_codes")
        names = np.asarray([table[int(u)] for u in uniq], dtype=object)
        return names[inverse.reshape(-1)]


def _check_finite(values: np.ndarray, path: str, column: str, row_offset: int) -> None:
    finite = np.isfinite(values)
    if not finite.all():
        bad = ~finite.reshape(len(values), -1).all(axis=1) if values.ndim > 1 else ~finite
        raise CalodistillError(f"{path}: column {column!r}: non-finite value (NaN/inf) in row {row_offset + int(np.argmax(bad))}")


def _read_mapping_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CalodistillError(f"{path}: cannot read column mapping: {' '.join(str(exc).split())}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - yaml/json syntax errors of several classes
        raise CalodistillError(f"{path}: column mapping is not valid YAML/JSON: {' '.join(str(exc).split())[:160]}") from None
    if not isinstance(data, dict):
        raise CalodistillError(f"{path}: column mapping: expected a mapping of keys (incident_energy, voxels, ...)")
    return data


def _coerce(items: dict[str, Any], origin: str) -> dict[str, Any]:
    """Values from a file or ``key=value`` text → the field types (one-line errors naming the key)."""
    out = dict(items)
    if "empty_value" in out and isinstance(out["empty_value"], str):
        try:
            out["empty_value"] = float(out["empty_value"])
        except ValueError:
            raise CalodistillError(f"{origin}: empty_value: expected a number, got {out['empty_value']!r}") from None
    if "particle_codes" in out:
        codes = out["particle_codes"]
        if codes is None:
            out["particle_codes"] = ""
        elif isinstance(codes, dict):
            pairs = []
            for k, v in codes.items():
                try:
                    code = int(k)
                except (TypeError, ValueError):
                    raise CalodistillError(f"{origin}: particle_codes: code {k!r} is not an integer") from None
                if not isinstance(v, str) or not v:
                    raise CalodistillError(f"{origin}: particle_codes: code {k} needs a particle name, got {v!r}")
                pairs.append((code, v))
            out["particle_codes"] = tuple(sorted(pairs))
        elif isinstance(codes, str):
            out["particle_codes"] = codes.strip().lower() if codes.strip().lower() == "pdg" else codes.strip()
    if "filter" in out:
        flt = out["filter"]
        if flt is None:
            out["filter"] = ()
        elif isinstance(flt, str):
            out["filter"] = tuple(c.strip() for c in re.split(r"\band\b|&&", flt) if c.strip())
        elif isinstance(flt, list) and all(isinstance(c, str) for c in flt):
            out["filter"] = tuple(flt)
        else:
            raise CalodistillError(f"{origin}: filter: expected conditions such as 'en_in > 0', got {flt!r}")
    for key in ("incident_energy", "voxels", "particle", "event_id", "tree"):
        if key in out and out[key] is None:
            out[key] = ""
    return out
