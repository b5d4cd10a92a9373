"""The fast student sampler (flows/fast.py) computes exactly what ``IAF.inverse`` computes."""

from __future__ import annotations

import pytest
import torch
from nflows.transforms.splines.rational_quadratic import (
    unconstrained_rational_quadratic_spline,
)

from calodistill.flows.config import FlowConfig
from calodistill.flows.errors import FlowsError
from calodistill.flows.fast import (
    FastIAFSampler,
    fast_inverse,
    matmul_floor_shapes,
    rqs_inverse,
)
from calodistill.flows.models import build_iaf_like, build_maf

D, C = 7, 3


def _perturb(flow: torch.nn.Module, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _student(kind: str, permutation: str, dtype: torch.dtype, n_hidden_layers: int = 2,
             context: int = C, scale: float = 0.3):
    cfg = FlowConfig(features=D, context_features=context, n_blocks=3, hidden_features=16,
                     n_hidden_layers=n_hidden_layers, kind=kind, num_bins=4, tail_bound=2.5,
                     permutation=permutation, permutation_seed=3)
    teacher = build_maf(cfg).to(dtype)
    student = build_iaf_like(teacher, hidden_features=12).eval()
    _perturb(student, 3, scale)
    return student


def _inputs(n: int, dtype: torch.dtype, context: int = C) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(0)
    z = 1.5 * torch.randn(n, D, generator=gen, dtype=dtype)
    z[0, 0], z[1, 2] = 4.0, -3.0  # outside the spline interval: identity tails
    c = torch.randn(n, context, generator=gen, dtype=dtype) if context else None
    return z, c


@pytest.mark.parametrize("kind", ["spline", "affine"])
@pytest.mark.parametrize("permutation", ["reverse", "random"])
def test_fast_equals_iaf_inverse_float64(kind: str, permutation: str) -> None:
    student = _student(kind, permutation, torch.float64)
    z, c = _inputs(40, torch.float64)
    with torch.no_grad():
        x, lad = student.inverse(z, c)
    xf, ladf = FastIAFSampler(student, chunk_size=16).sample(z, c, need_logabsdet=True)
    assert xf.dtype == torch.float64
    torch.testing.assert_close(xf, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(ladf, lad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["spline", "affine"])
def test_fast_equals_iaf_inverse_float32(kind: str) -> None:
    student = _student(kind, "random", torch.float32, n_hidden_layers=1, scale=0.1)
    z, c = _inputs(300, torch.float32)
    with torch.inference_mode():
        x, lad = student.inverse(z, c)
    for chunk in (None, 64):
        xf, ladf = FastIAFSampler(student, chunk_size=chunk).sample(z, c, need_logabsdet=True)
        torch.testing.assert_close(xf, x, rtol=0, atol=1e-5)
        torch.testing.assert_close(ladf, lad, rtol=1e-5, atol=1e-4)


def test_fast_without_context_and_refresh() -> None:
    student = _student("spline", "reverse", torch.float64, context=0)
    z, _ = _inputs(10, torch.float64, context=0)
    sampler = FastIAFSampler(student)
    _perturb(student, 9, 0.1)  # the sampler is a snapshot until refreshed
    with torch.no_grad():
        x, _ = student.inverse(z)
    assert not torch.allclose(sampler(z), x)
    sampler.refresh()
    torch.testing.assert_close(sampler(z), x, rtol=0, atol=1e-10)
    x2, lad2 = fast_inverse(student, z)
    torch.testing.assert_close(lad2, student.inverse(z)[1].detach(), rtol=0, atol=1e-10)


def test_lean_spline_equals_nflows() -> None:
    gen = torch.Generator().manual_seed(1)
    n, d, nb = 50, 9, 6
    p = 2.0 * torch.randn(n, d, 3 * nb - 1, generator=gen, dtype=torch.float64)
    y = 4.0 * torch.randn(n, d, generator=gen, dtype=torch.float64)  # some beyond the tail bound
    y[0, 0], y[0, 1] = 3.0, -3.0                                    # exactly on the bounds
    ref, ref_lad = unconstrained_rational_quadratic_spline(
        y, p[..., :nb], p[..., nb:2 * nb], p[..., 2 * nb:], inverse=True, tails="linear", tail_bound=3.0)
    pt = p.transpose(1, 2)  # (n, params, d) layout of the fast path
    out, lad = rqs_inverse(y, pt[:, :nb], pt[:, nb:2 * nb], pt[:, 2 * nb:], 3.0, 1e-3, 1e-3, 1e-3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lad, ref_lad, rtol=0, atol=1e-10)
    out2, none = rqs_inverse(y, pt[:, :nb], pt[:, nb:2 * nb], pt[:, 2 * nb:], 3.0, 1e-3, 1e-3, 1e-3,
                             need_logabsdet=False)
    assert none is None
    torch.testing.assert_close(out2, ref, rtol=0, atol=1e-12)


def test_matmul_shapes_and_flops() -> None:
    student = _student("spline", "reverse", torch.float32, n_hidden_layers=2)
    sampler = FastIAFSampler(student)
    m = 3 * 4 - 1
    shapes = matmul_floor_shapes(sampler, 5)
    assert shapes[0] == (5, C, 3 * 12)  # all blocks' context layers in one product
    assert shapes[1:4] == [(5, D, 12), (5, 12, 12), (5, 12, m * D)]
    assert len(shapes) == 1 + 3 * 3
    assert sampler.flops_per_sample() == 2 * (C * 36 + 3 * (D * 12 + 12 * 12 + 12 * m * D))


def test_fast_rejects_bad_input() -> None:
    student = _student("spline", "reverse", torch.float32)
    sampler = FastIAFSampler(student)
    with pytest.raises(FlowsError, match="inputs"):
        sampler(torch.zeros(3, D + 1), torch.zeros(3, C))
    with pytest.raises(FlowsError, match="context"):
        sampler(torch.zeros(3, D))
    with pytest.raises(FlowsError, match="IAF"):
        FastIAFSampler(build_maf(student.config))  # type: ignore[arg-type]


@pytest.mark.parametrize("permutation", ["reverse", "random"])
@pytest.mark.parametrize("groups", [1, 3, 7])
def test_grouped_output_layer_equals_iaf_inverse(permutation: str, groups: int) -> None:
    student = _student("spline", permutation, torch.float64, n_hidden_layers=1)
    z, c = _inputs(30, torch.float64)
    with torch.no_grad():
        x, lad = student.inverse(z, c)
    sampler = FastIAFSampler(student, chunk_size=8, groups=groups)
    assert sampler.structured == (groups > 1)
    xf, ladf = sampler.sample(z, c, need_logabsdet=True)
    torch.testing.assert_close(xf, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(ladf, lad, rtol=0, atol=1e-10)
    if groups > 1:  # fewer multiply-adds than the dense product, never more
        assert sampler.flops_per_sample() < FastIAFSampler(student, groups=1).flops_per_sample()
