"""Synthetic sources (pipeline/data/synth.py): determinism per chunk, spectra, spec parsing and the CLI."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest

from calodistill.pipeline.cli.synth import configure_parser, run_cli
from calodistill.pipeline.data.synth import (
    SynthSpec,
    generate_chunk,
    generate_showers,
    generate_showers_dask,
    n_chunks,
    parse_synth_source,
)
from calodistill.pipeline.errors import CalodistillError


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_showers_other_seed_different() -> None:
    spec = SynthSpec("calogan", 300, seed=7, chunk_size=100)
    a, b = generate_showers(spec), generate_showers(spec)
    np.testing.assert_array_equal(a.voxels, b.voxels)
    np.testing.assert_array_equal(a.incident_energy, b.incident_energy)
    c = generate_showers(dataclasses.replace(spec, seed=8))
    assert not np.array_equal(a.voxels, c.voxels)


def test_chunks_are_independent_of_distribution() -> None:
    spec = SynthSpec("calogan", 250, seed=3, chunk_size=100)
    assert n_chunks(spec) == 3
    whole = generate_showers(spec)
    last = generate_chunk(spec, 2)  # generated alone, out of order
    assert len(last) == 50
    np.testing.assert_array_equal(last.event_id, np.arange(200, 250))
    np.testing.assert_array_equal(whole.voxels[200:], last.voxels)
    np.testing.assert_array_equal(whole.event_id, np.arange(250))
    dask_threads = generate_showers_dask(spec)
    np.testing.assert_array_equal(dask_threads.voxels, whole.voxels)
    with pytest.raises(CalodistillError, match="chunk 3 out of range"):
        generate_chunk(spec, 3)


# ------------------------------------------------------------------------------------------ spectra


def test_uniform_spectrum_and_fixed_energy() -> None:
    s = generate_chunk(SynthSpec("calogan", 400, seed=2, chunk_size=400), 0)
    assert 1000.0 <= s.incident_energy.min() and s.incident_energy.max() <= 100_000.0
    assert s.incident_energy.std() > 20_000  # spread over the range, not a single value
    f = generate_chunk(SynthSpec("calogan", 10, seed=2, energy=20.0), 0)
    np.testing.assert_allclose(f.incident_energy, 20_000.0)


def test_impact_spread_only_cartesian_and_still_contained() -> None:
    s = generate_chunk(SynthSpec("calogan", 40, seed=4, impact_spread_mm=5.0), 0)
    resp = s.voxels.sum(1, dtype=np.float64) / s.incident_energy
    assert np.all((resp > 0.95) & (resp < 1.01))
    with pytest.raises(CalodistillError, match="Cartesian"):
        SynthSpec("calochallenge-2", 10, impact_spread_mm=1.0)


# --------------------------------------------------------------------------------------- spec parsing


def test_parse_synth_source() -> None:
    spec = parse_synth_source("synth:calochallenge-2?n=12&seed=3&particle=gamma&spectrum=ladder&chunk_size=5")
    assert spec == SynthSpec("calochallenge-2", 12, seed=3, particle="gamma", spectrum="ladder", chunk_size=5)
    assert parse_synth_source("synth:calogan?n=5&energy=50").energy == 50.0
    assert parse_synth_source("synth:calogan?n=5").seed == 0


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("calogan?n=5", "starts with 'synth:'"),
        ("synth:?n=5", "missing geometry"),
        ("synth:nosuch?n=5", "unknown geometry 'nosuch'"),
        ("synth:calogan?seed=1", "missing n"),
        ("synth:calogan?n=0", "n must be a positive integer"),
        ("synth:calogan?n=ten", "n='ten' is not a valid int"),
        ("synth:calogan?n=5&colour=red", "unknown parameter 'colour'"),
        ("synth:calogan?n=5&n=6", "given twice"),
        ("synth:calogan?n=5&particle=pi+", "unknown particle"),
        ("synth:calogan?n=5&spectrum=flat", "unknown spectrum 'flat'"),
        ("synth:calogan?n=5&energy=-3", "energy must be a positive"),
        ("synth:calogan?n=5&seed=-1", "seed must be a non-negative"),
    ],
)
def test_parse_synth_source_errors(source: str, message: str) -> None:
    with pytest.raises(CalodistillError, match=message.replace("+", r"\+")):
        parse_synth_source(source)


# ------------------------------------------------------------------------------------------------ CLI


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(argv)


def test_cli_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(CalodistillError, match="extension"):
        run_cli(_args(["-n", "5", "--out", str(tmp_path / "x.txt")]))
    with pytest.raises(CalodistillError, match="n must be a positive"):
        run_cli(_args(["-n", "0", "--out", str(tmp_path / "x.h5")]))
    with pytest.raises(CalodistillError, match="unknown geometry"):
        run_cli(_args(["--geometry", "atlas", "-n", "5", "--out", str(tmp_path / "x.h5")]))
    assert not any(tmp_path.iterdir())


def test_cli_writes_calogan_hdf5(tmp_path: Path) -> None:
    pytest.importorskip("calodistill.pipeline.data.formats")
    out = tmp_path / "showers.h5"
    assert run_cli(_args(["--geometry", "calogan", "-n", "30", "--seed", "1", "--out", str(out), "--chunk-size", "10"])) == 0
    expected = generate_showers(SynthSpec("calogan", 30, seed=1, chunk_size=10))
    with h5py.File(out, "r") as f:
        np.testing.assert_allclose(f["energy"][:, 0], expected.incident_energy / 1000.0)
        np.testing.assert_allclose(f["layer_1"][:].reshape(30, -1), expected.voxels[:, 288:432], rtol=1e-6)
