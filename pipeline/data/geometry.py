"""Calorimeter readout geometries: which cells a shower is recorded in, and in which order.

A :class:`Geometry` is an ordered list of :class:`Layer` objects. A flat voxel vector of a shower is the
concatenation of its layers, each flattened in C order of ``Layer.shape``:

- CaloGAN (hep-lbdl/CaloGAN, arXiv 1705.02355): three Cartesian layers of 3×96, 12×12 and 12×6 cells
  (504 voxels); shape is ``(rows, columns)`` as in the CaloGAN HDF5 files (``layer_0`` is ``(N, 3, 96)``).
- CaloChallenge 2022: polar layers read from the binning XML files; shape is ``(n_alpha, n_r)``, i.e. the
  voxel order is (layer, angular bin, radial bin), exactly as in the challenge's HDF5 files. Layers whose
  XML entry has no radial bin (``r_edges="0"``) hold no voxels and are left out.
- Your own detector: a geometry YAML file (:mod:`.geometry_file`) or a binning XML path, wherever a
  geometry name is accepted (:func:`get_geometry`). Its :class:`Medium` carries what synth needs.

References:
    M. Paganini, L. de Oliveira, B. Nachman, "CaloGAN", arXiv:1705.02355.
    Fast Calorimeter Simulation Challenge 2022, binning_dataset_*.xml (CaloChallenge/homepage).
"""

from __future__ import annotations

import functools
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalodistillError

__all__ = [
    "Layer",
    "Geometry",
    "Medium",
    "GEOMETRY_NAMES",
    "GEOMETRY_FILE_SUFFIXES",
    "get_geometry",
    "infer_geometry",
    "geometry_from_xml",
]


@dataclass(frozen=True)
class Layer:
    """One readout layer.

    Args:
        index: layer id (CaloGAN 0..2; the CaloChallenge XML ``id``, e.g. 12 for the first tile layer).
        kind: ``"cartesian"`` (edges in mm along y/x) or ``"polar"`` (radial edges in mm, angular edges in rad).
        edges0: cartesian: row edges (mm, along y); polar: angular edges (rad, from -π to π).
        edges1: cartesian: column edges (mm, along x); polar: radial edges (mm).
    """

    index: int
    kind: str
    edges0: tuple[float, ...]
    edges1: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) for Cartesian layers, (n_alpha, n_r) for polar ones."""
        return (len(self.edges0) - 1, len(self.edges1) - 1)

    @property
    def n_voxels(self) -> int:
        return self.shape[0] * self.shape[1]

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Bin centres along the two axes (mm or rad), each a 1-d array."""
        e0, e1 = np.asarray(self.edges0), np.asarray(self.edges1)
        return 0.5 * (e0[1:] + e0[:-1]), 0.5 * (e1[1:] + e1[:-1])

    def cell_xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Area-weighted centroid (x, y) in mm of every cell, flattened in voxel order.

        For polar cells the centroid of the annular sector is used, so a full ring (one angular bin)
        sits at the origin, as its energy-weighted centre should.
        """
        if self.kind == "cartesian":
            yc, xc = self.centres()
            yy, xx = np.meshgrid(yc, xc, indexing="ij")
            return xx.ravel(), yy.ravel()
        a = np.asarray(self.edges0)
        r = np.asarray(self.edges1)
        r0, r1 = r[:-1], r[1:]
        rbar = (2.0 / 3.0) * (r1**3 - r0**3) / (r1**2 - r0**2)
        half = 0.5 * (a[1:] - a[:-1])
        amid = 0.5 * (a[1:] + a[:-1])
        shrink = np.sinc(half / np.pi)  # sin(half)/half
        rr = rbar[None, :] * shrink[:, None]
        x = rr * np.cos(amid)[:, None]
        y = rr * np.sin(amid)[:, None]
        return x.ravel(), y.ravel()

    def cell_area(self) -> np.ndarray:
        """Area of every cell in mm² (flattened in voxel order)."""
        e0, e1 = np.asarray(self.edges0), np.asarray(self.edges1)
        if self.kind == "cartesian":
            return np.outer(np.diff(e0), np.diff(e1)).ravel()
        return np.outer(np.diff(e0), 0.5 * np.diff(e1**2)).ravel()


@dataclass(frozen=True)
class Medium:
    """The effective medium of a declared detector: what the GFLASH generator (synth) needs.

    Args:
        x0_mm: radiation length, mm.
        moliere_mm: Molière radius, mm.
        critical_energy_mev: critical energy E_c, MeV.
        segments_mm: per layer (voxel order), the readout depth interval ``(start, end)`` in mm from the
            front face; gaps between segments are dead material.
        sampling_fraction: visible fraction of the deposited energy (1: homogeneous, every deposit read).
        z: effective atomic number (GFLASH's Z).
        sampling_term: ``c_S`` of ``σ/E = c_S/√(E/GeV)`` (sampling calorimeters; 0 for homogeneous ones).
    """

    x0_mm: float
    moliere_mm: float
    critical_energy_mev: float
    segments_mm: tuple[tuple[float, float], ...]
    sampling_fraction: float = 1.0
    z: float = 0.0
    sampling_term: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (the inverse of :meth:`from_dict`)."""
        return {"x0_mm": self.x0_mm, "moliere_mm": self.moliere_mm, "critical_energy_mev": self.critical_energy_mev,
                "segments_mm": [list(s) for s in self.segments_mm], "sampling_fraction": self.sampling_fraction,
                "z": self.z, "sampling_term": self.sampling_term}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Medium:
        """From :meth:`to_dict`'s form."""
        return cls(float(data["x0_mm"]), float(data["moliere_mm"]), float(data["critical_energy_mev"]),
                   tuple((float(a), float(b)) for a, b in data["segments_mm"]),
                   float(data.get("sampling_fraction", 1.0)), float(data.get("z", 0.0)),
                   float(data.get("sampling_term", 0.0)))


@dataclass(frozen=True)
class Geometry:
    """An ordered set of readout layers and the flat voxel layout built from them.

    Args:
        name: registry name (``calogan``, ``calochallenge-1-photons``, ...) or the name a geometry file gives.
        layers: the non-empty layers in voxel order.
        particle: the particle the geometry was defined for (CaloChallenge XML ``name``), if any.
        medium: the detector's effective medium and layer depths (geometry files with a ``material``).
        origin: the file the geometry was read from ("" for the presets); not part of its identity.
    """

    name: str
    layers: tuple[Layer, ...]
    particle: str = ""
    medium: Medium | None = None
    origin: str = field(default="", compare=False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_sizes(self) -> list[int]:
        """Number of voxels of each layer, in voxel order."""
        return [layer.n_voxels for layer in self.layers]

    @property
    def n_voxels(self) -> int:
        return sum(self.layer_sizes)

    @property
    def layer_slices(self) -> list[slice]:
        """Slices of the flat voxel vector belonging to each layer."""
        bounds = np.concatenate([[0], np.cumsum(self.layer_sizes)])
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def split_layers(self, voxels: np.ndarray) -> list[np.ndarray]:
        """Reshape flat voxels ``(..., n_voxels)`` into a list of per-layer arrays ``(..., *layer.shape)``."""
        voxels = np.asarray(voxels)
        if voxels.shape[-1] != self.n_voxels:
            raise CalodistillError(
                f"geometry {self.name}: expected {self.n_voxels} voxels per shower, got {voxels.shape[-1]}"
            )
        lead = voxels.shape[:-1]
        return [voxels[..., s].reshape(*lead, *layer.shape) for s, layer in zip(self.layer_slices, self.layers)]

    def join_layers(self, layers: list[np.ndarray]) -> np.ndarray:
        """Inverse of :meth:`split_layers`: per-layer arrays back to flat voxels ``(..., n_voxels)``."""
        if len(layers) != self.n_layers:
            raise CalodistillError(f"geometry {self.name}: expected {self.n_layers} layers, got {len(layers)}")
        flat = []
        for arr, layer in zip(layers, self.layers):
            arr = np.asarray(arr)
            if arr.shape[-2:] != layer.shape:
                raise CalodistillError(
                    f"geometry {self.name}: layer {layer.index} has shape {arr.shape[-2:]}, expected {layer.shape}"
                )
            flat.append(arr.reshape(*arr.shape[:-2], layer.n_voxels))
        return np.concatenate(flat, axis=-1)

    def layer_energies(self, voxels: np.ndarray) -> np.ndarray:
        """Energy summed per layer: ``(..., n_voxels)`` → ``(..., n_layers)``."""
        voxels = np.asarray(voxels)
        if voxels.shape[-1] != self.n_voxels:
            raise CalodistillError(
                f"geometry {self.name}: expected {self.n_voxels} voxels per shower, got {voxels.shape[-1]}"
            )
        return np.stack([voxels[..., s].sum(axis=-1) for s in self.layer_slices], axis=-1)

    def to_dict(self) -> dict:
        """JSON-serialisable description (stored in dataset metadata, model directories and files)."""
        out = {
            "name": self.name,
            "particle": self.particle,
            "n_voxels": self.n_voxels,
            "layers": [
                {"index": l.index, "kind": l.kind, "shape": list(l.shape), "edges0": list(l.edges0), "edges1": list(l.edges1)}
                for l in self.layers
            ],
        }
        if self.medium is not None:
            out["medium"] = self.medium.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "geometry") -> Geometry:
        """The geometry :meth:`to_dict` describes; a preset's name with its voxel count gives the preset.

        Raises:
            CalodistillError: ``"<source>: geometry record: <problem>"`` for a malformed description.
        """
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise CalodistillError(f"{source}: geometry record: expected an object with a name")
        name = data["name"]
        if name in GEOMETRY_NAMES:
            preset = get_geometry(name)
            if int(data.get("n_voxels", preset.n_voxels)) != preset.n_voxels:
                raise CalodistillError(f"{source}: metadata says {data['n_voxels']} voxels, geometry {name} has {preset.n_voxels}")
            return preset
        try:
            layers = tuple(
                Layer(int(l["index"]), str(l["kind"]), tuple(float(v) for v in l["edges0"]),
                      tuple(float(v) for v in l["edges1"]))
                for l in data["layers"]
            )
            medium = Medium.from_dict(data["medium"]) if data.get("medium") is not None else None
        except (KeyError, TypeError, ValueError) as exc:
            raise CalodistillError(f"{source}: geometry record {name!r}: malformed ({type(exc).__name__}: {exc})") from None
        for l in layers:
            if l.kind not in ("cartesian", "polar") or l.shape[0] < 1 or l.shape[1] < 1:
                raise CalodistillError(f"{source}: geometry record {name!r}: bad layer {l.index} ({l.kind}, {l.shape})")
        geo = cls(name, layers, str(data.get("particle") or ""), medium)
        if "n_voxels" in data and int(data["n_voxels"]) != geo.n_voxels:
            raise CalodistillError(f"{source}: geometry record {name!r} says {data['n_voxels']} voxels, its layers hold {geo.n_voxels}")
        return geo

    def same_cells(self, other: Geometry) -> bool:
        """Whether ``other`` has the same layers and cells (kinds, shapes and edges; names may differ)."""
        if len(self.layers) != len(other.layers):
            return False
        for a, b in zip(self.layers, other.layers):
            if a.kind != b.kind or a.shape != b.shape:
                return False
            if not (np.allclose(a.edges0, b.edges0, rtol=1e-9, atol=1e-9)
                    and np.allclose(a.edges1, b.edges1, rtol=1e-9, atol=1e-9)):
                return False
        return True

    def describe(self) -> str:
        """One line: name, layer kinds and shapes, voxel count (for error messages)."""
        shapes = [f"{l.shape[0]}x{l.shape[1]}" for l in self.layers]
        kinds = "/".join(sorted({l.kind for l in self.layers}))
        if len(set(shapes)) == 1:
            return f"{self.name} ({self.n_layers} {kinds} layers of {shapes[0]}, {self.n_voxels} voxels)"
        shown = ", ".join(shapes) if len(shapes) <= 6 else f"{', '.join(shapes[:5])}, ..."
        return f"{self.name} ({kinds} layers {shown}, {self.n_voxels} voxels)"


def _calogan() -> Geometry:
    # CaloGAN: 480 mm × 480 mm across; cells 160×5 (layer 0: 3 rows × 96 columns), 40×40, 40×80 mm.
    # In the CaloGAN files layer_2 is (12, 6): 12 rows of 40 mm, 6 columns of 80 mm.
    def edges(n: int) -> tuple[float, ...]:
        return tuple(float(v) for v in np.linspace(-240.0, 240.0, n + 1))

    layers = (
        Layer(0, "cartesian", edges(3), edges(96)),
        Layer(1, "cartesian", edges(12), edges(12)),
        Layer(2, "cartesian", edges(12), edges(6)),
    )
    return Geometry("calogan", layers, particle="e+")


def geometry_from_xml(path_or_text: str, name: str) -> Geometry:
    """Parse a CaloChallenge binning XML file (a path, or the XML text itself) into a :class:`Geometry`."""
    try:
        if path_or_text.lstrip().startswith("<"):
            root = ET.fromstring(path_or_text)
        else:
            root = ET.parse(path_or_text).getroot()
    except (ET.ParseError, OSError) as exc:
        raise CalodistillError(f"{name}: cannot read binning XML: {exc}") from exc
    bins = root.findall("Bin")
    if len(bins) != 1:
        raise CalodistillError(f"{name}: binning XML must hold exactly one <Bin>, found {len(bins)}")
    layers = []
    for elem in bins[0].findall("Layer"):
        r_edges = tuple(float(v) for v in elem.attrib["r_edges"].split(","))
        n_alpha = int(elem.attrib["n_bin_alpha"])
        if len(r_edges) < 2:
            continue
        a_edges = tuple(float(v) for v in np.linspace(-np.pi, np.pi, n_alpha + 1))
        layers.append(Layer(int(elem.attrib["id"]), "polar", a_edges, r_edges))
    return Geometry(name, tuple(layers), particle=bins[0].attrib.get("name", ""))


_XML_FILES = {
    "calochallenge-1-photons": "binning_dataset_1_photons.xml",
    "calochallenge-1-pions": "binning_dataset_1_pions.xml",
    "calochallenge-2": "binning_dataset_2.xml",
    "calochallenge-3": "binning_dataset_3.xml",
}

GEOMETRY_NAMES: tuple[str, ...] = ("calogan", *_XML_FILES)
#: Extensions of geometry files: a geometry YAML (or JSON) spec, or a CaloChallenge binning XML.
GEOMETRY_FILE_SUFFIXES: tuple[str, ...] = (".yaml", ".yml", ".json", ".xml")


@functools.lru_cache(maxsize=None)
def _preset(name: str) -> Geometry:
    if name == "calogan":
        return _calogan()
    text = resources.files("calodistill.pipeline.data").joinpath("binning", _XML_FILES[name]).read_text()
    return geometry_from_xml(text, name)


def is_geometry_path(text: str) -> bool:
    """Whether ``text`` names a geometry file rather than a preset (a known suffix or a path separator)."""
    return text not in GEOMETRY_NAMES and (Path(text).suffix.lower() in GEOMETRY_FILE_SUFFIXES or os.sep in text)


def get_geometry(name: str | os.PathLike[str] | Geometry) -> Geometry:
    """The geometry ``name`` stands for: a preset (:data:`GEOMETRY_NAMES`), a geometry file, or a Geometry.

    A geometry file is a YAML spec (:mod:`.geometry_file`) or a CaloChallenge binning XML; a file is read
    again when it changes.

    Raises:
        CalodistillError: an unknown name, or a file that is missing or malformed (one line naming the
            file, the field and the problem).
    """
    if isinstance(name, Geometry):
        return name
    text = os.fspath(name)
    if text in GEOMETRY_NAMES:
        return _preset(text)
    if is_geometry_path(text):
        from .geometry_file import load_geometry_file

        return load_geometry_file(text)
    raise CalodistillError(
        f"unknown geometry {text!r}; known: {', '.join(GEOMETRY_NAMES)}, or the path of a geometry .yaml or binning .xml file"
    )


def infer_geometry(n_voxels: int, source: str = "input") -> Geometry:
    """The registered geometry with ``n_voxels`` voxels per shower; a clear error if none or several fit."""
    matches = [g for g in GEOMETRY_NAMES if get_geometry(g).n_voxels == n_voxels]
    if not matches:
        known = ", ".join(f"{g} ({get_geometry(g).n_voxels})" for g in GEOMETRY_NAMES)
        raise CalodistillError(f"{source}: {n_voxels} voxels per shower fits no known geometry ({known})")
    if len(matches) > 1:
        raise CalodistillError(f"{source}: {n_voxels} voxels fits several geometries ({matches}); pass --geometry")
    return get_geometry(matches[0])
