"""CaloGAN and CaloChallenge HDF5 (pipeline/data/hdf5.py): chunked reads, round trips and every bad file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from calodistill.pipeline.data.formats import open_source, read_showers, write_showers
from calodistill.pipeline.data.showers import Showers
from calodistill.pipeline.errors import CalodistillError
from tests.pipeline.data.test_formats import assert_same, make_showers


def test_chunked_source_matches_full_read(calogan_real_file: Path) -> None:
    src = open_source(calogan_real_file)
    assert src.n_rows == 51 and src.geometry.name == "calogan" and src.kind == "calogan"
    full = src.read(0, 51)
    parts = [src.read(a, min(a + 20, 51)) for a in range(0, 51, 20)]
    assert_same(full, Showers.concatenate(parts))
    assert src.sha256 == hashlib.sha256(calogan_real_file.read_bytes()).hexdigest()


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
