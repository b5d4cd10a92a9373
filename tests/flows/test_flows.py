"""Every flow (Flow I MAF, teacher MAF spline/affine, student IAF spline/affine) passes the same tests.

Small D, float64, seeded. Also tests the nflows pieces the flows are built from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from nflows.distributions.normal import StandardNormal
from nflows.transforms.base import CompositeTransform, InverseTransform
from nflows.transforms.linear import Linear as NflowsLinear
from nflows.transforms.permutations import Permutation
from nflows.transforms.splines import rational_quadratic as nflows_rq

from calodistill.flows.config import FlowConfig, flow1_config, teacher_config
from calodistill.flows.errors import FlowsError
from calodistill.flows.models import (
    IAF,
    MAF,
    build_iaf,
    build_iaf_like,
    build_maf,
)
from calodistill.flows.serialization import load_flow, save_flow
from calodistill.flows.transforms import MADE, MaskedLinear, rq_spline_linear_tails

D, C = 5, 2
FLOWS = ["flow1", "teacher-spline", "teacher-affine", "student-spline", "student-affine"]


def _perturb(flow: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Move weights away from the near-identity initialisation (deterministically)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _teacher(kind: str, permutation: str = "random") -> MAF:
    cfg = FlowConfig(features=D, context_features=C, n_blocks=3, hidden_features=16, n_hidden_layers=2,
                     kind=kind, num_bins=4, tail_bound=2.5, permutation=permutation, permutation_seed=3)
    flow = build_maf(cfg).double()
    _perturb(flow, 1)
    return flow


def make_flow(name: str) -> MAF | IAF:
    torch.manual_seed(0)
    if name == "flow1":
        flow = build_maf(flow1_config(3, n_blocks=3, hidden_features=12, tail_bound=2.5)).double()
        _perturb(flow, 2)
        return flow
    role, kind = name.split("-")
    teacher = _teacher(kind)
    if role == "teacher":
        return teacher
    student = build_iaf_like(teacher, hidden_features=12)
    _perturb(student, 3)
    return student


def make_inputs(flow: MAF | IAF, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    cfg = flow.config
    x = 1.5 * torch.randn(n, cfg.features, generator=gen, dtype=torch.float64)
    x[0, 0] = 4.0  # outside the spline interval: linear tail
    c = torch.randn(n, cfg.context_features, generator=gen, dtype=torch.float64)
    return x, c


@pytest.fixture(params=FLOWS)
def flow(request: pytest.FixtureRequest) -> MAF | IAF:
    return make_flow(request.param)


def test_shapes(flow: MAF | IAF) -> None:
    x, c = make_inputs(flow)
    n, d = x.shape
    z, lad = flow(x, c)
    assert z.shape == (n, d) and lad.shape == (n,)
    assert flow.log_prob(x, c).shape == (n,)
    assert flow.transform_to_noise(x, c).shape == (n, d)
    assert flow.sample(context=c).shape == (n, d)
    assert flow.sample(num_samples=3, context=c).shape == (n, 3, d)
    s, lp = flow.sample_and_log_prob(c)
    assert s.shape == (n, d) and lp.shape == (n,)
    assert s.dtype == torch.float64
    with pytest.raises(FlowsError, match="context"):
        flow.log_prob(x, torch.cat([c, c], dim=1))
    with pytest.raises(FlowsError, match="inputs"):
        flow.log_prob(x[:, :-1], c)


def test_gradient_reaches_every_parameter(flow: MAF | IAF) -> None:
    x, c = make_inputs(flow)
    if isinstance(flow, IAF):
        _, lp = flow.sample_and_log_prob(c, generator=torch.Generator().manual_seed(0))
        loss = lp.mean() + flow.inverse(x, c)[0].pow(2).mean()
    else:
        loss = -flow.log_prob(x, c).mean()
    loss.backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_invertible(flow: MAF | IAF) -> None:
    x, c = make_inputs(flow)
    z, lad = flow(x, c)
    x2, lad2 = flow.inverse(z, c)
    torch.testing.assert_close(x2, x, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(lad2, -lad, atol=1e-8, rtol=1e-8)
    z2, _ = flow(flow.inverse(x, c)[0], c)
    torch.testing.assert_close(z2, x, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_logabsdet_matches_autograd_jacobian(flow: MAF | IAF, direction: str) -> None:
    x, c = make_inputs(flow, n=3)
    fn = flow.forward if direction == "forward" else flow.inverse
    _, lad = fn(x, c)
    # rows are independent: d(sum over rows of out)/dx gives every row's Jacobian in D passes
    jac = torch.autograd.functional.jacobian(lambda xs: fn(xs, c)[0].sum(dim=0), x)  # (D, N, D)
    for i in range(x.shape[0]):
        sign, logdet = torch.linalg.slogdet(jac[:, i, :])
        assert sign != 0
        assert logdet.item() == pytest.approx(lad[i].item(), abs=1e-8)


def _block_maps(flow: MAF | IAF, ctx: torch.Tensor) -> list[tuple[Callable[[torch.Tensor], torch.Tensor], torch.nn.Module]]:
    """(one-pass map of block k's core in nflows-forward terms, its transform), data side first."""
    cores = flow.cores() if isinstance(flow, IAF) else flow.blocks()
    return [(lambda h, core=core: core(h, ctx)[0], core) for core in cores]


def test_jacobian_triangular_under_permutation(flow: MAF | IAF) -> None:
    """Each block (then its permutation) has a lower-triangular Jacobian once un-permuted, and its
    MADE output for feature i depends only on inputs < i (nflows tests/transforms/made_test.py)."""
    x, c = make_inputs(flow, n=1)
    perms = flow.permutations()
    d = x.shape[1]
    for k, (core_map, core) in enumerate(_block_maps(flow, c)):
        jac = torch.autograd.functional.jacobian(lambda row: core_map(row[None])[0], x[0])
        assert torch.count_nonzero(torch.triu(jac, diagonal=1)) == 0
        assert (torch.diagonal(jac) != 0).all()
        if k < len(perms):
            idx = perms[k]._permutation
            jac_p = torch.autograd.functional.jacobian(
                lambda row: perms[k](core_map(row[None]))[0][0], x[0])
            unpermuted = jac_p[torch.argsort(idx)]
            torch.testing.assert_close(unpermuted, jac)
        mult = core._output_dim_multiplier()
        pjac = torch.autograd.functional.jacobian(lambda row: core.params(row[None], c)[0], x[0])
        pjac = pjac.reshape(d, mult, d)
        for i in range(d):
            assert torch.count_nonzero(pjac[i, :, i:]) == 0, f"block {k} feature {i}"
        if d > 1:
            assert torch.count_nonzero(pjac[d - 1, :, : d - 1]) > 0


def test_sample_and_log_prob_consistent(flow: MAF | IAF) -> None:
    _, c = make_inputs(flow)
    gen = torch.Generator().manual_seed(5)
    s, lp = flow.sample_and_log_prob(c, generator=gen)
    torch.testing.assert_close(lp, flow.log_prob(s, c), atol=1e-8, rtol=1e-8)
    s2 = flow.sample(context=c, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(s2, s)
    s3, lp3 = flow.sample_and_log_prob(num_samples=2, context=c, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(lp3.reshape(-1), flow.log_prob(s3.reshape(-1, s3.shape[-1]),
                                                              c.repeat_interleave(2, 0)))


def test_log_prob_is_normalised_density_formula(flow: MAF | IAF) -> None:
    """log p = log N(z) + logabsdet, with nflows' StandardNormal as the reference base."""
    x, c = make_inputs(flow)
    z, lad = flow(x, c)
    ref = StandardNormal([flow.features]).double().log_prob(z)
    torch.testing.assert_close(flow.log_prob(x, c), ref + lad)
    assert flow.base_log_prob(torch.zeros(1, flow.features, dtype=torch.float64)).item() == pytest.approx(
        -0.5 * flow.features * math.log(2 * math.pi))


def test_save_reload_identical(flow: MAF | IAF, tmp_path: Path) -> None:
    x, c = make_inputs(flow)
    path = tmp_path / "flow.pt"
    save_flow(path, flow, flow.config)
    loaded = load_flow(path)
    assert type(loaded) is type(flow) and loaded.config == flow.config
    assert next(loaded.parameters()).dtype == torch.float64
    torch.testing.assert_close(loaded(x, c), flow(x, c), atol=0, rtol=0)
    torch.testing.assert_close(loaded.inverse(x, c), flow.inverse(x, c), atol=0, rtol=0)
    for a, b in zip(loaded.permutations(), flow.permutations()):
        assert torch.equal(a._permutation, b._permutation)


def test_traces_match_transforms(flow: MAF | IAF) -> None:
    x, c = make_inputs(flow)
    if isinstance(flow, IAF):
        tr = flow.inverse_trace(x, c)
        out, lad = flow.inverse(x, c)
        assert torch.equal(tr.states[-1], x)
        assert torch.equal(tr.states[0], tr.outputs)
    else:
        tr = flow.forward_trace(x, c)
        out, lad = flow(x, c)
        assert torch.equal(tr.states[0], x)
        assert torch.equal(tr.states[-1], tr.outputs)
    torch.testing.assert_close(tr.outputs, out)
    torch.testing.assert_close(tr.logabsdet, lad)
    assert len(tr.states) == flow.n_blocks + 1 and len(tr.params) == flow.n_blocks
    mult = flow.blocks()[0]._output_dim_multiplier() if isinstance(flow, MAF) else flow.cores()[0]._output_dim_multiplier()
    assert all(p.shape == (x.shape[0], flow.features * mult) for p in tr.params)


@pytest.mark.parametrize("kind", ["spline", "affine"])
def test_student_pairs_with_teacher(kind: str) -> None:
    """Teacher params fed to the student's elementwise map (spline/affine inverse) recover the
    teacher's block input from its output, block by block, in the traces' shared ordering."""
    teacher = _teacher(kind)
    student = build_iaf_like(teacher, hidden_features=7)
    x, c = make_inputs(teacher)
    tr = teacher.forward_trace(x, c)
    perms = teacher.permutations()
    for k, core in enumerate(student.cores()):
        out = tr.states[k + 1]
        if k < len(perms):
            out = perms[k].inverse(out)[0]
        recovered, lad = core._elementwise_forward(out, tr.params[k])
        torch.testing.assert_close(recovered, tr.states[k], atol=1e-9, rtol=1e-9)
    z = tr.outputs
    st = student.inverse_trace(z, c)
    assert [s.shape for s in st.states] == [s.shape for s in tr.states]
    assert [p.shape for p in st.params] == [p.shape for p in tr.params]
    assert torch.equal(st.states[-1], tr.states[-1])


def test_student_copies_teacher_structure() -> None:
    teacher = _teacher("spline", permutation="random")
    student = build_iaf_like(teacher, hidden_features=9, n_hidden_layers=1)
    assert student.n_blocks == teacher.n_blocks
    assert student.config.hidden_features == 9 and student.config.kind == teacher.config.kind
    for a, b in zip(student.permutations(), teacher.permutations()):
        assert torch.equal(a._permutation, b._permutation)
    assert not torch.equal(teacher.permutations()[0]._permutation, torch.arange(D))
    assert next(student.parameters()).dtype == torch.float64
    assert all(isinstance(b, InverseTransform) for b in student.blocks())
    assert isinstance(student.transform, CompositeTransform)
    same = build_iaf(teacher.config)
    for a, b in zip(same.permutations(), teacher.permutations()):
        assert torch.equal(a._permutation, b._permutation)


def test_no_nflows_linear_transforms() -> None:
    """nflows' Linear transforms (NaiveLinear calls the removed torch.solve) are not used."""
    for name in FLOWS:
        assert not any(isinstance(m, NflowsLinear) for m in make_flow(name).modules())


def test_default_dtype_is_float32_and_identity_init() -> None:
    torch.manual_seed(0)
    flow = build_maf(teacher_config(6, 2, n_blocks=2))
    assert next(flow.parameters()).dtype == torch.float32
    x = torch.randn(4, 6)
    c = torch.randn(4, 3)
    z, lad = flow(x, c)
    torch.testing.assert_close(z, x.flip(1), atol=0.05, rtol=0.05)  # near identity, reversed once
    assert lad.abs().max() < 0.1


def test_weight_cache_used_without_grad_and_invalidated_by_updates() -> None:
    flow = make_flow("student-spline")
    x, c = make_inputs(flow)
    with torch.no_grad():
        first = flow.inverse(x, c)[0]
    layer = flow.masked_linears()[0]
    assert layer._cache is not None
    torch.testing.assert_close(flow.inverse(x, c)[0], first)  # grad mode: uncached product
    opt = torch.optim.SGD(flow.parameters(), lr=0.1)
    flow.inverse(x, c)[0].pow(2).sum().backward()
    opt.step()
    with torch.inference_mode():
        cached = flow.inverse(x, c)[0]
    fresh = flow.inverse(x, c)[0].detach()
    torch.testing.assert_close(cached, fresh)
    assert not torch.allclose(cached, first)
    flow.set_weight_cache(False)
    with torch.no_grad():
        torch.testing.assert_close(flow.inverse(x, c)[0], fresh)
    assert layer._cache is None


def test_nflows_permutation_and_composite() -> None:
    perm = Permutation(torch.tensor([2, 0, 1]))
    x = torch.arange(6.0).reshape(2, 3)
    y, lad = perm(x)
    assert torch.equal(y, x[:, [2, 0, 1]]) and torch.equal(lad, torch.zeros(2))
    assert torch.equal(perm.inverse(y)[0], x)
    comp = CompositeTransform([perm, InverseTransform(perm)])
    assert torch.equal(comp(x)[0], x)


def test_made_masks_follow_nflows_degrees() -> None:
    made = MADE(features=4, hidden_features=6, context_features=0, n_hidden_layers=2, output_multiplier=3)
    layers = made.masked_linears()
    assert all(isinstance(m, MaskedLinear) for m in layers)
    out_degrees = torch.arange(1, 5).repeat_interleave(3)
    assert torch.equal(layers[-1].mask, (out_degrees[:, None] > layers[-2].degrees).float())
    with pytest.raises(FlowsError, match="context"):
        MADE(features=4, hidden_features=6, context_features=2)(torch.zeros(1, 4))


def test_config_round_trip_and_unknown_key() -> None:
    cfg = teacher_config(504, 3)
    assert cfg.hidden_features == 504 and cfg.context_features == 4 and cfg.n_blocks == 8
    assert FlowConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(FlowsError, match="my.yaml: unknown key 'n_block'"):
        FlowConfig.from_dict({**cfg.to_dict(), "n_block": 3}, source="my.yaml")
    with pytest.raises(FlowsError, match="kind"):
        cfg.replace(kind="cubic")
    with pytest.raises(FlowsError, match="hidden_features"):
        cfg.replace(hidden_features=0)
    f1 = flow1_config(3)
    assert (f1.n_blocks, f1.hidden_features, f1.n_hidden_layers, f1.num_bins, f1.tail_bound) == (6, 64, 2, 8, 14.0)


@pytest.mark.parametrize("inverse", [False, True])
def test_fast_spline_equals_nflows_spline(inverse: bool) -> None:
    """flows.transforms.rq_spline_linear_tails is nflows' linear-tail RQ spline, without masking."""
    gen = torch.Generator().manual_seed(0)
    n, d, k = 300, 4, 8
    x = 3.0 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[0, 0], x[1, 1], x[2, 2] = -2.5, 2.5, 0.0  # the interval's edges and the middle
    w, h = (torch.randn(n, d, k, generator=gen, dtype=torch.float64) for _ in range(2))
    der = torch.randn(n, d, k - 1, generator=gen, dtype=torch.float64)
    ref = nflows_rq.unconstrained_rational_quadratic_spline(x, w, h, der.clone(), inverse=inverse,
                                                           tails="linear", tail_bound=2.5)
    out = rq_spline_linear_tails(x, w, h, der, inverse=inverse, tail_bound=2.5)
    torch.testing.assert_close(out[0], ref[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out[1], ref[1], atol=1e-12, rtol=1e-12)
    outside = x.abs() > 2.5
    assert torch.equal(out[0][outside], x[outside]) and (out[1][outside] == 0).all()
    back = rq_spline_linear_tails(out[0], w, h, der, inverse=not inverse, tail_bound=2.5)
    torch.testing.assert_close(back[0], x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(back[1], -out[1], atol=1e-10, rtol=1e-10)


def test_flow_with_nflows_spline_gives_same_outputs() -> None:
    flow = make_flow("student-spline")
    x, c = make_inputs(flow)
    fast = flow.inverse(x, c)
    for core in flow.cores():
        core.use_nflows_spline = True
    torch.testing.assert_close(flow.inverse(x, c), fast, atol=1e-12, rtol=1e-12)
    z, lad = flow(x, c)
    torch.testing.assert_close(flow.inverse(z, c)[0], x, atol=1e-8, rtol=1e-8)
