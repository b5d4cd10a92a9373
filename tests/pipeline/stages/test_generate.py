"""calodistill generate: energy specs, model resolution, output formats, sharding and error paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from calodistill.pipeline.data.store import resolve_model_dir
from calodistill.pipeline.errors import CalodistillError
from calodistill.pipeline.stages.generate import (
    LADDER_MEV,
    generate_showers_file,
    parse_energy,
    parse_energy_spec,
)


def make_model_dir(path: Path, kind: str = "student", seed: int = 0) -> Path:
    """An untrained but complete CaloGAN generator directory (tiny flows): enough to exercise the I/O."""
    import torch

    from calodistill.flows.config import FlowConfig, flow1_config
    from calodistill.flows.models import build_iaf_like, build_maf
    from calodistill.flows.preprocessing import CaloFlowPreprocessor
    from calodistill.flows.serialization import save_generator_dir

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sizes = [288, 144, 72]
    e_inc = rng.uniform(1e3, 1e5, size=64)
    vox = rng.exponential(1.0, size=(64, sum(sizes))).astype(np.float32) * (e_inc[:, None] / 504)
    pre = CaloFlowPreprocessor(sizes).fit(e_inc, vox)
    f1cfg = flow1_config(3, n_blocks=1, hidden_features=8, n_hidden_layers=1)
    f2cfg = FlowConfig(features=504, context_features=4, n_blocks=1, hidden_features=8, kind="affine")
    flow1, teacher = build_maf(f1cfg), build_maf(f2cfg)
    flow2 = build_iaf_like(teacher) if kind == "student" else teacher
    save_generator_dir(path, pre, flow1, f1cfg, flow2, flow2.config, kind=kind)
    return path


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "student")


@pytest.mark.parametrize(
    ("text", "mev"),
    [("50GeV", 5e4), ("50000", 5e4), ("256 MeV", 256.0), ("1.5TeV", 1.5e6), ("2e3", 2e3), ("4 tev", 4e6)],
)
def test_parse_energy_units(text: str, mev: float) -> None:
    assert parse_energy(text) == pytest.approx(mev)


@pytest.mark.parametrize(
    ("text", "message"),
    [("abc", "is not an energy"), ("50eV", "unknown unit 'eV'"), ("0GeV", "must be positive"),
     ("-5GeV", "is not an energy"), ("", "is not an energy")],
)
def test_parse_energy_errors(text: str, message: str) -> None:
    with pytest.raises(CalodistillError, match=message):
        parse_energy(text)


def test_energy_specs() -> None:
    fixed = parse_energy_spec("50GeV")
    assert fixed.kind == "fixed" and np.all(fixed.sample(5) == 5e4)
    lst = parse_energy_spec("1GeV,10GeV")
    e = lst.sample(10, seed=1)
    assert sorted(e.tolist()) == [1e3] * 5 + [1e4] * 5
    uni = parse_energy_spec("uniform:1GeV:100GeV")
    e = uni.sample(10_000, seed=3)
    assert e.min() >= 1e3 and e.max() <= 1e5 and abs(e.mean() - 50_500) < 1500
    assert np.array_equal(e, uni.sample(10_000, seed=3))
    logu = parse_energy_spec("loguniform:1GeV:1TeV")
    e = logu.sample(10_000, seed=0)
    assert e.min() >= 1e3 and e.max() <= 1e6
    assert abs(np.median(np.log10(e)) - 4.5) < 0.05  # log-uniform: median at the geometric centre
    ladder = parse_energy_spec("ladder")
    assert ladder.values == LADDER_MEV and LADDER_MEV[0] == 256.0 and LADDER_MEV[-1] == 256.0 * 2**14
    counts = np.unique(ladder.sample(150), return_counts=True)[1]
    assert counts.tolist() == [10] * 15


@pytest.mark.parametrize(
    ("spec", "message"),
    [("uniform:1GeV", "expected uniform:LOW:HIGH"), ("uniform:10GeV:1GeV", "LOW must be below HIGH"),
     ("gauss:1GeV:2GeV", "unknown range kind 'gauss'"), ("1GeV,x", "'x' is not an energy"), ("", "empty"),
     ("loguniform:0:1GeV", "must be positive")],
)
def test_energy_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(CalodistillError, match=message):
        parse_energy_spec(spec)


def test_generate_hdf5_and_parquet(student_dir: Path, tmp_path: Path) -> None:
    from calodistill.pipeline.data.formats import read_showers

    h5 = tmp_path / "out.h5"
    res = generate_showers_file(str(student_dir), 20, "uniform:1GeV:100GeV", h5, batch_size=8, device="cpu")
    assert res["n"] == 20 and res["geometry"] == "calogan" and res["model_kind"] == "student"
    assert res["sample_ms_per_shower"] > 0
    showers = read_showers(h5)
    assert len(showers) == 20 and showers.voxels.shape == (20, 504)
    assert showers.incident_energy == pytest.approx(parse_energy_spec("uniform:1GeV:100GeV").sample(20, seed=0),
                                                    rel=1e-6)
    assert np.isfinite(showers.voxels).all() and (showers.voxels >= 0).all()
    pq = tmp_path / "out.parquet"
    generate_showers_file(str(student_dir), 7, "50GeV", pq, device="cpu")
    again = read_showers(pq)
    assert len(again) == 7 and np.all(again.incident_energy == 5e4)


def test_generate_sharded_matches_partitions(student_dir: Path, tmp_path: Path) -> None:
    from calodistill.pipeline.data.formats import read_showers

    out = tmp_path / "big.h5"
    res = generate_showers_file(str(student_dir), 25, "ladder", out, batch_size=10, shard_size=10, device="cpu",
                                progress=False)
    assert res["n_shards"] == 3
    showers = read_showers(out)
    assert len(showers) == 25
    assert not (tmp_path / ".big.h5.parts").exists()  # partitions removed after the final file is written
    # partitions kept in an explicit parts_dir are reused by the same call
    parts = tmp_path / "parts"
    generate_showers_file(str(student_dir), 25, "ladder", out, shard_size=10, device="cpu", parts_dir=parts,
                          overwrite=True)
    first = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.h5")}
    assert len(first) == 3
    (parts / "part-00001.h5").unlink()
    generate_showers_file(str(student_dir), 25, "ladder", out, shard_size=10, device="cpu", parts_dir=parts,
                          overwrite=True)
    second = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.h5")}
    assert second["part-00000.h5"] == first["part-00000.h5"] and second["part-00002.h5"] == first["part-00002.h5"]
    assert np.array_equal(read_showers(out).voxels, showers.voxels)


def test_errors_leave_nothing_written(student_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x" / "out.h5"
    with pytest.raises(CalodistillError, match=r"--model .*nowhere: no such model directory"):
        generate_showers_file(str(tmp_path / "nowhere"), 5, "50GeV", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalodistillError, match="not a model directory"):
        generate_showers_file(str(empty), 5, "50GeV", out)
    with pytest.raises(CalodistillError, match="unknown unit"):
        generate_showers_file(str(student_dir), 5, "50 furlongs", out)
    with pytest.raises(CalodistillError, match="-n: expected a positive number"):
        generate_showers_file(str(student_dir), 0, "50GeV", out)
    with pytest.raises(CalodistillError, match=r"unknown output type '\.txt'"):
        generate_showers_file(str(student_dir), 5, "50GeV", tmp_path / "out.txt")
    assert not out.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(student_dir: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(CalodistillError, match="is not writable"):
            generate_showers_file(str(student_dir), 5, "50GeV", locked / "out.h5")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_resolve_model_dir_accepts_logged_pyfunc_layout(student_dir: Path, tmp_path: Path) -> None:
    import shutil

    logged = tmp_path / "logged"
    shutil.copytree(student_dir, logged / "artifacts" / "model_dir")
    assert resolve_model_dir(str(logged)) == logged / "artifacts" / "model_dir"


def test_cli(student_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from calodistill.pipeline.cli import main

    out = tmp_path / "cli.h5"
    rc = main(["generate", "--model", str(student_dir), "-n", "6", "--energies", "1GeV,10GeV", "--out", str(out),
               "--device", "cpu"])
    assert rc == 0 and out.exists()
    assert "ms per shower" in capsys.readouterr().out
    rc = main(["generate", "--model", str(student_dir), "-n", "6", "--energies", "ladder:1", "--out", str(out)])
    assert rc == 2
    assert capsys.readouterr().err.startswith("calodistill: error: --energies")


def test_existing_output_is_refused_without_overwrite(student_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from calodistill.pipeline.cli import main

    precious = tmp_path / "geant4.h5"
    precious.write_bytes(b"a real Geant4 file")
    with pytest.raises(CalodistillError, match="file already exists; pass --overwrite"):
        generate_showers_file(str(student_dir), 5, "50GeV", precious, device="cpu")
    rc = main(["generate", "--model", str(student_dir), "-n", "5", "--energies", "50GeV", "--out", str(precious),
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "file already exists; pass --overwrite" in err
    assert precious.read_bytes() == b"a real Geant4 file"
    rc = main(["generate", "--model", str(student_dir), "-n", "5", "--energies", "50GeV", "--out", str(precious),
               "--device", "cpu", "--overwrite"])
    assert rc == 0 and precious.read_bytes() != b"a real Geant4 file"


def test_energies_outside_the_training_range_are_refused_unless_allowed(
        student_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging
    import shutil

    from calodistill.pipeline.stages.generate import check_energy_range

    model = tmp_path / "model"
    shutil.copytree(student_dir, model)
    (model / "provenance.json").write_text(json.dumps({"stage": "distill", "incident_energy_range": [1.6e3, 99.6e3]}))
    out = tmp_path / "out.h5"
    for spec, shown in (("1e9GeV", "1e+06 TeV"), ("1MeV", "1 MeV"), ("uniform:1GeV:1TeV", "1 GeV to 1 TeV")):
        with pytest.raises(CalodistillError) as exc:
            generate_showers_file(str(model), 5, spec, out, device="cpu")
        assert (f"--energies {spec}: {shown} is outside the model's training range 1.6 GeV to 99.6 GeV"
                in str(exc.value)) and "--allow-extrapolation" in str(exc.value)
    assert not out.exists()
    # the recorded edges are sample extremes: the nominal 1-100 GeV passes
    generate_showers_file(str(model), 5, "uniform:1GeV:100GeV", out, device="cpu")
    with caplog.at_level(logging.WARNING, logger="calodistill.pipeline.stages.generate"):
        generate_showers_file(str(model), 5, "1TeV", out, device="cpu", overwrite=True, allow_extrapolation=True)
    assert "extrapolating" in caplog.text
    check_energy_range(parse_energy_spec("1e9GeV"), "1e9GeV", None)  # a model without a record: not checked


def test_resumed_shards_of_another_set_up_start_over_and_timing_counts_what_was_sampled(
        student_dir: Path, tmp_path: Path) -> None:
    import json

    from calodistill.pipeline.data.formats import read_showers

    out, parts = tmp_path / "big.h5", tmp_path / "parts"
    kwargs = {"shard_size": 10, "device": "cpu", "parts_dir": parts, "overwrite": True, "progress": False}
    first = generate_showers_file(str(student_dir), 25, "ladder", out, batch_size=5, **kwargs)
    assert first["n_sampled"] == 25 and first["sample_ms_per_shower"] > 0
    manifest = json.loads((parts / "manifest.json").read_text())
    assert manifest["batch_size"] == 5 and manifest["device"] == "cpu" and manifest["seed"] == 0
    assert len(manifest["model_hash"]) == 16
    reference = read_showers(out).voxels
    # an interrupted run (one shard missing) resumed with the same set-up samples and times that shard only
    (parts / "part-00001.h5").unlink()
    again = generate_showers_file(str(student_dir), 25, "ladder", out, batch_size=5, **kwargs)
    assert again["n_sampled"] == 10
    assert np.array_equal(read_showers(out).voxels, reference)
    # another batch size: the kept shards are not mixed in, every shard is sampled again
    (parts / "part-00001.h5").unlink()
    other = generate_showers_file(str(student_dir), 25, "ladder", out, batch_size=7, **kwargs)
    assert other["n_sampled"] == 25
    assert json.loads((parts / "manifest.json").read_text())["batch_size"] == 7
    generate_showers_file(str(student_dir), 25, "ladder", tmp_path / "fresh.h5", batch_size=7,
                          shard_size=10, device="cpu", progress=False)
    assert np.array_equal(read_showers(out).voxels, read_showers(tmp_path / "fresh.h5").voxels)
    # every shard reused: nothing was timed, and the result says so
    every = generate_showers_file(str(student_dir), 25, "ladder", out, batch_size=7, **kwargs)
    assert every["n_sampled"] == 0 and np.isnan(every["sample_ms_per_shower"])


def test_output_under_a_regular_file_is_one_line(student_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CalodistillError, match=r"--out .*file/sub/out.h5: .*file is a file, not a directory"):
        generate_showers_file(str(student_dir), 5, "50GeV", blocker / "sub" / "out.h5", device="cpu")
    with pytest.raises(CalodistillError, match="is a directory, not a file"):
        generate_showers_file(str(student_dir), 5, "50GeV", tmp_path, device="cpu")


def test_unreachable_scheduler_is_the_only_message(student_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """No "N shards" INFO line before the error: the connection is made before anything is announced."""
    import logging

    import distributed

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("Timed out trying to connect to tcp://127.0.0.1:9 after 30 s")

    monkeypatch.setattr(distributed, "Client", refuse)
    caplog.set_level(logging.INFO, logger="calodistill")
    out = tmp_path / "x.h5"
    with pytest.raises(CalodistillError, match=r"--scheduler tcp://127.0.0.1:9: cannot connect"):
        generate_showers_file(str(student_dir), 3, "50GeV", out, device="cpu", shard_size=2,
                              scheduler="tcp://127.0.0.1:9")
    assert not [r for r in caplog.records if r.name.startswith("calodistill") and r.levelno >= logging.INFO]
    assert sorted(os.listdir(tmp_path)) == []
