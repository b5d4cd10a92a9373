"""The distribution: a wheel that installs ``calodistill`` and nothing else, and works without the repository.

The wheel is built from this checkout and installed into a fresh virtual environment (no editable
install, the repository not on ``sys.path``); the dependencies come from the test's own environment
through a ``.pth`` line, so nothing is downloaded.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MAKE_MODEL = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from calodistill.flows.config import FlowConfig, flow1_config
    from calodistill.flows.models import build_iaf_like, build_maf
    from calodistill.flows.preprocessing import CaloFlowPreprocessor
    from calodistill.flows.serialization import save_generator_dir

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    sizes = [288, 144, 72]
    e_inc = rng.uniform(1e3, 1e5, size=64)
    vox = rng.exponential(1.0, size=(64, sum(sizes))).astype(np.float32) * (e_inc[:, None] / 504)
    pre = CaloFlowPreprocessor(sizes).fit(e_inc, vox)
    f1cfg = flow1_config(3, n_blocks=1, hidden_features=8, n_hidden_layers=1)
    teacher = build_maf(FlowConfig(features=504, context_features=4, n_blocks=1, hidden_features=8, kind="affine"))
    student = build_iaf_like(teacher)
    save_generator_dir(sys.argv[1], pre, build_maf(f1cfg), f1cfg, student, student.config, kind="student")
""")


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
         cwd=out, env=dict(os.environ))
    (found,) = out.glob("calodistill-*.whl")
    return found


def test_wheel_holds_only_the_calodistill_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"calodistill", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    assert "calodistill/flows/csrc/rqs_inverse.cpp" in names
    assert "calodistill/pipeline/data/binning/binning_dataset_1_photons.xml" in names
    assert not any(n.endswith(".pyc") for n in names)


def test_installed_wheel_runs_help_synth_and_generate(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=dict(os.environ))
    py = venv / "bin" / "python"
    purelib = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                           text=True).strip())
    # Dependencies from this environment (a path line, so its editable-install hooks are not run there).
    (purelib / "_calodistill_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         cwd=tmp_path, env=env)
    new_names = sorted(p.name for p in purelib.iterdir() if not p.name.startswith(("_calodistill_test_deps", "__pycache__")))
    assert [n for n in new_names if not n.endswith(".dist-info")] == ["calodistill"], new_names
    where = _run([str(py), "-c", "import calodistill, calodistill.flows, calodistill.pipeline; print(calodistill.__file__)"],
                 cwd=tmp_path, env=env).stdout.strip()
    assert where.startswith(str(purelib)), where

    cli = str(venv / "bin" / "calodistill")
    assert "train-teacher" in _run([cli, "--help"], cwd=tmp_path, env=env).stdout
    _run([cli, "synth", "--geometry", "calogan", "-n", "20", "--seed", "1", "--out", "synth.h5"], cwd=tmp_path, env=env)
    assert (tmp_path / "synth.h5").stat().st_size > 0
    (tmp_path / "make_model.py").write_text(MAKE_MODEL)
    _run([str(py), "make_model.py", "student"], cwd=tmp_path, env=env)
    _run([cli, "generate", "--model", "student", "-n", "10", "--energies", "uniform:1GeV:10GeV", "--out", "gen.h5"],
         cwd=tmp_path, env=env)
    assert (tmp_path / "gen.h5").stat().st_size > 0
