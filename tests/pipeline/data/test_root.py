"""ROOT input through uproot and the column mapping (pipeline/data/root.py, columns.py, mapped.py): units,
log10 energies with a sentinel, particle codes, entry filters, fixed/multi-dimensional/variable-size voxel
branches, the same mapping on HDF5, globs and trees on Dask, the writers for any geometry, and one-line
errors that leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

uproot = pytest.importorskip("uproot")

from calodistill.pipeline.data.columns import ColumnSpec  # noqa: E402
from calodistill.pipeline.data.dataset import open_dataset  # noqa: E402
from calodistill.pipeline.data.formats import open_source, read_showers, write_showers  # noqa: E402
from calodistill.pipeline.data.geometry import get_geometry  # noqa: E402
from calodistill.pipeline.data.ingest import ingest_showers  # noqa: E402
from calodistill.pipeline.data.showers import Showers  # noqa: E402
from calodistill.pipeline.errors import CalodistillError  # noqa: E402

GEOMETRY = "name: tiny-root\nlayers:\n  - {nx: 4, ny: 3, cell_mm: 10, repeat: 2}\n"  # 2 x (3 x 4) = 24 cells
MAPPING = """
tree: events
incident_energy: e_in
energy_unit: GeV
voxels: cells
voxel_unit: keV
voxel_encoding: log10
empty_value: -5
particle: pdg
particle_codes: pdg
"""
N = 60


def _events(rng: np.random.Generator, n: int = N) -> dict[str, np.ndarray]:
    """Raw branches: e_in GeV, cells [2][3][4] log10(E/keV) with -5 for empty cells, PDG codes."""
    kev = rng.exponential(500.0, size=(n, 2, 3, 4)) * (rng.random((n, 2, 3, 4)) < 0.6)
    cells = np.where(kev > 0, np.log10(np.where(kev > 0, kev, 1.0)), -5.0)
    return {"e_in": rng.uniform(1.0, 10.0, n), "cells": cells,
            "pdg": rng.choice(np.array([22, 11, -11], dtype=np.int32), n), "flag": rng.integers(0, 2, n).astype(np.int32)}


def _write_root(path: Path, data: dict[str, np.ndarray], tree: str = "events", extra_tree: bool = False) -> Path:
    with uproot.recreate(path) as f:
        branches = {k: (v.dtype, v.shape[1:]) if v.ndim > 1 else v.dtype for k, v in data.items()}
        t = f.mktree(tree, branches)
        half = len(next(iter(data.values()))) // 2  # two baskets: entry ranges cross them
        t.extend({k: v[:half] for k, v in data.items()})
        t.extend({k: v[half:] for k, v in data.items()})
        if extra_tree:
            f.mktree("other", {"x": np.float64}).extend({"x": np.zeros(3)})
    return path


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(5)
    data = _events(rng)
    geo = tmp_path / "geometry.yaml"
    geo.write_text(GEOMETRY)
    cols = tmp_path / "columns.yaml"
    cols.write_text(MAPPING)
    return {"root": _write_root(tmp_path / "a.root", data), "geometry": geo, "columns": cols, "data": data,
            "dir": tmp_path}


def _expected(data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    cells = data["cells"].reshape(len(data["e_in"]), -1)
    mev = np.where(cells <= -5, 0.0, 10.0**cells) * 1e-3
    return data["e_in"] * 1e3, mev.astype(np.float32)


def test_mapping_decodes_units_log10_sentinel_and_pdg_codes(files: dict) -> None:
    showers = read_showers(files["root"], files["geometry"], files["columns"])
    e, vox = _expected(files["data"])
    assert len(showers) == N and showers.geometry.name == "tiny-root" and showers.geometry.n_voxels == 24
    np.testing.assert_allclose(showers.incident_energy, e, rtol=1e-12)
    np.testing.assert_array_equal(showers.voxels, vox)
    assert (showers.voxels == 0).any()
    names = {22: "gamma", 11: "e-", -11: "e+"}
    assert list(showers.particle) == [names[int(c)] for c in files["data"]["pdg"]]


def test_entry_ranges_tree_spec_filter_and_user_codes(files: dict) -> None:
    src = open_source(f"{files['root']}:events", files["geometry"], files["columns"])
    whole = src.read(0, N)
    parts = [src.read(a, min(a + 17, N)) for a in range(0, N, 17)]  # ranges across the baskets
    assert np.array_equal(np.concatenate([p.voxels for p in parts]), whole.voxels)
    cols = ColumnSpec.parse(files["columns"])
    spec = {**{k: getattr(cols, k) for k in ("incident_energy", "voxels", "voxel_unit", "voxel_encoding",
                                            "empty_value", "particle", "tree")},
            "energy_unit": "GeV", "filter": "flag == 1 and e_in > 2", "particle_codes": {22: "photon", 11: "el", -11: "po"}}
    filtered = read_showers(files["root"], files["geometry"], spec)
    keep = (files["data"]["flag"] == 1) & (files["data"]["e_in"] > 2)
    assert len(filtered) == int(keep.sum())
    np.testing.assert_array_equal(filtered.voxels, whole.voxels[keep])
    assert set(filtered.particle) <= {"photon", "el", "po"}
    src_f = open_source(files["root"], files["geometry"], spec)
    assert np.array_equal(src_f.read(3, 9).voxels, whole.voxels[keep][3:9])


def test_fixed_size_jagged_and_per_layer_branches(files: dict, tmp_path: Path) -> None:
    import awkward as ak

    data = files["data"]
    flat = {"e_in": data["e_in"], "cells": data["cells"].reshape(N, 24)}
    ref = read_showers(files["root"], files["geometry"], files["columns"])
    mapping = {"incident_energy": "e_in", "energy_unit": "GeV", "voxels": "cells", "voxel_unit": "keV",
               "voxel_encoding": "log10", "empty_value": -5}
    fixed = read_showers(_write_root(tmp_path / "fixed.root", flat), files["geometry"], mapping)
    assert np.array_equal(fixed.voxels, ref.voxels)
    per_layer = {"e_in": data["e_in"], "layer_0": data["cells"][:, 0], "layer_1": data["cells"][:, 1]}
    split = read_showers(_write_root(tmp_path / "layers.root", per_layer), files["geometry"], {**mapping, "voxels": "layer_*"})
    assert np.array_equal(split.voxels, ref.voxels)
    with uproot.recreate(tmp_path / "jagged.root") as f:
        f.mktree("t", {"e_in": np.float64, "cells": "var * float64"}).extend(
            {"e_in": data["e_in"], "cells": ak.Array([list(row) for row in data["cells"].reshape(N, 24)])})
    jag = read_showers(tmp_path / "jagged.root", files["geometry"], mapping)
    assert np.array_equal(jag.voxels, ref.voxels)


def test_same_mapping_reads_hdf5(files: dict, tmp_path: Path) -> None:
    import h5py

    with h5py.File(tmp_path / "same.h5", "w") as f:
        for k, v in files["data"].items():
            f.create_dataset(k, data=v, chunks=True)
    ref = read_showers(files["root"], files["geometry"], files["columns"])
    h5 = read_showers(tmp_path / "same.h5", files["geometry"], files["columns"])  # tree 'events' is no group: root
    assert np.array_equal(h5.voxels, ref.voxels) and np.array_equal(h5.particle, ref.particle)
    with h5py.File(tmp_path / "grouped.h5", "w") as f:
        for k, v in files["data"].items():
            f.create_dataset(f"events/{k}", data=v)
    assert np.array_equal(read_showers(tmp_path / "grouped.h5", files["geometry"], files["columns"]).voxels, ref.voxels)


def test_ingest_globs_and_trees_on_dask(files: dict, cluster: str) -> None:
    rng = np.random.default_rng(9)
    _write_root(files["dir"] / "b.root", _events(rng, 25))
    out = files["dir"] / "ds"
    summary = ingest_showers([str(files["dir"] / "*.root") + ":events"], out, geometry=str(files["geometry"]),
                             columns=str(files["columns"]), scheduler=cluster, partition_mb=0.0005, progress=False)
    assert summary["n_showers"] == N + 25 and summary["geometry"] == "tiny-root" and summary["n_partitions"] > 2
    assert [s["tree"] for s in summary["sources"]] == ["events", "events"]
    ds = open_dataset(out)  # the geometry travels in the metadata: no flag needed to read it back
    assert ds.geometry == get_geometry(files["geometry"]) and ds.metadata["geometry"]["name"] == "tiny-root"
    back = ds.load()
    ref = read_showers(files["root"], files["geometry"], files["columns"])
    assert np.array_equal(back.voxels[:N], ref.voxels)


def test_writers_for_any_geometry_round_trip(files: dict, tmp_path: Path) -> None:
    showers = read_showers(files["root"], files["geometry"], files["columns"])
    for name in ("out.h5", "out.parquet", "out.root"):
        path = write_showers(showers, tmp_path / name)
        back = read_showers(path)  # the geometry record travels with the file
        assert back.geometry == showers.geometry, name
        np.testing.assert_array_equal(back.voxels, showers.voxels)
        np.testing.assert_array_equal(back.incident_energy, showers.incident_energy)
        if not name.endswith(".h5"):  # the CaloChallenge layout holds no particles
            assert list(back.particle) == list(showers.particle), name
    with pytest.raises(CalodistillError, match=r"particle 'kaon\?' has no PDG code"):
        write_showers(Showers(showers.geometry, showers.incident_energy[:2], showers.voxels[:2], "kaon?"),
                      tmp_path / "bad.root")
    assert not (tmp_path / "bad.root").exists()


def _bad_cases(files: dict, tmp: Path) -> list[tuple[str, dict | Path, str]]:
    data = files["data"]
    nan = {**data, "e_in": np.where(np.arange(N) == 7, np.nan, data["e_in"])}
    nan_cells = {**data, "cells": np.where(np.arange(N)[:, None, None, None] == 4, np.inf, data["cells"])}
    lin = {"incident_energy": "e_in", "energy_unit": "GeV", "voxels": "cells", "voxel_unit": "keV", "tree": "events"}
    negative = {**data, "cells": np.where(np.arange(N)[:, None, None, None] == 11, -3.0, np.abs(data["cells"]))}
    wrong = {"e_in": data["e_in"], "cells": data["cells"].reshape(N, 2, 12)[:, :, :10].copy()}
    transposed = {"e_in": data["e_in"], "cells": np.ascontiguousarray(data["cells"].transpose(0, 2, 1, 3).reshape(N, 3, 2, 4))}
    cut, cut2 = tmp / "cut.root", tmp / "cut2.root"
    return [
        (str(_write_root(tmp / "nan.root", nan)), files["columns"], r"nan\.root: non-finite incident energy \(NaN/inf\) in row 7"),
        (str(_write_root(tmp / "nancell.root", nan_cells)), files["columns"], r"column 'cells': non-finite value \(NaN/inf\) in row 4"),
        (str(_write_root(tmp / "neg.root", negative)), lin, r"neg\.root: negative voxel energy -0\.003\d* MeV in row 11"),
        (str(_write_root(tmp / "wrong.root", wrong)), lin, r"voxel column 'cells' of shape \[2, 10\] holds 20 values per entry, geometry tiny-root"),
        (str(_write_root(tmp / "t.root", transposed)), lin, r"axes \[3, 2, 4\] per entry, geometry tiny-root expects \[layers\]\[rows\]\[columns\] = \[2, 3, 4\]"),
        (str(files["root"]), {**lin, "voxels": "cels"}, r"a\.root:events: missing voxel columns \(looked for 'cels'"),
        (str(files["root"]), {**lin, "incident_energy": "E"}, r"missing branch 'E' \(incident energy\); branches: e_in, cells"),
        (f"{files['root']}:nope", lin, r"a\.root: no tree 'nope'; trees: events"),
        (str(_write_root(tmp / "two.root", data, extra_tree=True)), {**lin, "tree": ""}, r"two\.root: 2 trees \(events, other\); name one"),
        (str(files["root"]), {**lin, "particle": "pdg", "particle_codes": {22: "gamma"}}, r"column 'pdg': code -?11 in row \d+ is not in particle_codes"),
        (str(files["root"]), {**lin, "filter": "e_in > 1e9"}, r"the filter 'e_in > 1e9' keeps no entry"),
        (str(files["root"]), {**lin, "filter": "e_in >> 3"}, r"filter: 'e_in >> 3' is not BRANCH OP NUMBER"),
        (str(files["root"]), {**lin, "voxel_unit": "eV"}, r"voxel_unit: must be keV, MeV or GeV, got 'eV'"),
        (str(files["root"]), {**lin, "empty_value": -5}, r"empty_value: only meaningful with voxel_encoding: log10"),
        (str(files["root"]), {**lin, "energy_units": "GeV"}, r"unknown key 'energy_units'"),
        (str(_write_text(cut, files["root"].read_bytes()[:300])), lin, r"cut\.root: not a readable ROOT file \(truncated or corrupt\)"),
        (str(_write_text(cut2, files["root"].read_bytes()[:-3000])), lin, r"cut2\.root: cannot read"),
        (str(_write_text(tmp / "fake.root", b"not a root file at all")), lin, r"fake\.root: not a ROOT file \(bad signature"),
    ]


def _write_text(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_bad_root_input_is_one_line_and_nothing_is_written(files: dict, tmp_path: Path) -> None:
    cases = _bad_cases(files, tmp_path)
    for source, mapping, message in cases:
        out = tmp_path / "never"
        with pytest.raises(CalodistillError, match=message) as exc:
            ingest_showers([source], out, geometry=str(files["geometry"]), columns=mapping, scheduler="synchronous",
                           progress=False)
        assert "\n" not in str(exc.value), source
        assert not out.exists() and not list(tmp_path.glob(".never*")), source
    bad_map = tmp_path / "bad-columns.yaml"
    bad_map.write_text("voxels: [a, b\n")
    with pytest.raises(CalodistillError, match=r"bad-columns\.yaml: column mapping is not valid YAML"):
        ColumnSpec.parse(bad_map)
    with pytest.raises(CalodistillError, match=r"no file matches the pattern"):
        ingest_showers([str(tmp_path / "none-*.root")], tmp_path / "never", progress=False)
    with pytest.raises(CalodistillError, match=r"voxels per shower fits no known geometry.*pass --geometry"):
        read_showers(files["root"], None, files["columns"])
