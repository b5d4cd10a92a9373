"""Geometry files: your own calorimeter, declared in a small YAML file (or a CaloChallenge binning XML).

A YAML geometry lists the readout layers front to back, each a Cartesian grid or a polar (r, α) binning,
and optionally the detector's material, which synth (GFLASH) needs::

    name: my-calo                  # default: the file's stem
    particle: e-                   # optional default particle label
    layers:                        # front to back; `repeat: N` stands for N identical layers
      - {nx: 12, ny: 12, cell_mm: 20, thickness_mm: 50, repeat: 12}     # Cartesian (cell_mm: d or [dx, dy])
      - {r_edges: [0, 5, 10, 20, 40], n_alpha: 16, thickness_mm: 30}     # polar
    material:                      # optional: the effective medium (synth)
      x0_mm: 25.9
      moliere_mm: 41.3
      critical_energy_mev: 13.4
      sampling_fraction: 1.0       # 1: homogeneous; below 1: sampling calorimeter (visible energy)

Cell order (the flat voxel vector): layer by layer; a Cartesian layer is ``ny`` rows (along y) of ``nx``
columns (along x), row-major, the grid centred on the beam axis; a polar layer is ``n_alpha`` angular bins
of ``len(r_edges) - 1`` radial bins. Every problem is one line ``"<file>: <field>: <problem>"``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalodistillError
from .geometry import GEOMETRY_NAMES, Geometry, Layer, Medium, geometry_from_xml

__all__ = ["load_geometry_file", "geometry_from_spec"]

_TOP_KEYS = ("name", "particle", "layers", "material")
_LAYER_KEYS = ("nx", "ny", "cell_mm", "cell_x_mm", "cell_y_mm", "r_edges", "n_alpha", "index", "thickness_mm",
               "gap_mm", "repeat")
_MATERIAL_KEYS = ("x0_mm", "moliere_mm", "critical_energy_mev", "sampling_fraction", "z", "sampling_term", "front_mm")


def load_geometry_file(path: str | os.PathLike[str]) -> Geometry:
    """Read a geometry file: ``.yaml``/``.yml``/``.json`` (the spec above) or a binning ``.xml``.

    Raises:
        CalodistillError: a missing, unreadable or malformed file (one line: file, field, problem).
    """
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError:
        raise CalodistillError(f"{path}: no such geometry file") from None
    if not p.is_file():
        raise CalodistillError(f"{path}: not a file (expected a geometry .yaml or binning .xml)")
    return _load_cached(str(p.resolve()), st.st_mtime_ns, st.st_size, str(path))


@functools.lru_cache(maxsize=64)
def _load_cached(resolved: str, mtime_ns: int, size: int, label: str) -> Geometry:
    p = Path(resolved)
    suffix = p.suffix.lower()
    if suffix == ".xml":
        return _load_xml(p, label)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CalodistillError(f"{label}: cannot read geometry file: {' '.join(str(exc).split())}") from None
    try:
        if suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - yaml/json syntax errors of several classes
        first = " ".join(str(exc).split())[:160]
        raise CalodistillError(f"{label}: not valid {'JSON' if suffix == '.json' else 'YAML'}: {first}") from None
    geo = geometry_from_spec(data, label, default_name=p.stem)
    return Geometry(geo.name, geo.layers, geo.particle, geo.medium, origin=resolved)


def _load_xml(p: Path, label: str) -> Geometry:
    try:
        geo = geometry_from_xml(str(p), p.stem)
    except CalodistillError as exc:
        raise CalodistillError(f"{label}: {str(exc).removeprefix(p.stem + ': ')}") from None
    except (KeyError, ValueError) as exc:
        raise CalodistillError(f"{label}: binning XML: a <Layer> lacks or mangles attribute {exc}") from None
    if not geo.layers:
        raise CalodistillError(f"{label}: binning XML: no layer with radial bins")
    return Geometry(geo.name, geo.layers, geo.particle, None, origin=str(p))


# ------------------------------------------------------------------------------------------- checks
def _number(label: str, where: str, value: Any, *, positive: bool = False, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CalodistillError(f"{label}: {where}: expected a number, got {value!r}")
    if positive and value <= 0:
        raise CalodistillError(f"{label}: {where}: must be positive, got {value!r}")
    if minimum is not None and value < minimum:
        raise CalodistillError(f"{label}: {where}: must be >= {minimum}, got {value!r}")
    return float(value)


def _count(label: str, where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CalodistillError(f"{label}: {where}: expected a positive integer, got {value!r}")
    return int(value)


def _unknown(label: str, where: str, data: dict[str, Any], known: tuple[str, ...]) -> None:
    extra = [str(k) for k in data if k not in known]
    if extra:
        raise CalodistillError(f"{label}: {where}{extra[0]}: unknown key (known: {', '.join(known)})")


def _layer(label: str, where: str, entry: Any, index: int) -> tuple[Layer, float | None, float]:
    """One layer entry → (layer, thickness in mm or None, gap in front of it in mm)."""
    if not isinstance(entry, dict):
        raise CalodistillError(f"{label}: {where}: expected a mapping (nx/ny/cell_mm or r_edges/n_alpha), got {entry!r}")
    _unknown(label, f"{where}.", entry, _LAYER_KEYS)
    cartesian = any(k in entry for k in ("nx", "ny", "cell_mm", "cell_x_mm", "cell_y_mm"))
    polar = any(k in entry for k in ("r_edges", "n_alpha"))
    if cartesian == polar:
        raise CalodistillError(f"{label}: {where}: give either nx, ny and cell_mm (Cartesian) or r_edges and n_alpha (polar)")
    idx = entry.get("index", index)
    if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
        raise CalodistillError(f"{label}: {where}.index: expected a non-negative integer, got {idx!r}")
    if cartesian:
        for key in ("nx", "ny"):
            if key not in entry:
                raise CalodistillError(f"{label}: {where}.{key}: missing (number of cells along {key[1]})")
        nx, ny = _count(label, f"{where}.nx", entry["nx"]), _count(label, f"{where}.ny", entry["ny"])
        if "cell_mm" in entry:
            if "cell_x_mm" in entry or "cell_y_mm" in entry:
                raise CalodistillError(f"{label}: {where}.cell_mm: give cell_mm or cell_x_mm/cell_y_mm, not both")
            cell = entry["cell_mm"]
            if isinstance(cell, list):
                if len(cell) != 2:
                    raise CalodistillError(f"{label}: {where}.cell_mm: expected one size or [dx, dy], got {cell!r}")
                dx = _number(label, f"{where}.cell_mm[0]", cell[0], positive=True)
                dy = _number(label, f"{where}.cell_mm[1]", cell[1], positive=True)
            else:
                dx = dy = _number(label, f"{where}.cell_mm", cell, positive=True)
        else:
            if "cell_x_mm" not in entry or "cell_y_mm" not in entry:
                raise CalodistillError(f"{label}: {where}.cell_mm: missing (cell size in mm, or cell_x_mm and cell_y_mm)")
            dx = _number(label, f"{where}.cell_x_mm", entry["cell_x_mm"], positive=True)
            dy = _number(label, f"{where}.cell_y_mm", entry["cell_y_mm"], positive=True)
        ys = tuple(float(v) for v in (np.arange(ny + 1) - ny / 2.0) * dy)
        xs = tuple(float(v) for v in (np.arange(nx + 1) - nx / 2.0) * dx)
        layer = Layer(idx, "cartesian", ys, xs)
    else:
        for key in ("r_edges", "n_alpha"):
            if key not in entry:
                raise CalodistillError(f"{label}: {where}.{key}: missing (polar layer)")
        n_alpha = _count(label, f"{where}.n_alpha", entry["n_alpha"])
        r = entry["r_edges"]
        if not isinstance(r, list) or len(r) < 2:
            raise CalodistillError(f"{label}: {where}.r_edges: expected a list of at least 2 radii in mm, got {r!r}")
        radii = [_number(label, f"{where}.r_edges[{i}]", v, minimum=0.0) for i, v in enumerate(r)]
        if any(b <= a for a, b in zip(radii[:-1], radii[1:])):
            raise CalodistillError(f"{label}: {where}.r_edges: must increase strictly, got {r!r}")
        alphas = tuple(float(v) for v in np.linspace(-np.pi, np.pi, n_alpha + 1))
        layer = Layer(idx, "polar", alphas, tuple(radii))
    thickness = entry.get("thickness_mm")
    if thickness is not None:
        thickness = _number(label, f"{where}.thickness_mm", thickness, positive=True)
    gap = _number(label, f"{where}.gap_mm", entry.get("gap_mm", 0.0), minimum=0.0)
    return layer, thickness, gap


def geometry_from_spec(data: Any, label: str = "geometry", default_name: str = "custom") -> Geometry:
    """A :class:`Geometry` from a parsed geometry spec (the module docstring); ``label`` names it in errors."""
    if not isinstance(data, dict):
        raise CalodistillError(f"{label}: expected a mapping with 'layers' at the top, got {type(data).__name__}")
    _unknown(label, "", data, _TOP_KEYS)
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\?&#"):
        raise CalodistillError(f"{label}: name: expected a short name without / \\ ? & #, got {name!r}")
    if name.strip() in GEOMETRY_NAMES:
        raise CalodistillError(f"{label}: name: {name!r} is a preset's name; give your detector its own")
    particle = data.get("particle", "")
    if not isinstance(particle, str):
        raise CalodistillError(f"{label}: particle: expected a name such as e- or gamma, got {particle!r}")
    entries = data.get("layers")
    if not isinstance(entries, list) or not entries:
        raise CalodistillError(f"{label}: layers: missing or empty (a list of layers, front to back)")
    layers: list[Layer] = []
    depths: list[tuple[float | None, float]] = []
    for i, entry in enumerate(entries):
        where = f"layers[{i}]"
        repeat = _count(label, f"{where}.repeat", entry.get("repeat", 1)) if isinstance(entry, dict) else 1
        if repeat > 1 and isinstance(entry, dict) and "index" in entry:
            raise CalodistillError(f"{label}: {where}.index: cannot be given together with repeat")
        for _ in range(repeat):
            layer, thickness, gap = _layer(label, where, entry, len(layers))
            layers.append(layer)
            depths.append((thickness, gap))
    seen: set[int] = set()
    for layer in layers:
        if layer.index in seen:
            raise CalodistillError(f"{label}: layers: index {layer.index} used twice")
        seen.add(layer.index)
    medium = None
    material = data.get("material")
    if material is not None:
        medium = _medium(label, material, depths)
    return Geometry(name.strip(), tuple(layers), particle, medium)


def _medium(label: str, material: Any, depths: list[tuple[float | None, float]]) -> Medium:
    if not isinstance(material, dict):
        raise CalodistillError(f"{label}: material: expected a mapping (x0_mm, moliere_mm, critical_energy_mev, ...)")
    _unknown(label, "material.", material, _MATERIAL_KEYS)
    values: dict[str, float] = {}
    for key in ("x0_mm", "moliere_mm", "critical_energy_mev"):
        if key not in material:
            raise CalodistillError(f"{label}: material.{key}: missing (synth needs it)")
        values[key] = _number(label, f"material.{key}", material[key], positive=True)
    fraction = _number(label, "material.sampling_fraction", material.get("sampling_fraction", 1.0), positive=True)
    if fraction > 1:
        raise CalodistillError(f"{label}: material.sampling_fraction: must be in (0, 1], got {fraction!r}")
    # PDG: E_c ≈ 610 MeV / (Z + 1.24) for electrons in solids, inverted when Z is not given
    z = _number(label, "material.z", material.get("z", max(1.0, 610.0 / values["critical_energy_mev"] - 1.24)),
                positive=True)
    term = _number(label, "material.sampling_term", material.get("sampling_term", 0.0 if fraction == 1 else 0.1),
                   minimum=0.0)
    depth = _number(label, "material.front_mm", material.get("front_mm", 0.0), minimum=0.0)
    segments = []
    for i, (thickness, gap) in enumerate(depths):
        if thickness is None:
            raise CalodistillError(f"{label}: layers[{i}].thickness_mm: missing (a geometry with a material needs each layer's depth)")
        depth += gap
        segments.append((depth, depth + thickness))
        depth += thickness
    return Medium(values["x0_mm"], values["moliere_mm"], values["critical_energy_mev"], tuple(segments),
                  fraction, z, term)
