"""CSV and Parquet tables (pipeline/data/tables.py): the Parquet layout, declared columns, CSV byte ranges
and bad tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from calodistill.pipeline.data.formats import open_source, read_showers, write_showers
from calodistill.pipeline.data.tables import ColumnSpec
from calodistill.pipeline.errors import CalodistillError
from tests.pipeline.data.test_formats import assert_same, make_showers


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
    import calodistill.pipeline.data.tables as tables

    monkeypatch.setattr(tables, "_CSV_INDEX_STRIDE", 7)
    s = make_showers("calogan", 40)
    write_showers(s, tmp_path / "s.csv")
    src = open_source(tmp_path / "s.csv")
    assert src.n_rows == 40 and len(src.offsets) > 3
    for a, b in [(0, 40), (3, 9), (7, 14), (13, 40), (39, 40)]:
        part = src.read(a, b)
        np.testing.assert_array_equal(part.voxels, s.voxels[a:b])
        np.testing.assert_array_equal(part.event_id, s.event_id[a:b])


def test_bad_tables(tmp_path: Path) -> None:
    s = make_showers("calogan", 3)
    write_showers(s, tmp_path / "ok.csv")
    text = (tmp_path / "ok.csv").read_text().splitlines()
    (tmp_path / "nan.csv").write_text("\n".join([text[0], text[1], text[2].replace(",0.0,", ",nan,", 1), text[3]]))
    with pytest.raises(CalodistillError, match=r"nan.csv: missing or NaN value in row 1"):
        read_showers(tmp_path / "nan.csv")
    (tmp_path / "word.csv").write_text("\n".join([text[0], text[1].replace(",0.0,", ",abc,", 1)]))
    with pytest.raises(CalodistillError, match=r"word.csv: column 'v\d+', row 0: 'abc' is not a number"):
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
    with pytest.raises(CalodistillError, match=r"gap.csv: voxel column v1 is missing \(found 2 of v0..v2\)"):
        read_showers(tmp_path / "gap.csv")
    write_showers(s, tmp_path / "ok.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "ok.parquet").read_bytes()[:-100])
    with pytest.raises(CalodistillError, match=r"cut.parquet: not a readable Parquet file"):
        read_showers(tmp_path / "cut.parquet")
    ragged = pa.table({"incident_energy": [1.0, 2.0], "voxels": pa.array([[1.0] * 504, [1.0] * 503])})
    pq.write_table(ragged, tmp_path / "ragged.parquet")
    with pytest.raises(CalodistillError, match=r"ragged.parquet: row 1 has 503 voxels, expected 504"):
        read_showers(tmp_path / "ragged.parquet")


def test_bad_cells_and_columns_are_named(tmp_path: Path) -> None:
    """A missing voxel column, a non-numeric cell and a negative energy are named, with plain numbers and units."""
    frame = pd.DataFrame({"incident_energy": [10.0, 20.0, 30.0]})
    frame = pd.concat([frame, pd.DataFrame(np.ones((3, 504)), columns=[f"v{i}" for i in range(504)])], axis=1)
    frame.drop(columns=["v17"]).to_csv(tmp_path / "v17.csv", index=False)
    with pytest.raises(CalodistillError, match=r"v17.csv: voxel column v17 is missing \(found 503 of v0..v503\)$"):
        read_showers(tmp_path / "v17.csv")
    frame.drop(columns=["v3", "v9"]).to_csv(tmp_path / "two.csv", index=False)
    with pytest.raises(CalodistillError, match=r"two.csv: voxel columns v3, v9 are missing"):
        read_showers(tmp_path / "two.csv")
    cells = frame.astype(object)
    cells.loc[2, "incident_energy"] = "10 GeV"
    cells.to_csv(tmp_path / "cell.csv", index=False)
    with pytest.raises(CalodistillError, match=r"cell.csv: column 'incident_energy', row 2: '10 GeV' is not a number$"):
        read_showers(tmp_path / "cell.csv")
    negative = frame.copy()
    negative.loc[1, "incident_energy"] = -10.0
    negative.to_csv(tmp_path / "neg.csv", index=False)
    with pytest.raises(CalodistillError, match=r"neg.csv: non-positive incident energy -10 GeV in row 1$"):
        read_showers(tmp_path / "neg.csv", columns="energy_unit=GeV")
    with pytest.raises(CalodistillError, match=r"neg.csv: non-positive incident energy -10 MeV in row 1$"):
        read_showers(tmp_path / "neg.csv")
    negative.loc[1, "incident_energy"] = 10.0
    negative.loc[2, "v5"] = -2.5
    negative.to_csv(tmp_path / "vox.csv", index=False)
    with pytest.raises(CalodistillError, match=r"vox.csv: negative voxel energy -2.5 MeV in row 2$"):
        read_showers(tmp_path / "vox.csv")
