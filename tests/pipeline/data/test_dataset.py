"""Opening and loading ingested datasets: splits, batches, hashes and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from calodistill.pipeline.data.dataset import dataset_hash, open_dataset
from calodistill.pipeline.data.formats import write_showers
from calodistill.pipeline.data.ingest import ingest_showers
from calodistill.pipeline.data.showers import Showers
from calodistill.pipeline.errors import CalodistillError
from tests.pipeline.data.test_formats import make_showers


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Showers]:
    showers = make_showers("calochallenge-1-photons", 300, seed=4)
    path = write_showers(showers, tmp_path_factory.mktemp("src") / "s.h5")
    return path, showers


@pytest.fixture(scope="module")
def dataset(source: tuple[Path, Showers], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "ds"
    # ~0.1 MB partitions → several files, each with per-split row groups
    ingest_showers([source[0]], out, scheduler="threads", split_seed=3, partition_mb=0.1, progress=False)
    return out


def test_load_all_and_splits(dataset: Path, source: tuple[Path, Showers]) -> None:
    ref = source[1]
    ds = open_dataset(dataset)
    assert ds.geometry.name == "calochallenge-1-photons" and len(ds.files) > 1
    assert ds.metadata["split_seed"] == 3 and ds.metadata["units"] == "MeV"
    everything = ds.load()
    np.testing.assert_array_equal(everything.event_id, np.arange(300))
    np.testing.assert_array_equal(everything.voxels, ref.voxels)
    np.testing.assert_array_equal(everything.incident_energy, ref.incident_energy)
    seen = []
    for split in ("train", "val", "test"):
        part = ds.load(split)
        assert len(part) == ds.count(split) > 0
        assert np.all(np.diff(part.event_id) > 0)
        np.testing.assert_array_equal(part.voxels, ref.voxels[part.event_id])
        seen.append(part.event_id)
    assert sorted(np.concatenate(seen).tolist()) == list(range(300))
    assert ds.count() == len(ds) == 300
    assert ds.count("train") > ds.count("val")


def test_max_rows_and_batches(dataset: Path) -> None:
    ds = open_dataset(dataset)
    head = ds.load("train", max_rows=17)
    assert len(head) == 17 and set(head.event_id) <= set(ds.load("train").event_id)
    batches = list(ds.iter_batches("train", batch_size=32))
    sizes = [len(b) for b in batches]
    assert all(s == 32 for s in sizes[:-1]) and 0 < sizes[-1] <= 32 and sum(sizes) == ds.count("train")
    joined = Showers.concatenate(batches)
    order = np.argsort(joined.event_id)
    train = ds.load("train")
    np.testing.assert_array_equal(joined.event_id[order], train.event_id)
    np.testing.assert_array_equal(joined.voxels[order], train.voxels)
    with pytest.raises(CalodistillError, match="unknown split 'validation'"):
        ds.load("validation")


def test_dataset_hash_is_cheap_and_content_based(dataset: Path, source: tuple[Path, Showers], tmp_path: Path) -> None:
    h = dataset_hash(dataset)
    assert len(h) == 64 and h == dataset_hash(dataset)
    moved = tmp_path / "copy"
    shutil.copytree(dataset, moved)
    assert dataset_hash(moved) == h  # location-independent
    other = tmp_path / "other"
    ingest_showers([source[0]], other, scheduler="threads", split_seed=4, partition_mb=0.1, progress=False)
    assert dataset_hash(other) != h
    first = moved / json.loads((moved / "_calodistill.json").read_text())["files"][0]["name"]
    with open(first, "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(CalodistillError, match=r"data file part-00000.parquet has \d+ bytes, metadata says \d+ \(modified\?\)"):
        dataset_hash(moved)


def test_open_errors(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(CalodistillError, match=r"nowhere: no such dataset directory"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CalodistillError, match=r"plain: not a calodistill dataset \(no _calodistill.json"):
        open_dataset(tmp_path / "plain")
    (tmp_path / "f.parquet").write_bytes(b"x")
    with pytest.raises(CalodistillError, match=r"f.parquet: not a directory"):
        open_dataset(tmp_path / "f.parquet")
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    (broken / "part-00001.parquet").unlink()
    with pytest.raises(CalodistillError, match=r"broken: data file part-00001.parquet listed in _calodistill.json is missing"):
        open_dataset(broken)
    (broken / "_calodistill.json").write_text("{not json")
    with pytest.raises(CalodistillError, match=r"_calodistill.json: unreadable dataset metadata"):
        open_dataset(broken)
    (broken / "_calodistill.json").write_text(json.dumps({"geometry": {"name": "calogan"}}))
    with pytest.raises(CalodistillError, match=r"_calodistill.json: dataset metadata lacks units, sources"):
        open_dataset(broken)
