"""The student's voxel-by-voxel density (flows/student_density.py) equals nflows' D-pass forward of the IAF."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calodistill.flows.config import FlowConfig
from calodistill.flows.distillation import student_nll
from calodistill.flows.errors import FlowsError
from calodistill.flows.models import IAF, build_iaf_like, build_maf
from calodistill.flows.student_density import FastIAFDensity, exact_log_prob
from calodistill.flows.training import evaluate_nll


def _student(kind: str = "spline", n_hidden_layers: int = 1, dtype: torch.dtype = torch.float64,
             features: int = 9, context: int = 2, n_blocks: int = 3, hidden: int = 16, bins: int = 4,
             permutation: str = "random", activation: str = "relu", seed: int = 0, scale: float = 0.3) -> IAF:
    torch.manual_seed(seed)
    cfg = FlowConfig(features=features, context_features=context, n_blocks=n_blocks, hidden_features=hidden,
                     n_hidden_layers=n_hidden_layers, kind=kind, num_bins=bins, tail_bound=2.5,
                     permutation=permutation, permutation_seed=3, activation=activation)
    student = build_iaf_like(build_maf(cfg)).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from the identity initialisation, some values in the linear tails
        for p in student.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=dtype))
    return student.eval()


def _data(student: IAF, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    ref = next(student.parameters())
    x = 1.3 * torch.randn(n, student.features, generator=gen, dtype=ref.dtype)
    c = (torch.randn(n, student.config.context_features, generator=gen, dtype=ref.dtype)
         if student.config.context_features else None)
    return x, c


@pytest.mark.parametrize("kind,n_hidden_layers,permutation,activation,native_spline", [
    ("spline", 1, "random", "relu", None),
    ("spline", 1, "reverse", "relu", False),
    ("spline", 2, "random", "tanh", None),
    ("spline", 3, "none", "relu", False),
    ("affine", 1, "random", "relu", None),
    ("affine", 2, "reverse", "elu", None),
])
def test_equals_nflows_d_pass_forward_float64(kind: str, n_hidden_layers: int, permutation: str,
                                              activation: str, native_spline: bool | None) -> None:
    student = _student(kind, n_hidden_layers, permutation=permutation, activation=activation)
    x, c = _data(student, 20)
    density = FastIAFDensity(student, native_spline=native_spline)
    assert density.native == (kind == "spline" and native_spline is None)
    z, lad = density.forward(x, c)
    with torch.no_grad():
        z_ref, lad_ref = student(x, c)
        log_q_ref = student.log_prob(x, c)
    torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lad, lad_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(density.log_prob(x, c), log_q_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(density(x, c), log_q_ref, rtol=1e-10, atol=1e-10)
    # round trip through the student's fast (inverse) direction (its steep spots amplify z's rounding)
    with torch.no_grad():
        x_back, lad_inv = student.inverse(z, c)
    torch.testing.assert_close(x_back, x, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(lad_inv, -lad, rtol=1e-7, atol=1e-7)


def test_unconditional_student_and_exact_log_prob_of_both_models() -> None:
    student = _student(context=0)
    x, c = _data(student, 7)
    assert c is None
    with torch.no_grad():
        want = student.log_prob(x)
    torch.testing.assert_close(exact_log_prob(student, x), want, rtol=1e-10, atol=1e-10)
    teacher = build_maf(student.config).double().eval()
    with torch.no_grad():
        assert torch.equal(exact_log_prob(teacher, x), teacher.log_prob(x))  # the MAF: its own one pass


def test_quickstart_size_float32() -> None:
    """D 504, 4 spline blocks of hidden 64, 8 bins (the quickstart's student), float32."""
    student = _student(dtype=torch.float32, features=504, context=4, n_blocks=4, hidden=64, bins=8,
                       permutation="reverse", seed=4, scale=0.03)
    x, c = _data(student, 3)
    z, lad = FastIAFDensity(student).forward(x, c)
    with torch.no_grad():
        z_ref, lad_ref = student(x, c)
        z64, lad64 = student.double()(x.double(), c.double())
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lad, lad_ref, rtol=1e-4, atol=1e-2)
    # as close to the float64 result as nflows' D passes in float32 are
    assert (z.double() - z64).abs().max() <= 3 * (z_ref.double() - z64).abs().max() + 1e-6
    assert (lad.double() - lad64).abs().max() <= 3 * (lad_ref.double() - lad64).abs().max() + 1e-4


def test_student_nll_equals_the_d_pass_nll() -> None:
    student = _student()
    x, c = _data(student, 30)
    want = evaluate_nll(student, x[:25], c[:25], batch_size=7)
    assert student_nll(student, x, c, max_examples=25, batch_size=7, progress=False) == pytest.approx(want, rel=1e-10)
    with pytest.raises(FlowsError, match="no examples"):
        student_nll(student, x, c, max_examples=0)


def test_refresh_follows_weight_changes_and_bad_inputs() -> None:
    student = _student()
    x, c = _data(student, 5)
    density = FastIAFDensity(student)
    before = density.log_prob(x, c)
    with torch.no_grad():
        student.cores()[1].autoregressive_net.output_layer.bias.add_(0.5)
        want = student.log_prob(x, c)
    assert torch.equal(density.log_prob(x, c), before)  # a snapshot until refreshed
    density.refresh()
    torch.testing.assert_close(density.log_prob(x, c), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(FlowsError, match="inputs"):
        density.log_prob(x[:, :-1], c)
    with pytest.raises(FlowsError, match="context"):
        density.log_prob(x, None)
    with pytest.raises(FlowsError, match="IAF"):
        FastIAFDensity(build_maf(student.config))  # type: ignore[arg-type]


def test_shower_generator_scores_the_student_exactly() -> None:
    """``ShowerGenerator.log_prob`` of a student equals Flow I's plus the IAF's D-pass log-density."""
    from calodistill.flows.preprocessing import CaloFlowPreprocessor
    from calodistill.flows.sampling import ShowerGenerator

    rng = np.random.default_rng(0)
    e_inc = rng.uniform(1e3, 1e4, 12)
    voxels = rng.gamma(1.0, 50.0, (12, 7)) * (rng.uniform(size=(12, 7)) > 0.3)
    pre = CaloFlowPreprocessor([3, 4]).fit(e_inc, voxels)
    flow1 = build_maf(FlowConfig(features=2, context_features=1, n_blocks=2, hidden_features=8)).double()
    student = _student(features=7, context=3, bins=8)
    got = ShowerGenerator(pre, flow1, student, device="cpu").log_prob(e_inc, voxels, batch_size=5, seed=2)
    t = pre.transform(e_inc, voxels, rng=np.random.default_rng(2), add_noise=True)
    with torch.no_grad():
        want2 = student.log_prob(torch.as_tensor(t.flow2_x), torch.as_tensor(t.flow2_context)).numpy()
    np.testing.assert_allclose(got["flow2"], want2, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got["total"], got["flow1"] + want2, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_density_equals_the_cpu_d_pass() -> None:
    """On CUDA (torch spline, no compiled kernel) the density equals the CPU's D-pass within float32 rounding."""
    student = _student(dtype=torch.float32, features=64, context=4, n_blocks=4, hidden=64, bins=8, scale=0.05)
    x, c = _data(student, 50)
    with torch.no_grad():
        want = student.log_prob(x, c)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = FastIAFDensity(student.to("cuda")).log_prob(x.cuda(), c.cuda()).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
