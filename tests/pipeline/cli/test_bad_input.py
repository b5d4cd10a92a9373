"""Bad input through the command line: every writer refuses an existing output, file-system refusals end
in one line, a failed command leaves nothing behind, ingest refuses duplicate sources and cleans up after
a killed run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from calodistill.pipeline.cli import main
from tests.pipeline.stages.test_generate import make_model_dir


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from calodistill.pipeline.data.formats import write_showers
    from calodistill.pipeline.data.ingest import ingest_showers
    from calodistill.pipeline.data.synth import SynthSpec, generate_showers

    root = tmp_path_factory.mktemp("bad_input")
    showers = write_showers(generate_showers(SynthSpec("calogan", 40, seed=1), progress=False), root / "showers.h5")
    dataset = root / "dataset"
    ingest_showers([str(showers)], dataset, scheduler="synchronous", progress=False)
    return {"showers": showers, "dataset": dataset, "model": make_model_dir(root / "model"),
            "teacher": make_model_dir(root / "teacher", kind="teacher")}


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody may write into (root too: the immutable attribute where it can be set)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(locked)],
                                                            capture_output=True).returncode != 0:
            pytest.skip("running as root where the immutable attribute cannot be set")
        yield locked
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    else:
        locked.chmod(0o500)
        yield locked
        locked.chmod(0o700)


def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("calodistill: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _commands(fx: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """Each writing command with valid inputs and the output ``out`` (a file or directory name)."""
    return {
        "generate": ["generate", "--model", str(fx["model"]), "-n", "3", "--energies", "50GeV", "--out",
                     str(out.with_suffix(".h5")), "--device", "cpu"],
        "synth": ["synth", "-n", "3", "--out", str(out.with_suffix(".h5"))],
        "ingest": ["ingest", str(fx["showers"]), "--out", str(out), "--scheduler", "synchronous", "--no-progress"],
        "evaluate": ["evaluate", "--reference", str(fx["dataset"]), "--generated", str(fx["showers"]),
                     "--out", str(out), "--no-classifier", "--no-plots", "--timing-batches"],
        "bench": ["bench", "--quick", "--geometry", "calogan", "--sections", "floor", "--batches", "1",
                  "--out", str(out.with_suffix(".json"))],
        "train-teacher": ["train-teacher", "--data", str(fx["dataset"]), "--out", str(out), "--device", "cpu"],
        "distill": ["distill", "--teacher", str(fx["teacher"]), "--data", str(fx["dataset"]), "--out", str(out),
                    "--device", "cpu"],
    }


@pytest.mark.parametrize("command", ["generate", "synth", "bench"])
def test_every_file_writer_refuses_an_existing_output(fixtures: dict[str, Path], tmp_path: Path, command: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv = _commands(fixtures, tmp_path / "precious")[command]
    target = Path(argv[argv.index("--out") + 1])
    target.write_bytes(b"somebody's data")
    err = _one_line_error(capsys, main(argv))
    assert "already exists; pass --overwrite" in err
    assert target.read_bytes() == b"somebody's data"


def test_evaluate_refuses_an_existing_output_and_replaces_only_its_own(fixtures: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    argv = _commands(fixtures, out)["evaluate"]
    assert "pass --overwrite" in _one_line_error(capsys, main(argv))
    assert "is not an evaluation directory" in _one_line_error(capsys, main([*argv, "--overwrite"]))
    assert (out / "thesis.tex").read_text() == "years of work"
    (out / "thesis.tex").unlink()
    assert main(argv) == 0  # an empty directory is fine
    first = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main([*argv, "--overwrite", "--seed", "1"]) == 0  # its own output is replaced, whole
    assert json.loads((out / "metrics.json").read_text()) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


@pytest.mark.parametrize("command", ["generate", "synth", "ingest", "evaluate", "bench", "train-teacher", "distill"])
def test_unwritable_output_directory_is_one_line(fixtures: dict[str, Path], unwritable_dir: Path, command: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_error(capsys, main(_commands(fixtures, unwritable_dir / "out")[command]))
    assert str(unwritable_dir) in err
    assert list(unwritable_dir.iterdir()) == []


@pytest.mark.parametrize("command", ["generate", "synth", "ingest", "evaluate", "bench", "train-teacher", "distill"])
def test_output_under_a_regular_file_is_one_line(fixtures: dict[str, Path], tmp_path: Path, command: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "plain.txt"
    blocker.write_text("x")
    err = _one_line_error(capsys, main(_commands(fixtures, blocker / "sub" / "out")[command]))
    assert str(blocker) in err
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt"]


def test_os_error_message_names_the_files() -> None:
    from calodistill.pipeline.cli.main import os_error_message

    assert os_error_message(PermissionError(13, "Permission denied", "/data/out")) == "/data/out: Permission denied"
    assert os_error_message(OSError(18, "Invalid cross-device link", "/a", None, "/b")) == "/a -> /b: Invalid cross-device link"
    assert os_error_message(OSError("h5py: unable to open\n  file")) == "h5py: unable to open file"


def test_failed_evaluate_leaves_no_output_directory(fixtures: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new" / "deeper" / "eval"
    argv = _commands(fixtures, out)["evaluate"]
    argv[argv.index("--generated") + 1] = str(tmp_path / "missing.h5")
    assert "missing.h5: generated file does not exist" in _one_line_error(capsys, main(argv))
    assert list(tmp_path.iterdir()) == []


def test_ingest_refuses_duplicate_sources(fixtures: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    src = fixtures["showers"]
    copy = shutil.copy(src, tmp_path / "copy.h5")
    base = ["ingest", "--out", str(tmp_path / "ds"), "--scheduler", "synchronous", "--no-progress"]
    err = _one_line_error(capsys, main([*base, str(src), str(src)]))
    assert f"source {src} is given twice" in err
    err = _one_line_error(capsys, main([*base, str(src), str(copy)]))
    assert f"sources {src} and {copy} have the same content" in err
    assert "synth:calogan?n=5" in _one_line_error(capsys, main([*base, "synth:calogan?n=5", "synth:calogan?n=5"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.h5"]
    assert main([*base, str(src), "synth:calogan?n=5"]) == 0  # different sources are fine


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_ingest_removes_what_a_killed_ingest_left(fixtures: dict[str, Path], tmp_path: Path) -> None:
    from calodistill.pipeline.atomic import _owner

    host, pid = _owner().rsplit("-", 1)
    dead = _dead_pid()
    stale = tmp_path / f".ds.ingest-{host}-{dead}-0123abcd"
    stale.mkdir()
    (stale / "part-00000.parquet").write_bytes(b"\0" * 1000)
    moved_aside = tmp_path / f".ds.old-{host}-{dead}-4567cdef"
    moved_aside.mkdir()
    alive = tmp_path / f".ds.ingest-{host}-{pid}-89ab0123"  # a writer still at work keeps its directory
    alive.mkdir()
    remote = tmp_path / f".ds.ingest-otherhost-{dead}-cdef4567"  # another machine's: cannot tell, kept
    remote.mkdir()
    stale_file = tmp_path / f".out.h5.{host}-{dead}-abcdefgh.tmp"  # a killed atomic file write
    stale_file.write_bytes(b"half")
    assert main(["ingest", str(fixtures["showers"]), "--out", str(tmp_path / "ds"), "--scheduler", "synchronous",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ds", alive.name, remote.name, stale_file.name])
    assert main(["synth", "-n", "3", "--out", str(tmp_path / "out.h5")]) == 0
    assert not stale_file.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["generate", "-n", "abc"], "calodistill: error: generate: argument -n: invalid int value: 'abc'"),
     (["nosuch"], "calodistill: error: argument COMMAND: invalid choice: 'nosuch'"),
     (["generate"], "calodistill: error: generate: the following arguments are required: --model, -n, --out")],
)
def test_argument_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert "--help`)" in err
