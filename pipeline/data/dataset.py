"""Reading an ingested shower dataset (the Parquet layout written by :mod:`.ingest`, docs/data.md).

``open_dataset(path)`` checks that ``path`` is a calodistill dataset (its ``_calodistill.json`` and the
files it lists) and returns a :class:`ShowerDataset`. Loading goes through ``pyarrow.dataset`` with a
filter on ``split``; since every file keeps each split in its own row groups, the filter skips the other
splits' row groups from their statistics. The ``voxels`` fixed-size list becomes an ``(N, D)`` float32
array by reshaping its contiguous value buffer — no per-row Python work, whatever D is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import CalodistillError
from .tables import list_column_to_numpy
from .geometry import Geometry
from .showers import Showers

__all__ = ["ShowerDataset", "open_dataset", "dataset_hash", "SPLITS"]

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
METADATA_FILE = "_calodistill.json"
_COLUMNS = ["event_id", "incident_energy", "particle", "voxels"]
_REQUIRED_KEYS = ("geometry", "units", "sources", "counts", "files", "split_seed")


def _split_code(split: str | None, path: Path) -> int | None:
    if split is None:
        return None
    if split not in SPLITS:
        raise CalodistillError(f"{path}: unknown split {split!r}; expected one of {', '.join(SPLITS)} or None")
    return SPLITS.index(split)


def _read_metadata(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CalodistillError(f"{path}: no such dataset directory")
    if not path.is_dir():
        raise CalodistillError(f"{path}: not a directory (expected a dataset written by calodistill ingest)")
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise CalodistillError(f"{path}: not a calodistill dataset (no {METADATA_FILE}; run calodistill ingest)")
    try:
        meta = json.loads(meta_file.read_text())
    except (ValueError, OSError) as exc:
        raise CalodistillError(f"{meta_file}: unreadable dataset metadata: {' '.join(str(exc).split())}") from None
    if not isinstance(meta, dict):
        raise CalodistillError(f"{meta_file}: dataset metadata is not a JSON object")
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise CalodistillError(f"{meta_file}: dataset metadata lacks {', '.join(missing)}")
    if meta["units"] != "MeV":
        raise CalodistillError(f"{meta_file}: units {meta['units']!r}, expected 'MeV'")
    for entry in meta["files"]:
        f = path / entry["name"]
        if not f.is_file():
            raise CalodistillError(f"{path}: data file {entry['name']} listed in {METADATA_FILE} is missing")
        if f.stat().st_size != entry["bytes"]:
            raise CalodistillError(
                f"{path}: data file {entry['name']} has {f.stat().st_size} bytes, metadata says {entry['bytes']} (modified?)"
            )
    return meta


class ShowerDataset:
    """An ingested dataset: metadata, geometry and split-aware loading.

    Args:
        path: the dataset directory.

    Attributes:
        path: the dataset directory.
        metadata: the parsed ``_calodistill.json`` (geometry, units, sources with sha256, counts, split seed).
        geometry: the dataset's :class:`~.geometry.Geometry`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.metadata: dict[str, Any] = _read_metadata(self.path)
        gmeta = self.metadata["geometry"]
        # the whole geometry travels in the metadata: a preset by name, a geometry file's by its layers
        self.geometry: Geometry = Geometry.from_dict(gmeta, str(self.path / METADATA_FILE))
        if int(gmeta.get("n_voxels", self.geometry.n_voxels)) != self.geometry.n_voxels:
            raise CalodistillError(
                f"{self.path}: metadata says {gmeta['n_voxels']} voxels, geometry {self.geometry.name} has {self.geometry.n_voxels}"
            )

    def __repr__(self) -> str:
        return f"ShowerDataset({str(self.path)!r}, geometry={self.geometry.name}, n={self.count()})"

    def __len__(self) -> int:
        return self.count()

    @property
    def files(self) -> list[Path]:
        """The data files, in event order."""
        return [self.path / f["name"] for f in self.metadata["files"]]

    def count(self, split: str | None = None) -> int:
        """Number of showers in ``split`` (``None``: all), from the metadata."""
        code = _split_code(split, self.path)
        counts = self.metadata["counts"]
        return int(counts["total"] if code is None else counts[SPLITS[code]])

    def _dataset(self) -> Any:
        import pyarrow.dataset as pads

        return pads.dataset([str(f) for f in self.files], format="parquet")

    def _filter(self, split: str | None) -> Any:
        import pyarrow.dataset as pads

        code = _split_code(split, self.path)
        return None if code is None else pads.field("split") == code

    def _to_showers(self, table: Any) -> Showers:
        import pyarrow as pa

        voxels = list_column_to_numpy(table.column("voxels"), self.geometry.n_voxels, str(self.path))
        particle_col = table.column("particle")
        if pa.types.is_dictionary(particle_col.type):
            particle_col = particle_col.cast(pa.string())
        particle = np.asarray(particle_col.to_numpy(zero_copy_only=False), dtype=object)
        return Showers(
            self.geometry,
            table.column("incident_energy").to_numpy(),
            voxels,
            particle,
            table.column("event_id").to_numpy(),
        )

    def load(self, split: str | None = None, max_rows: int | None = None) -> Showers:
        """Load a split (``"train"``, ``"val"``, ``"test"``; ``None``: all) as :class:`Showers`, sorted by event id.

        Args:
            split: which split.
            max_rows: at most this many showers (the first ones in file order).
        """
        flt = self._filter(split)
        try:
            ds = self._dataset()
            if max_rows is not None:
                table = ds.head(int(max_rows), columns=_COLUMNS, filter=flt)
            else:
                table = ds.to_table(columns=_COLUMNS, filter=flt)
        except OSError as exc:
            raise CalodistillError(f"{self.path}: cannot read dataset: {' '.join(str(exc).split())}") from None
        showers = self._to_showers(table)
        ids = showers.event_id
        if len(ids) > 1 and not np.all(ids[1:] > ids[:-1]):
            showers = showers.subset(np.argsort(ids, kind="stable"))
        return showers

    def iter_batches(self, split: str | None = None, batch_size: int = 10000) -> Iterator[Showers]:
        """Stream a split as :class:`Showers` batches of exactly ``batch_size`` (the last may be shorter)."""
        if batch_size <= 0:
            raise CalodistillError(f"batch_size: must be positive, got {batch_size}")
        import pyarrow as pa

        scanner = self._dataset().scanner(columns=_COLUMNS, filter=self._filter(split), batch_size=batch_size)
        pending: list[Any] = []
        n_pending = 0
        for batch in scanner.to_batches():
            if batch.num_rows == 0:
                continue
            pending.append(batch)
            n_pending += batch.num_rows
            while n_pending >= batch_size:
                table = pa.Table.from_batches(pending)
                yield self._to_showers(table.slice(0, batch_size))
                rest = table.slice(batch_size)
                pending = rest.to_batches() if rest.num_rows else []
                n_pending = rest.num_rows
        if n_pending:
            yield self._to_showers(pa.Table.from_batches(pending))


def open_dataset(path: str | os.PathLike[str]) -> ShowerDataset:
    """Open an ingested dataset directory; a clear error if it is missing or not a calodistill dataset."""
    return ShowerDataset(path)


def dataset_hash(path: str | os.PathLike[str]) -> str:
    """Content hash of a dataset: SHA-256 over its metadata (which lists every file's SHA-256 and size).

    Cheap: it reads only ``_calodistill.json`` and checks each file's size on disk, without reading the
    data. Two ingests of the same sources with the same seed and options give the same hash (the
    creation time is left out).
    """
    meta = dict(_read_metadata(Path(path)))
    meta.pop("created", None)
    sources = [{k: v for k, v in s.items() if k != "path"} for s in meta.get("sources", [])]
    meta["sources"] = sources
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
