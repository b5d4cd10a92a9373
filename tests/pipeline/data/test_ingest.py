"""Dask ingest: exact contents, metadata, deterministic split, multiple sources, failures and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from calodistill.pipeline.cli import main
from calodistill.pipeline.data.dataset import dataset_hash, open_dataset
from calodistill.pipeline.data.formats import read_showers, write_showers
from calodistill.pipeline.data.ingest import ingest_showers, split_assignment
from calodistill.pipeline.data.source import file_sha256
from calodistill.pipeline.errors import CalodistillError
from tests.pipeline.data.test_formats import make_showers


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_ingest_real_file_exact(calogan_real_file: Path, tmp_path: Path, cluster: str) -> None:
    out = tmp_path / "ds"
    summary = ingest_showers([calogan_real_file], out, scheduler=cluster, progress=False)
    assert summary["n_showers"] == 51 and summary["geometry"] == "calogan"
    assert sum(summary["counts"][s] for s in ("train", "val", "test")) == 51
    ds = open_dataset(out)
    loaded = ds.load()
    ref = read_showers(calogan_real_file)
    np.testing.assert_array_equal(loaded.voxels, ref.voxels)
    np.testing.assert_array_equal(loaded.incident_energy, ref.incident_energy)
    np.testing.assert_array_equal(loaded.event_id, np.arange(51))
    assert set(loaded.particle) == {"e+"}

    meta = json.loads((out / "_calodistill.json").read_text())
    assert meta["units"] == "MeV" and meta["geometry"]["name"] == "calogan" and meta["split_seed"] == 0
    assert meta["sources"][0]["sha256"] == file_sha256(calogan_real_file)
    assert meta["sources"][0]["n_rows"] == 51 and meta["counts"]["total"] == 51
    assert meta["split_fractions"] == [0.8, 0.1, 0.1] and "calodistill_version" in meta and "created" in meta
    common = json.loads(pq.read_schema(out / "_common_metadata").metadata[b"calodistill"])
    assert common == {k: v for k, v in meta.items()}
    part = pq.read_schema(out / meta["files"][0]["name"])
    assert json.loads(part.metadata[b"calodistill"])["geometry"]["name"] == "calogan"
    assert part.field("voxels").type == pa.list_(pa.float32(), 504)
    assert part.field("layer_energies").type == pa.list_(pa.float32(), 3)
    assert part.field("split").type == pa.int8() and pa.types.is_dictionary(part.field("particle").type)
    assert _leftovers(tmp_path) == []


def test_synth_source_equals_generator(tmp_path: Path, cluster: str) -> None:
    from calodistill.pipeline.data.synth import generate_showers, parse_synth_source

    src = "synth:calogan?n=300&seed=3&chunk_size=100"
    summary = ingest_showers([src], tmp_path / "ds", scheduler=cluster, progress=False, partition_mb=0.3)
    assert summary["n_partitions"] == 3  # 0.3 MB / 2024 B per row = 148 rows → 100 (synth chunk alignment)
    loaded = open_dataset(tmp_path / "ds").load()
    ref = generate_showers(parse_synth_source(src))
    np.testing.assert_array_equal(loaded.voxels, ref.voxels)
    np.testing.assert_array_equal(loaded.incident_energy, ref.incident_energy)
    assert summary["sources"][0]["spec"]["seed"] == 3 and summary["sources"][0]["kind"] == "synth"


def test_multi_source_unique_ids_and_layer_energies(tmp_path: Path, cluster: str) -> None:
    a, b = make_showers("calochallenge-1-photons", 30, seed=1), make_showers("calochallenge-1-photons", 25, seed=2)
    write_showers(a, tmp_path / "a.h5")
    write_showers(b, tmp_path / "b.parquet")
    summary = ingest_showers(
        [tmp_path / "a.h5", tmp_path / "b.parquet"], tmp_path / "ds", scheduler=cluster, progress=False, partition_mb=0.02
    )
    # 0.02 MB / 1480 B per row = 13 rows per file; partitions never span sources: 3 + 2 files
    assert summary["n_showers"] == 55 and summary["n_partitions"] == 5
    assert [s["first_event_id"] for s in summary["sources"]] == [0, 30]
    loaded = open_dataset(tmp_path / "ds").load()
    np.testing.assert_array_equal(loaded.event_id, np.arange(55))
    np.testing.assert_array_equal(loaded.voxels, np.concatenate([a.voxels, b.voxels]))
    table = pq.read_table(tmp_path / "ds", columns=["event_id", "layer_energies"])
    le = np.asarray(table.column("layer_energies").combine_chunks().flatten()).reshape(-1, 5)
    order = np.argsort(table.column("event_id").to_numpy())
    np.testing.assert_allclose(le[order], loaded.geometry.layer_energies(loaded.voxels), rtol=1e-5)


def test_mixed_geometries_refused(tmp_path: Path) -> None:
    write_showers(make_showers("calogan", 3), tmp_path / "a.h5")
    write_showers(make_showers("calochallenge-1-photons", 3), tmp_path / "b.h5")
    with pytest.raises(CalodistillError, match="sources have different geometries"):
        ingest_showers([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "ds", scheduler="threads", progress=False)
    assert not (tmp_path / "ds").exists() and _leftovers(tmp_path) == []


def test_split_is_deterministic_and_independent_of_partitioning(tmp_path: Path, cluster: str) -> None:
    write_showers(make_showers("calogan", 200), tmp_path / "s.h5")
    runs = {}
    for name, seed, mb in [("a", 5, 100.0), ("b", 5, 0.05), ("c", 6, 100.0)]:
        ingest_showers([tmp_path / "s.h5"], tmp_path / name, scheduler=cluster, split_seed=seed, partition_mb=mb, progress=False)
        table = pq.read_table(tmp_path / name, columns=["event_id", "split"]).sort_by("event_id")
        runs[name] = table.column("split").to_numpy()
    np.testing.assert_array_equal(runs["a"], runs["b"])
    assert (runs["a"] != runs["c"]).any()
    np.testing.assert_array_equal(runs["a"], split_assignment(np.arange(200), 5))
    again = ingest_showers([tmp_path / "s.h5"], tmp_path / "a2", scheduler="threads", split_seed=5, progress=False)
    assert again["dataset_hash"] == dataset_hash(tmp_path / "a")  # same content, same hash


def test_split_fractions() -> None:
    codes = split_assignment(np.arange(100_000), seed=1, fractions=(0.7, 0.2, 0.1))
    shares = np.bincount(codes, minlength=3) / len(codes)
    np.testing.assert_allclose(shares, [0.7, 0.2, 0.1], atol=0.005)
    assert (split_assignment(np.arange(1000), 1, (1.0, 0.0, 0.0)) == 0).all()
    with pytest.raises(CalodistillError, match="split fractions"):
        ingest_showers(["x.h5"], "/nonexistent/ds", split_fractions=(0.5, 0.2, 0.1))


def test_overwrite_refused_then_replaced(calogan_real_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    ingest_showers([calogan_real_file], out, scheduler="threads", split_seed=1, progress=False)
    before = dataset_hash(out)
    with pytest.raises(CalodistillError, match="dataset already exists; pass --overwrite"):
        ingest_showers([calogan_real_file], out, scheduler="threads", progress=False)
    assert dataset_hash(out) == before
    ingest_showers([calogan_real_file], out, scheduler="threads", split_seed=2, overwrite=True, progress=False)
    assert open_dataset(out).metadata["split_seed"] == 2 and dataset_hash(out) != before
    assert _leftovers(tmp_path) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(CalodistillError, match="exists and is not a calodistill dataset; refusing"):
        ingest_showers([calogan_real_file], tmp_path / "mine", scheduler="threads", overwrite=True, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_failure_in_a_task_leaves_nothing(tmp_path: Path, cluster: str) -> None:
    """A NaN deep inside the second source is only seen by its task; the temporary dataset is removed."""
    good = make_showers("calochallenge-1-photons", 40)
    write_showers(good, tmp_path / "good.h5")
    bad = make_showers("calochallenge-1-photons", 40, seed=1)
    bad.voxels[33, 7] = np.nan
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("incident_energies", data=bad.incident_energy.reshape(-1, 1))
        f.create_dataset("showers", data=bad.voxels)
    with pytest.raises(CalodistillError, match=r"bad.h5: non-finite voxel energy \(NaN/inf\) in row 33"):
        ingest_showers([tmp_path / "good.h5", tmp_path / "bad.h5"], tmp_path / "ds", scheduler=cluster,
                       partition_mb=0.01, progress=False)
    assert not (tmp_path / "ds").exists() and _leftovers(tmp_path) == []


def test_cli_bad_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 50)
    code = main(["ingest", str(bad), "--out", str(tmp_path / "ds"), "--scheduler", "threads"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("calodistill: error: ") and "broken.h5" in err[0] and "truncated or corrupt" in err[0]
    assert not (tmp_path / "ds").exists()


def test_cli_ingest_summary(calogan_real_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["ingest", str(calogan_real_file), "--out", str(tmp_path / "ds"), "--scheduler", "threads",
            "--split-seed", "4", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ingested 51 showers (calogan)" in out and "seed 4" in out
    assert main(argv) == 2
    assert "dataset already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
