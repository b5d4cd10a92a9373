"""ROOT files through uproot: a tree's branches read by entry range, and showers written as a TTree.

``file.root`` (the file's only tree) or ``file.root:tree``; the branches are named by a column mapping
(:class:`~.columns.ColumnSpec`: units, log10 encoding and empty-cell sentinel, particle codes, entry
filter). A voxel branch is fixed-size (``double[1728]``), multi-dimensional (``double[12][12][12][1]``)
or variable-size with the geometry's cell count in every entry. Like every :class:`~.source.Source`,
a :class:`RootSource` holds no open file: each Dask task of an ingest opens the file and reads its own
entry range, so files and entry ranges are read in parallel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalodistillError
from .columns import ColumnSpec
from .geometry import Geometry
from .mapped import check_voxel_layout, decode_entries, entry_range, select_entries
from .showers import Showers
from .source import Source, one_line

__all__ = ["ROOT_EXTENSIONS", "RootSource", "open_root", "split_root_path", "write_root"]

ROOT_EXTENSIONS = (".root",)
_ROOT_SIGNATURE = b"root"
#: The geometry record (JSON, a TObjString) :func:`write_root` stores beside the tree.
GEOMETRY_KEY = "calodistill_geometry"


def _stored_geometry(path: str, f: Any) -> Geometry:
    import json

    try:
        record = json.loads(str(f[GEOMETRY_KEY]))
    except Exception as exc:  # noqa: BLE001 - not a string, not JSON
        raise CalodistillError(f"{path}: {GEOMETRY_KEY!r} is not a geometry record: {one_line(exc)}") from None
    return Geometry.from_dict(record, path)


def split_root_path(text: str) -> tuple[str, str]:
    """``"file.root:tree"`` → ``("file.root", "tree")``; ``"file.root"`` → ``("file.root", "")``."""
    head, sep, tail = text.rpartition(":")
    if sep and tail and head.lower().endswith(ROOT_EXTENSIONS):
        return head, tail
    return text, ""


def _uproot() -> Any:
    try:
        import uproot
    except ImportError:  # pragma: no cover - a dependency
        raise CalodistillError("ROOT input needs uproot: pip install uproot awkward") from None
    return uproot


class _RootFile:
    """``with _RootFile(path) as f``: uproot file; unreadable files → one-line CalodistillError."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fh: Any = None

    def __enter__(self) -> Any:
        uproot = _uproot()
        try:
            self.fh = uproot.open(self.path)
        except Exception as exc:  # noqa: BLE001 - uproot raises many kinds for corrupt files
            raise CalodistillError(f"{self.path}: not a readable ROOT file (truncated or corrupt): {one_line(exc)}") from None
        return self.fh

    def __exit__(self, *exc: object) -> None:
        self.fh.close()


def _tree(path: str, f: Any, name: str) -> tuple[str, Any]:
    """The tree ``name`` of an open file (the only tree when ``name`` is empty): its name and the tree."""
    classes = {k.rsplit(";", 1)[0]: v for k, v in f.classnames().items()}
    trees = [k for k, v in classes.items() if v in ("TTree", "ROOT::RNTuple", "TNtuple", "TNtupleD")]
    if not name:
        if len(trees) != 1:
            found = ", ".join(trees) if trees else "none"
            raise CalodistillError(f"{path}: {len(trees)} trees ({found}); name one as {path}:TREE or with 'tree:' in the mapping")
        name = trees[0]
    if name not in trees:
        raise CalodistillError(f"{path}: no tree {name!r}; trees: {', '.join(trees) or 'none'}")
    try:
        return name, f[name]
    except Exception as exc:  # noqa: BLE001
        raise CalodistillError(f"{path}: cannot read tree {name!r}: {one_line(exc)}") from None


def _read_branch(path: str, tree: Any, name: str, start: int, stop: int, jagged: bool = False) -> np.ndarray:
    """Entries ``start:stop`` of one branch as a numpy array ``(n, ...)``."""
    try:
        if not jagged:
            return np.asarray(tree[name].array(entry_start=start, entry_stop=stop, library="np"))
        import awkward as ak

        arr = tree[name].array(entry_start=start, entry_stop=stop, library="ak")
        counts = np.asarray(ak.num(arr, axis=1))
        if counts.size and (counts != counts[0]).any():
            bad = int(np.argmax(counts != counts[0]))
            raise CalodistillError(f"{path}: branch {name!r}: entry {start + bad} has {counts[bad]} values, "
                                   f"entry {start} has {counts[0]} (a voxel branch needs the same count in every entry)")
        flat = np.asarray(ak.to_numpy(ak.flatten(arr, axis=None)))
        return flat.reshape(len(counts), -1)
    except CalodistillError:
        raise
    except Exception as exc:  # noqa: BLE001 - uproot/awkward raise many kinds for bad baskets
        raise CalodistillError(f"{path}: cannot read branch {name!r} entries {start}..{stop - 1}: {one_line(exc)}") from None


@dataclass
class RootSource(Source):
    """A tree of a ROOT file read through a column mapping (picklable; no open file).

    Args:
        tree: the tree's name in the file.
        columns: the column mapping.
        voxel_names: the voxel branches, in voxel order.
        jagged: names of the voxel branches of variable size.
        selected: entries the filter keeps (None: all).
    """

    tree: str = ""
    columns: ColumnSpec = field(default_factory=ColumnSpec)
    voxel_names: list[str] = field(default_factory=list)
    jagged: tuple[str, ...] = ()
    selected: np.ndarray | None = None

    def describe(self) -> dict[str, Any]:
        """The file description plus the tree's name."""
        return {**super().describe(), "tree": self.tree}

    def _read(self, start: int, stop: int) -> Showers:
        cols = self.columns
        lo, hi, rows = entry_range(self.selected, start, stop)
        with _RootFile(self.path) as f:
            _, tree = _tree(self.path, f, self.tree)
            keys = set(tree.keys())
            names = [cols.incident_energy, *self.voxel_names] + [c for c in (cols.particle, cols.event_id) if c in keys]
            raw = {}
            for name in names:
                arr = _read_branch(self.path, tree, name, lo, hi, name in self.jagged)
                raw[name] = arr if rows is None else arr[rows]
        return decode_entries(self, cols, raw, self.voxel_names, start)


def open_root(path: str, geometry: Geometry | None, cols: ColumnSpec) -> RootSource:
    """Open ``path`` (``file.root`` or ``file.root:tree``): resolve the branches, check them, apply the filter."""
    file, tree_name = split_root_path(path)
    tree_name = tree_name or cols.tree
    if cols.is_default:  # the layout write_root writes: particles as PDG codes
        cols = replace(cols, particle_codes="pdg")
    with open(file, "rb") as fh:
        if fh.read(4) != _ROOT_SIGNATURE:
            raise CalodistillError(f"{file}: not a ROOT file (bad signature; truncated or corrupt)")
    with _RootFile(file) as f:
        tree_name, tree = _tree(file, f, tree_name)
        if geometry is None and GEOMETRY_KEY in {k.rsplit(";", 1)[0] for k in f.keys()}:
            geometry = _stored_geometry(file, f)
        where = f"{file}:{tree_name}"
        names = [str(k) for k in tree.keys()]
        n = int(tree.num_entries)
        if cols.incident_energy not in names:
            raise CalodistillError(f"{where}: missing branch {cols.incident_energy!r} (incident energy); "
                                   f"branches: {', '.join(names)}; name yours in a column mapping (--columns FILE)")
        _, voxel_names = cols.voxel_columns(names, where)
        for c in cols.filter_columns:
            if c not in names:
                raise CalodistillError(f"{where}: filter branch {c!r} is missing; branches: {', '.join(names)}")
        if n == 0:
            raise CalodistillError(f"{where}: empty tree (no entries)")
        shapes, jagged = [], []
        for name in [cols.incident_energy, *voxel_names]:
            first = _read_branch(file, tree, name, 0, 1)
            if first.dtype == object:  # variable size: the first entry tells the count
                jagged.append(name)
                first = _read_branch(file, tree, name, 0, 1, jagged=True)
            if name == cols.incident_energy:
                if first.ndim != 1:
                    raise CalodistillError(f"{where}: branch {name!r} holds {list(first.shape[1:])} values per entry, "
                                           "expected one incident energy")
                if first.dtype.kind not in "fiu":
                    raise CalodistillError(f"{where}: branch {name!r} is not numeric ({first.dtype})")
                continue
            if first.dtype.kind not in "fiub":
                raise CalodistillError(f"{where}: voxel branch {name!r} is not numeric ({first.dtype})")
            shapes.append(tuple(first.shape[1:]))
        geo = check_voxel_layout(where, voxel_names, shapes, geometry)
        selected = select_entries(where, cols, {c: _read_branch(file, tree, c, 0, n) for c in cols.filter_columns})
        chunk = 1
        if selected is None and hasattr(tree, "common_entry_offsets"):
            try:
                offsets = np.asarray(tree.common_entry_offsets())
                chunk = max(1, int(np.median(np.diff(offsets)))) if len(offsets) > 1 else 1
            except Exception:  # noqa: BLE001 - alignment is only a preference
                chunk = 1
    n_rows = n if selected is None else len(selected)
    return RootSource(file, geo, n_rows, "root", chunk_rows=chunk, tree=tree_name, columns=cols,
                      voxel_names=voxel_names, jagged=tuple(jagged), selected=selected)


def write_root(showers: Showers, path: Path, tree: str = "showers") -> None:
    """A TTree ``tree`` (``event_id`` int64, ``incident_energy`` MeV, ``particle`` PDG code, ``voxels``
    float[D] MeV in the geometry's voxel order) and the geometry record beside it (not atomic).

    The default column mapping reads it back (particle codes as PDG numbers).
    """
    import json

    from .columns import PDG_PARTICLES

    uproot = _uproot()
    codes = {name: code for code, name in PDG_PARTICLES.items()}
    unknown = sorted({str(p) for p in showers.particle} - set(codes))
    if unknown:
        raise CalodistillError(f"{path}: particle {unknown[0]!r} has no PDG code (known: {', '.join(codes)})")
    pdg = np.asarray([codes[str(p)] for p in showers.particle], dtype=np.int32)
    d = showers.geometry.n_voxels
    with uproot.recreate(os.fspath(path)) as f:
        f[GEOMETRY_KEY] = json.dumps(showers.geometry.to_dict())
        t = f.mktree(tree, {"event_id": np.int64, "incident_energy": np.float64, "particle": np.int32,
                            "voxels": (np.float32, (d,))}, title=f"calodistill showers on {showers.geometry.name}")
        if len(showers):
            t.extend({"event_id": showers.event_id, "incident_energy": showers.incident_energy, "particle": pdg,
                      "voxels": showers.voxels.astype(np.float32)})
