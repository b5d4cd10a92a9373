"""Readers and writers: the real CaloGAN file, exact round trips, chunked access and every bad input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from calodistill.pipeline.data.formats import (
    ColumnSpec,
    open_source,
    read_showers,
    write_showers,
)
from calodistill.pipeline.data.geometry import get_geometry
from calodistill.pipeline.data.showers import Showers
from calodistill.pipeline.errors import CalodistillError


def make_showers(geometry: str, n: int, seed: int = 0) -> Showers:
    """Sparse, positive, float32-exact toy showers (not physics; for format tests only)."""
    rng = np.random.default_rng(seed)
    geo = get_geometry(geometry)
    voxels = rng.exponential(50.0, size=(n, geo.n_voxels)).astype(np.float32)
    voxels[rng.random(voxels.shape) < 0.6] = 0.0
    energy = rng.uniform(1e3, 1e5, size=n)
    return Showers(geo, energy, voxels, np.full(n, "gamma", dtype=object), np.arange(n, dtype=np.int64) + 7)


def assert_same(a: Showers, b: Showers, energy_exact: bool = True) -> None:
    assert a.geometry.name == b.geometry.name
    np.testing.assert_array_equal(a.voxels, b.voxels)
    if energy_exact:
        np.testing.assert_array_equal(a.incident_energy, b.incident_energy)
    else:
        np.testing.assert_allclose(a.incident_energy, b.incident_energy, rtol=1e-15)


# ------------------------------------------------------------------------------------------ real data
def test_read_real_calogan(calogan_real_file: Path) -> None:
    s = read_showers(calogan_real_file)
    assert len(s) == 51 and s.geometry.name == "calogan" and s.voxels.shape == (51, 504)
    assert s.incident_energy.min() >= 1e3 and s.incident_energy.max() <= 1e5  # 1–100 GeV, now MeV
    assert 0.97 < float(np.mean(s.voxels.sum(axis=1) / s.incident_energy)) < 1.01
    assert set(s.particle) == {"e+"} and list(s.event_id) == list(range(51))
    with h5py.File(calogan_real_file) as f:
        for i, layer in enumerate(s.geometry.split_layers(s.voxels)):
            np.testing.assert_array_equal(layer, f[f"layer_{i}"][:].astype(np.float32))
        np.testing.assert_array_equal(s.incident_energy, f["energy"][:, 0] * 1000.0)


def test_real_calogan_round_trips(calogan_real_file: Path, tmp_path: Path) -> None:
    s = read_showers(calogan_real_file)
    for name in ("a.parquet", "a.h5", "a.csv"):
        back = read_showers(write_showers(s, tmp_path / name))
        assert_same(s, back, energy_exact=name != "a.h5")
        np.testing.assert_array_equal(back.event_id, s.event_id)
        assert list(back.particle) == list(s.particle)
    with h5py.File(tmp_path / "a.h5") as f:  # CaloGAN layout, GeV
        assert f["energy"].shape == (51, 1) and f["layer_1"].shape == (51, 12, 12) and f["overflow"].shape == (51, 3)
        np.testing.assert_allclose(f["energy"][:, 0], s.incident_energy / 1000.0)


def test_chunked_source_matches_full_read(calogan_real_file: Path) -> None:
    src = open_source(calogan_real_file)
    assert src.n_rows == 51 and src.geometry.name == "calogan" and src.kind == "calogan"
    full = src.read(0, 51)
    parts = [src.read(a, min(a + 20, 51)) for a in range(0, 51, 20)]
    assert_same(full, Showers.concatenate(parts))
    assert src.sha256 == hashlib.sha256(calogan_real_file.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("geometry", ["calochallenge-1-photons", "calochallenge-2"])
def test_calochallenge_hdf5_round_trip(geometry: str, tmp_path: Path) -> None:
    s = make_showers(geometry, 9)
    path = write_showers(s, tmp_path / "cc.hdf5")
    with h5py.File(path) as f:
        assert f["incident_energies"].shape == (9, 1) and f["showers"].shape == (9, s.geometry.n_voxels)
    back = read_showers(path)  # geometry inferred from the voxel count
    assert_same(s, back)
    assert back.geometry.name == geometry
    for a in (0, 4):
        assert_same(s.subset(slice(a, a + 5)), open_source(path).read(a, a + 5))


def test_parquet_round_trip_exact_and_layout(tmp_path: Path) -> None:
    s = make_showers("calochallenge-1-pions", 20)
    path = write_showers(s, tmp_path / "s.parquet")
    schema = pq.read_schema(path)
    assert pa.types.is_fixed_size_list(schema.field("voxels").type)
    assert schema.field("voxels").type.list_size == 533
    back = read_showers(path)
    assert_same(s, back)
    np.testing.assert_array_equal(back.event_id, s.event_id)
    assert list(back.particle) == ["gamma"] * 20
    src = open_source(path)
    assert_same(s.subset(slice(3, 17)), src.read(3, 17))


def test_calogan_layout_is_native_and_explicit_format(tmp_path: Path) -> None:
    s = make_showers("calogan", 5)
    write_showers(s, tmp_path / "flat.h5", fmt="calochallenge")
    with h5py.File(tmp_path / "flat.h5") as f:
        assert set(f) == {"incident_energies", "showers"}
    assert_same(s, read_showers(tmp_path / "flat.h5"))
    with pytest.raises(CalodistillError, match="CaloGAN layout needs the calogan geometry"):
        write_showers(make_showers("calochallenge-1-photons", 2), tmp_path / "x.h5", fmt="calogan")
    with pytest.raises(CalodistillError, match="unknown output type '.txt'"):
        write_showers(s, tmp_path / "x.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.h5"]  # nothing half-written left


def test_write_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_showers("calogan", 3)
    target = write_showers(s, tmp_path / "s.parquet")
    before = target.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_showers(make_showers("calogan", 4, seed=1), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]


def test_declared_columns_csv_and_list_parquet(tmp_path: Path) -> None:
    s = make_showers("calochallenge-1-photons", 6)
    frame = pd.DataFrame(s.voxels, columns=[f"cell_{i}" for i in range(368)])
    frame.insert(0, "E_GeV", s.incident_energy / 1000.0)
    frame.to_csv(tmp_path / "t.csv", index=False)
    spec = "incident_energy=E_GeV,energy_unit=GeV,voxels=cell_*"
    back = read_showers(tmp_path / "t.csv", columns=spec)
    np.testing.assert_array_equal(back.voxels, s.voxels)
    np.testing.assert_allclose(back.incident_energy, s.incident_energy, rtol=1e-15)
    assert list(back.event_id) == list(range(6)) and back.particle[0] == "photon"

    table = pa.table({"e": s.incident_energy, "deposits": pa.array(list(s.voxels.astype(np.float64)))})
    pq.write_table(table, tmp_path / "list.parquet")
    back = read_showers(tmp_path / "list.parquet", columns={"incident_energy": "e", "voxels": "deposits"})
    assert_same(s, back)
    with pytest.raises(CalodistillError, match="unknown key.*energy_col"):
        ColumnSpec.parse("energy_col=E")


def test_csv_reads_by_byte_ranges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import calodistill.pipeline.data.formats as formats

    monkeypatch.setattr(formats, "_CSV_INDEX_STRIDE", 7)
    s = make_showers("calogan", 40)
    write_showers(s, tmp_path / "s.csv")
    src = open_source(tmp_path / "s.csv")
    assert src.n_rows == 40 and len(src.offsets) > 3
    for a, b in [(0, 40), (3, 9), (7, 14), (13, 40), (39, 40)]:
        part = src.read(a, b)
        np.testing.assert_array_equal(part.voxels, s.voxels[a:b])
        np.testing.assert_array_equal(part.event_id, s.event_id[a:b])


# ------------------------------------------------------------------------------------------ bad input
def _cc_file(path: Path, energies: np.ndarray, showers: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("incident_energies", data=energies)
        f.create_dataset("showers", data=showers)
    return path


def _good_cc(tmp_path: Path, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    s = make_showers("calochallenge-1-photons", n)
    return s.incident_energy.reshape(-1, 1).copy(), s.voxels.copy()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda e, v: (e, np.where(np.arange(v.shape[1]) == 5, np.nan, v)), r"non-finite voxel energy \(NaN/inf\) in row 0"),
        (lambda e, v: (np.where(np.arange(len(e))[:, None] == 2, np.inf, e), v), r"non-finite incident energy .* row 2"),
        (lambda e, v: (e, v * np.where(np.arange(len(v))[:, None] == 3, -1.0, 1.0)), r"negative voxel energy .* row 3"),
        (lambda e, v: (-e, v), r"non-positive incident energy"),
        (lambda e, v: (e[:3], v), r"'showers' has 4 rows, expected 3 \(mismatched lengths\)"),
        (lambda e, v: (e, v[:, :100]), r"100 voxels per shower fits no known geometry"),
        (lambda e, v: (e, v.reshape(len(v), 8, 46)), r"'showers' has shape \(4, 8, 46\), expected \(N, voxels\)"),
        (lambda e, v: (np.repeat(e, 2, axis=1), v), r"'incident_energies' has shape \(4, 2\)"),
    ],
    ids=["nan", "inf", "negative-voxel", "negative-energy", "mismatched", "no-geometry", "wrong-shape", "energy-shape"],
)
def test_bad_calochallenge_values(tmp_path: Path, mutate, match: str) -> None:  # noqa: ANN001
    e, v = mutate(*_good_cc(tmp_path))
    path = _cc_file(tmp_path / "bad.h5", e, v)
    with pytest.raises(CalodistillError, match=match) as info:
        read_showers(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_bad_calogan_inputs(tmp_path: Path, calogan_real_file: Path) -> None:
    with h5py.File(calogan_real_file) as src, h5py.File(tmp_path / "missing.h5", "w") as dst:
        for k in ("energy", "layer_0", "layer_1"):
            dst.create_dataset(k, data=src[k][:])
    with pytest.raises(CalodistillError, match=r"missing.h5: missing key\(s\) layer_2"):
        read_showers(tmp_path / "missing.h5")
    with h5py.File(calogan_real_file) as src, h5py.File(tmp_path / "shape.h5", "w") as dst:
        for k in ("energy", "layer_0", "layer_2"):
            dst.create_dataset(k, data=src[k][:])
        dst.create_dataset("layer_1", data=src["layer_1"][:, :, :11])
    with pytest.raises(CalodistillError, match=r"shape.h5: dataset 'layer_1' has shape \(51, 12, 11\)"):
        read_showers(tmp_path / "shape.h5")
    with pytest.raises(CalodistillError, match="cannot hold geometry calochallenge-2"):
        read_showers(calogan_real_file, geometry="calochallenge-2")


def test_bad_files(tmp_path: Path, calogan_real_file: Path) -> None:
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(CalodistillError, match=r"empty.h5: empty file"):
        read_showers(empty)
    data = calogan_real_file.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CalodistillError, match=r"truncated.h5: .*truncated or corrupt"):
        read_showers(truncated)
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"this is not hdf5 at all" * 10)
    with pytest.raises(CalodistillError, match=r"corrupt.h5: not an HDF5 file"):
        read_showers(corrupt)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(CalodistillError, match=r"other.h5: missing keys: neither CaloGAN"):
        read_showers(tmp_path / "other.h5")
    e, v = _good_cc(tmp_path)
    _cc_file(tmp_path / "zero.h5", e[:0], v[:0])
    with pytest.raises(CalodistillError, match=r"zero.h5: empty file \(no showers\)"):
        read_showers(tmp_path / "zero.h5")
    _cc_file(tmp_path / "ok.h5", e, v)
    with pytest.raises(CalodistillError, match=r"ok.h5: unknown geometry 'calonope'"):
        read_showers(tmp_path / "ok.h5", geometry="calonope")
    with pytest.raises(CalodistillError, match=r"ok.h5: 368 voxels per shower, geometry calogan has 504"):
        read_showers(tmp_path / "ok.h5", geometry="calogan")
    with pytest.raises(CalodistillError, match=r"nothere.h5: no such file"):
        read_showers(tmp_path / "nothere.h5")
    (tmp_path / "x.npy").write_bytes(b"123")
    with pytest.raises(CalodistillError, match=r"x.npy: unknown file type '.npy'"):
        read_showers(tmp_path / "x.npy")


def test_truncated_dataset_payload(tmp_path: Path) -> None:
    """A file whose header survives but whose data blocks are cut off fails on read, naming the file."""
    s = make_showers("calochallenge-1-photons", 2000)
    path = write_showers(s, tmp_path / "big.h5")
    data = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: int(len(data) * 0.9)])
    with pytest.raises(CalodistillError, match=r"cut.h5: .*(truncated or corrupt)"):
        read_showers(cut)


def test_bad_tables(tmp_path: Path) -> None:
    s = make_showers("calogan", 3)
    write_showers(s, tmp_path / "ok.csv")
    text = (tmp_path / "ok.csv").read_text().splitlines()
    (tmp_path / "nan.csv").write_text("\n".join([text[0], text[1], text[2].replace(",0.0,", ",nan,", 1), text[3]]))
    with pytest.raises(CalodistillError, match=r"nan.csv: missing or NaN value in row 1"):
        read_showers(tmp_path / "nan.csv")
    (tmp_path / "word.csv").write_text("\n".join([text[0], text[1].replace(",0.0,", ",abc,", 1)]))
    with pytest.raises(CalodistillError, match=r"word.csv: non-numeric value"):
        read_showers(tmp_path / "word.csv")
    (tmp_path / "nocol.csv").write_text("energy,v0,v1\n1,2,3\n")
    with pytest.raises(CalodistillError, match=r"nocol.csv: missing column 'incident_energy'"):
        read_showers(tmp_path / "nocol.csv")
    (tmp_path / "head.csv").write_text(text[0] + "\n")
    with pytest.raises(CalodistillError, match=r"head.csv: empty file \(no showers\)"):
        read_showers(tmp_path / "head.csv")
    (tmp_path / "few.csv").write_text("incident_energy,v0,v1,v2\n1,2,3,4\n")
    with pytest.raises(CalodistillError, match=r"few.csv: 3 voxels per shower fits no known geometry"):
        read_showers(tmp_path / "few.csv")
    (tmp_path / "gap.csv").write_text("incident_energy,v0,v2\n1,2,3\n")
    with pytest.raises(CalodistillError, match=r"gap.csv: voxel columns v0..v1 are not contiguous"):
        read_showers(tmp_path / "gap.csv")
    write_showers(s, tmp_path / "ok.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "ok.parquet").read_bytes()[:-100])
    with pytest.raises(CalodistillError, match=r"cut.parquet: not a readable Parquet file"):
        read_showers(tmp_path / "cut.parquet")
    ragged = pa.table({"incident_energy": [1.0, 2.0], "voxels": pa.array([[1.0] * 504, [1.0] * 503])})
    pq.write_table(ragged, tmp_path / "ragged.parquet")
    with pytest.raises(CalodistillError, match=r"ragged.parquet: row 1 has 503 voxels, expected 504"):
        read_showers(tmp_path / "ragged.parquet")
