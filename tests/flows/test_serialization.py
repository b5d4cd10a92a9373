"""Flow files and generator directories: weights-only loading, atomic writes, ShowerGenerator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from calodistill.flows.config import flow1_config, teacher_config
from calodistill.flows.errors import FlowsError
from calodistill.flows.models import (
    IAF,
    MAF,
    build_iaf_like,
    build_maf,
)
from calodistill.flows.preprocessing import CaloFlowPreprocessor
from calodistill.flows.sampling import ShowerGenerator
from calodistill.flows.serialization import (
    FLOW1_FILE,
    PREPROCESSING_FILE,
    STUDENT_FILE,
    TEACHER_FILE,
    load_flow,
    load_generator,
    save_flow,
    save_generator_dir,
)

SIZES = [3, 4, 2]


def _showers(n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    e_inc = rng.uniform(1e3, 1e5, n)
    vox = rng.exponential(1.0, (n, sum(SIZES))) * e_inc[:, None] / 20
    return e_inc, vox


@pytest.fixture
def generator_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    e_inc, vox = _showers()
    pre = CaloFlowPreprocessor(SIZES).fit(e_inc, vox)
    flow1 = build_maf(flow1_config(3, n_blocks=2, hidden_features=8))
    teacher = build_maf(teacher_config(9, 3, n_blocks=2, hidden_features=12))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*flow1.parameters(), *teacher.parameters()]:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    student = build_iaf_like(teacher, hidden_features=10)
    save_generator_dir(tmp_path, pre, flow1, flow1.config, teacher, teacher.config, kind="teacher")
    save_generator_dir(tmp_path, pre, flow1, None, student, None, kind="student")
    return tmp_path


def test_directory_layout_and_preference(generator_dir: Path) -> None:
    for name in (PREPROCESSING_FILE, FLOW1_FILE, TEACHER_FILE, STUDENT_FILE):
        assert (generator_dir / name).is_file()
    assert not list(generator_dir.glob(".*tmp*"))
    assert load_generator(generator_dir, device="cpu").kind == "student"
    assert load_generator(generator_dir, prefer="teacher", device="cpu").kind == "teacher"
    (generator_dir / STUDENT_FILE).unlink()
    assert load_generator(generator_dir, device="cpu").kind == "teacher"


def test_generator_samples_in_mev(generator_dir: Path) -> None:
    gen = load_generator(generator_dir, device="cpu")
    assert isinstance(gen.flow2, IAF) and isinstance(gen.flow1, MAF)
    e_inc = np.array([2e3, 1e4, 5e4, 8e4, 3e3])
    vox, layers = gen.sample_with_layers(e_inc, batch_size=2, seed=3)
    assert vox.shape == (5, 9) and vox.dtype == np.float32 and layers.shape == (5, 3)
    assert np.isfinite(vox).all() and (vox >= 0).all()
    sums = np.stack([vox[:, :3].sum(1), vox[:, 3:7].sum(1), vox[:, 7:].sum(1)], axis=1)
    kept = sums > 0
    np.testing.assert_allclose(sums[kept], layers[kept], rtol=1e-4)
    np.testing.assert_array_equal(gen.sample(e_inc, batch_size=2, seed=3), vox)  # seeded
    assert not np.allclose(gen.sample(e_inc, seed=4), vox)


def test_student_generator_fast_path_equals_slow_path(generator_dir: Path) -> None:
    """The generator samples the student through FastIAFSampler: same noise, same showers as IAF.sample."""
    gen = load_generator(generator_dir, device="cpu")
    e_inc = np.array([2e3, 1e4, 5e4, 8e4, 3e3, 7e4])
    fast = gen.sample(e_inc, batch_size=4, seed=11)
    gen._sample_flow2 = lambda c, g: gen.flow2.sample(context=c, generator=g)  # the plain nflows-style path
    slow = gen.sample(e_inc, batch_size=4, seed=11)
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-4)


def test_generator_log_prob(generator_dir: Path) -> None:
    e_inc, vox = _showers(6)
    teacher = load_generator(generator_dir, prefer="teacher", device="cpu")
    student = load_generator(generator_dir, prefer="student", device="cpu")
    lt = teacher.log_prob(e_inc, vox, batch_size=4)
    ls = student.log_prob(e_inc, vox, batch_size=4)
    assert set(lt) == {"flow1", "flow2", "total"} and lt["total"].shape == (6,)
    assert np.isfinite(lt["total"]).all() and np.isfinite(ls["total"]).all()
    np.testing.assert_array_equal(lt["flow1"], ls["flow1"])
    np.testing.assert_allclose(lt["total"], lt["flow1"] + lt["flow2"])


def test_load_flow_is_weights_only_and_rejects_bad_files(tmp_path: Path) -> None:
    flow = build_maf(flow1_config(3, n_blocks=2, hidden_features=8))
    path = tmp_path / "f.pt"
    save_flow(path, flow)
    payload = torch.load(path, weights_only=True)
    assert payload["model"] == "MAF" and payload["config"]["features"] == 3
    loaded = load_flow(path)
    assert not loaded.training
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(FlowsError, match="junk.pt: cannot read flow file"):
        load_flow(tmp_path / "junk.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(FlowsError, match="not a calodistill flow file"):
        load_flow(tmp_path / "other.pt")
    payload["config"]["hidden_features"] = 9
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(FlowsError, match="weights do not match"):
        load_flow(tmp_path / "mismatch.pt")
    with pytest.raises(FlowsError, match="no such flow file"):
        load_flow(tmp_path / "missing.pt")


def test_generator_checks(generator_dir: Path, tmp_path: Path) -> None:
    gen = load_generator(generator_dir, device="cpu")
    with pytest.raises(FlowsError, match="layer_sizes"):
        ShowerGenerator(gen.preprocessor, gen.flow1, gen.flow2, layer_sizes=[9])
    with pytest.raises(FlowsError, match="flow2"):
        ShowerGenerator(gen.preprocessor, gen.flow1, gen.flow1)
    with pytest.raises(FlowsError, match="incident_energy"):
        gen.sample(np.array([-1.0]))
    with pytest.raises(FlowsError, match="a student must be an IAF"):
        save_generator_dir(tmp_path / "x", gen.preprocessor, gen.flow1, None, gen.flow1, None, kind="student")
    with pytest.raises(FlowsError, match="no such model directory"):
        load_generator(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlowsError, match="no student.pt or teacher.pt"):
        load_generator(tmp_path / "empty")
