"""ONNX export (flows/export.py, flows/graphs.py): onnxruntime equals the torch sampler on the same noise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from calodistill.flows.config import FlowConfig, flow1_config
from calodistill.flows.errors import FlowsError
from calodistill.flows.graphs import (
    _MAFGraph,
    _StudentGraph,
    rqs_spline,
    spline_bin_index,
)
from calodistill.flows.models import build_iaf_like, build_maf
from calodistill.flows.preprocessing import CaloFlowPreprocessor
from calodistill.flows.sampling import ShowerGenerator
from calodistill.flows.transforms import rq_spline_linear_tails

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from calodistill.flows.export import (
    OnnxSampler,
    draw_noise,
    export_sampler,
    export_teacher_log_prob,
    sample_from_noise,
)

SIZES = [3, 5, 4]
D, L = sum(SIZES), len(SIZES)
THRESHOLD = 50.0  # MeV: high enough that the tiny random model leaves some voxels empty


def _perturb(flow: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def make_generators() -> tuple[ShowerGenerator, ShowerGenerator]:
    """A tiny CaloFlow generator (random, perturbed weights): its student and its teacher."""
    rng = np.random.default_rng(0)
    e_inc = rng.uniform(1e3, 1e5, 64)
    vox = rng.exponential(1.0, (64, D)) * e_inc[:, None] / D
    pre = CaloFlowPreprocessor(SIZES, voxel_threshold=THRESHOLD).fit(e_inc, vox)
    torch.manual_seed(0)
    flow1 = build_maf(flow1_config(L, n_blocks=1, hidden_features=8))  # export time grows with the splines
    teacher = build_maf(FlowConfig(features=D, context_features=1 + L, n_blocks=2, hidden_features=16,
                                   num_bins=4, tail_bound=3.0, permutation="random"))
    student = build_iaf_like(teacher, hidden_features=20)
    for k, flow in enumerate((flow1, teacher, student)):
        _perturb(flow, k)
    return (ShowerGenerator(pre, flow1, student, device="cpu"),
            ShowerGenerator(pre, flow1, teacher, device="cpu"))


@pytest.fixture(scope="module")
def generators() -> tuple[ShowerGenerator, ShowerGenerator]:
    return make_generators()


@pytest.fixture(scope="module")
def sampler_file(generators: tuple[ShowerGenerator, ShowerGenerator], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "student.onnx"
    return export_sampler(generators[0], path, metadata={"geometry": "tiny", "particle": "e+"}, groups=3)


def _inputs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    e = (10 ** rng.uniform(2, 5, n)).astype(np.float32)  # 100 MeV to 100 GeV
    z = rng.standard_normal((n, L + D)).astype(np.float32)
    z[0, L] = 5.0  # beyond the spline's tail bound: the identity tail
    return e, z


def assert_same_showers(got: np.ndarray, want: np.ndarray, threshold: float = THRESHOLD) -> None:
    """Identical zeros; voxels above the threshold equal within 1e-4 relative."""
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got == 0, want == 0)
    above = want >= threshold
    np.testing.assert_allclose(got[above], want[above], rtol=1e-4)


# -- the exportable spline ---------------------------------------------------------------------------

def _spline_params(n: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, k, generator=gen, dtype=torch.float64),
            torch.randn(n, d, k, generator=gen, dtype=torch.float64),
            torch.randn(n, d, k - 1, generator=gen, dtype=torch.float64))


def test_bin_search_equals_searchsorted_on_knots_and_beyond_the_tails() -> None:
    gen = torch.Generator().manual_seed(1)
    n, d, k, bound = 6, 5, 7, 2.0
    sizes = torch.softmax(torch.randn(n, d, k, generator=gen, dtype=torch.float64), dim=-1)
    knots = torch.cat([torch.zeros(n, d, 1, dtype=torch.float64), torch.cumsum(sizes, dim=-1)], dim=-1)
    knots = 2 * bound * knots - bound
    knots[..., -1] = bound
    values = [torch.rand(n, d, generator=gen, dtype=torch.float64) * 6 - 3]    # inside and outside ±B
    values += [knots[..., j] for j in range(k + 1)]                              # exactly on every knot
    values += [torch.full((n, d), v, dtype=torch.float64) for v in (-bound, bound, -9.0, 9.0)]
    for x in values:
        xc = x.clamp(-bound, bound)  # the spline clamps before it searches
        want = (torch.searchsorted(knots, xc[..., None], right=True) - 1).clamp(0, k - 1)
        assert torch.equal(spline_bin_index(knots, xc), want)


@pytest.mark.parametrize("min_bin_height", [1e-3, 2e-2])  # equal to the width's, or not
@pytest.mark.parametrize("inverse", [True, False])
def test_exportable_spline_equals_the_models_spline(inverse: bool, min_bin_height: float) -> None:
    uw, uh, ud = _spline_params(50, 4, 6)
    x = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2
    x[0, 0], x[1, 1], x[2, 2] = 3.0, -3.0, 2.5  # outside, outside, on the bound
    kw = {"tail_bound": 2.5, "min_bin_width": 1e-3, "min_bin_height": min_bin_height, "min_derivative": 1e-3}
    want, want_lad = rq_spline_linear_tails(x, uw, uh, ud, inverse=inverse, **kw)
    got, got_lad = rqs_spline(x, uw, uh, ud, inverse, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_lad, want_lad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["spline", "affine"])
@pytest.mark.parametrize(("n_hidden_layers", "groups"), [(1, 1), (1, 4), (2, 4)])
def test_graph_flows_equal_the_models(kind: str, n_hidden_layers: int, groups: int) -> None:
    """The export graphs' MAF (both directions) and student pass compute what the models compute."""
    cfg = FlowConfig(features=7, context_features=3, n_blocks=3, hidden_features=10,
                     n_hidden_layers=n_hidden_layers, kind=kind, num_bins=4, tail_bound=2.0,
                     permutation="random", permutation_seed=1)
    teacher = build_maf(cfg).eval()
    student = build_iaf_like(teacher, hidden_features=12).eval()
    _perturb(teacher, 1, 0.3)
    _perturb(student, 2, 0.3)
    gen = torch.Generator().manual_seed(0)
    z, c = 1.5 * torch.randn(20, 7, generator=gen), torch.randn(20, 3, generator=gen)
    z[0, 0] = 3.0  # the identity tail
    with torch.no_grad():
        maf = _MAFGraph(teacher)
        x, _ = teacher.inverse(z, c)
        torch.testing.assert_close(maf.inverse(z, c), x, rtol=1e-4, atol=1e-5)
        x = 1.5 * torch.randn(20, 7, generator=gen)  # the inverse's x can be huge: cancellation in forward
        zt, lad = teacher(x, c)
        zg, ladg = maf(x, c)
        torch.testing.assert_close(zg, zt, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ladg, lad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_StudentGraph(student, groups)(z, c), student.inverse(z, c)[0],
                                   rtol=1e-4, atol=1e-5)


# -- the torch path on explicit noise ----------------------------------------------------------------

def test_draw_noise_reproduces_generator_sample(generators: tuple[ShowerGenerator, ShowerGenerator]) -> None:
    student = generators[0]
    e, _ = _inputs(11, 0)
    want = student.sample(e, batch_size=4, seed=5)
    noise = draw_noise(student, 11, batch_size=4, seed=5)
    assert noise.shape == (11, L + D) and noise.dtype == np.float32
    np.testing.assert_array_equal(sample_from_noise(student, e, noise, batch_size=4), want)


# -- the exported sampler ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7])
def test_onnxruntime_equals_torch_on_the_same_noise(generators: tuple[ShowerGenerator, ShowerGenerator],
                                                    sampler_file: Path, n: int) -> None:
    e, z = _inputs(n, n)
    want = sample_from_noise(generators[0], e, z)
    got = OnnxSampler(sampler_file, providers=["CPUExecutionProvider"], threads=1).sample(e, z)
    assert got.shape == (n, D)
    assert_same_showers(got, want)


def test_parity_covers_empty_and_full_voxels(generators: tuple[ShowerGenerator, ShowerGenerator],
                                            sampler_file: Path) -> None:
    """On 200 showers (in chunks of 64 rows) the comparison sees both zeros and voxels above the threshold."""
    e, z = _inputs(200, 3)
    want = sample_from_noise(generators[0], e, z)
    assert 0.05 < (want == 0).mean() < 0.95
    assert_same_showers(OnnxSampler(sampler_file, threads=1, chunk_size=64).sample(e, z), want)


def test_graph_contract_and_metadata(sampler_file: Path) -> None:
    import onnx

    model = onnx.load(str(sampler_file))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert "searchsorted" not in {n.op_type.lower() for n in model.graph.node}
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert list(inputs) == ["incident_energy", "noise"]
    assert all(t.elem_type == onnx.TensorProto.FLOAT for t in inputs.values())
    assert [d.dim_value for d in inputs["noise"].shape.dim][1] == L + D
    assert inputs["noise"].shape.dim[0].dim_param  # dynamic batch
    assert [o.name for o in model.graph.output] == ["showers"]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["geometry"] == "tiny" and props["particle"] == "e+"
    assert props["n_layers"] == str(L) and props["n_voxels"] == str(D)
    assert json.loads(props["layer_sizes"]) == SIZES
    for key in ("voxel_order", "calodistill_version", "torch_version", "inputs", "outputs"):
        assert props[key]
    sampler = OnnxSampler(sampler_file)
    assert sampler.metadata["geometry"] == "tiny" and sampler.n_voxels == D
    assert "CPUExecutionProvider" in sampler.providers


def test_written_with_the_umask_mode(sampler_file: Path) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    assert sampler_file.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in sampler_file.parent.iterdir()] == [sampler_file.name]


def test_onnx_sampler_rejects_bad_inputs(sampler_file: Path, tmp_path: Path) -> None:
    sampler = OnnxSampler(sampler_file)
    e, z = _inputs(3, 0)
    with pytest.raises(FlowsError, match=r"noise: expected shape \(3, 15\)"):
        sampler.sample(e, z[:, 1:])
    with pytest.raises(FlowsError, match="incident_energy: must be finite and positive"):
        sampler.sample(-e, z)
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(FlowsError, match="cannot load the ONNX model"):
        OnnxSampler(bad)


# -- the teacher's log-prob ------------------------------------------------------------------------------

def test_teacher_log_prob_parity(generators: tuple[ShowerGenerator, ShowerGenerator], tmp_path: Path) -> None:
    teacher = generators[1]
    path = export_teacher_log_prob(teacher, tmp_path / "teacher_log_prob.onnx")
    e, z = _inputs(7, 4)
    showers = sample_from_noise(generators[0], e, z) + 0.5  # no empty layer
    want = teacher.log_prob(e, showers, add_noise=False)["total"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["log_prob"], {"showers": showers, "incident_energy": e[:, None]})[0]
    assert got.shape == (7,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-3)
    one = session.run(["log_prob"], {"showers": showers[:1], "incident_energy": e[:1, None]})[0]
    np.testing.assert_allclose(one, want[:1], rtol=1e-5, atol=2e-3)


# -- refusals ----------------------------------------------------------------------------------------------

def test_exporting_a_teacher_for_sampling_fails(generators: tuple[ShowerGenerator, ShowerGenerator],
                                                tmp_path: Path) -> None:
    with pytest.raises(FlowsError, match=r"^teacher: .*export the student$"):
        export_sampler(generators[1], tmp_path / "teacher.onnx")
    with pytest.raises(FlowsError, match=r"^student: .*export the teacher's$"):
        export_teacher_log_prob(generators[0], tmp_path / "student_lp.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_fails_before_exporting(generators: tuple[ShowerGenerator, ShowerGenerator],
                                                  tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(FlowsError, match="cannot create the folder"):
        export_sampler(generators[0], blocker / "student.onnx")
    with pytest.raises(FlowsError, match="is a directory"):
        export_sampler(generators[0], tmp_path)
    with pytest.raises(FlowsError, match="opset: must be an integer >= 18"):
        export_sampler(generators[0], tmp_path / "s.onnx", opset=17)
    with pytest.raises(FlowsError, match="metadata: keys and values must be strings"):
        export_sampler(generators[0], tmp_path / "s.onnx", metadata={"n": 3})  # type: ignore[dict-item]
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


# -- the student's Flow II alone (the benchmark's graph) and reduced precisions ------------------------------

def test_student_flow_graph_equals_the_iaf(generators: tuple[ShowerGenerator, ShowerGenerator],
                                           tmp_path: Path) -> None:
    from calodistill.flows.export import export_student_flow, onnx_session

    student = generators[0].flow2
    path = export_student_flow(student, tmp_path / "flow2.onnx", groups=3)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(9, D, generator=gen)
    c = torch.randn(9, 1 + L, generator=gen)
    with torch.no_grad():
        want = student.inverse(z, c)[0].numpy()
    session = onnx_session(path, ["CPUExecutionProvider"], threads=1)
    got = session.run(["x"], {"noise": z.numpy(), "context": c.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(FlowsError, match="expected an IAF"):
        export_student_flow(generators[1].flow2, tmp_path / "teacher.onnx")


def test_reduced_precision_converts_only_the_students_products(sampler_file: Path, tmp_path: Path) -> None:
    import onnx

    from calodistill.flows.onnx_precision import convert_precision, weight_products

    fp32 = onnx.load(str(sampler_file))
    products = weight_products(fp32)
    assert products and all(n.input[1].startswith("student.") for n in products)
    half = onnx.load(str(convert_precision(sampler_file, tmp_path / "fp16.onnx", "fp16")))
    halves = {i.name for i in half.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert halves == {f"{n.input[1]}.fp16" for n in products}
    q = onnx.load(str(convert_precision(sampler_file, tmp_path / "int8.onnx", "int8")))
    blocks = [n for n in q.graph.node if n.op_type == "MatMulNBits"]  # weight-only, a scale per 32 rows
    qd = onnx.load(str(convert_precision(sampler_file, tmp_path / "int8-dynamic.onnx", "int8-dynamic")))
    dynamic = [n for n in qd.graph.node if n.op_type == "MatMulInteger"]
    for quantized in (blocks, dynamic):
        assert len(quantized) == len(products)
        assert all(n.input[1].startswith("student.") for n in quantized)  # Flow I stays float32
    for model in (half, q, qd):
        props = {p.key: p.value for p in model.metadata_props}
        assert props["geometry"] == "tiny" and props["precision"] in ("fp16", "int8", "int8-dynamic")
        assert [i.name for i in model.graph.input] == ["incident_energy", "noise"]
        assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)
    e, z = _inputs(20, 9)
    want = sample_from_noise(make_generators()[0], e, z)
    for name in ("fp16", "int8", "int8-dynamic"):
        got = OnnxSampler(tmp_path / f"{name}.onnx", threads=1).sample(e, z)
        assert got.shape == want.shape and np.isfinite(got).all()
    with pytest.raises(FlowsError, match="no matrix products with weights named nothing"):
        convert_precision(sampler_file, tmp_path / "none.onnx", "fp16", scope="nothing.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp16.onnx", "int8-dynamic.onnx", "int8.onnx"]
