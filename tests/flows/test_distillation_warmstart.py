"""Distillation additions: the wide warm start (a student wider than the teacher starts as the teacher's
map) and the noise-side x-pass term."""

from __future__ import annotations

import pytest
import torch

from calodistill.flows.config import DistillConfig, FlowConfig
from calodistill.flows.distillation import (
    distillation_step_loss,
    init_student_from_teacher,
    local_noise_side_error,
    student_local_trace,
)
from calodistill.flows.errors import FlowsError
from calodistill.flows.models import MAF, build_iaf_like, build_maf


def _random_teacher(kind: str = "spline", n_hidden_layers: int = 1, hidden: int = 6, seed: int = 0) -> MAF:
    """A tiny MAF with random (non-trivial) weights everywhere, float64."""
    torch.manual_seed(seed)
    cfg = FlowConfig(features=7, context_features=2, n_blocks=3, hidden_features=hidden,
                     n_hidden_layers=n_hidden_layers, kind=kind, num_bins=4, tail_bound=5.0, activation="tanh")
    teacher = build_maf(cfg).double()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    teacher.eval()
    return teacher


def _inputs(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n_hidden_layers", [1, 2])
@pytest.mark.parametrize("kind", ["spline", "affine"])
def test_wide_student_starts_as_the_equal_width_warm_start(kind: str, n_hidden_layers: int) -> None:
    teacher = _random_teacher(kind, n_hidden_layers)
    equal = build_iaf_like(teacher)
    wide = build_iaf_like(teacher, hidden_features=15)
    z, c = _inputs()
    with torch.no_grad():
        before = wide.inverse(z, c)[0]
    assert init_student_from_teacher(teacher, equal)
    assert init_student_from_teacher(teacher, wide)
    with torch.no_grad():
        x_eq, ld_eq = equal.inverse(z, c)
        x_wide, ld_wide = wide.inverse(z, c)
    assert not torch.allclose(before, x_eq, atol=1e-3)  # the random start was elsewhere
    torch.testing.assert_close(x_wide, x_eq, rtol=0, atol=1e-10)
    torch.testing.assert_close(ld_wide, ld_eq, rtol=0, atol=1e-10)
    # the extra units are live: one loss gradient reaches their outgoing weights
    teacher.requires_grad_(False)
    loss, _ = distillation_step_loss(teacher, wide, z, c, x_pass="local")
    loss.backward()
    out_grad = wide.cores()[0].autoregressive_net.output_layer.weight.grad
    assert out_grad[:, 6:].abs().sum() > 0


def test_wide_warm_start_refuses_narrower_or_deeper_students() -> None:
    teacher = _random_teacher()
    for student in (build_iaf_like(teacher, hidden_features=4), build_iaf_like(teacher, hidden_features=12, n_hidden_layers=2)):
        before = [p.clone() for p in student.parameters()]
        assert not init_student_from_teacher(teacher, student)
        assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_noise_side_error_is_the_teacher_scaled_data_side_error() -> None:
    # affine teacher: block k maps y = scale_k(s_k) * x + shift_k(s_k), so an error d in the student's
    # estimate of s_k appears on the noise side exactly as scale_k * d
    teacher = _random_teacher("affine")
    teacher.requires_grad_(False)
    x, c = _inputs()
    t = teacher.forward_trace(x, c)
    g = torch.Generator().manual_seed(3)
    deltas = [1e-2 * torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in t.params]
    fake = t._replace(states=[s + d for s, d in zip(t.states[:-1], deltas)] + [t.states[-1]])
    expected = 0.0
    for block, p, d in zip(teacher.blocks(), t.params, deltas):
        scale, _ = block._scale_shift(p, x.shape[1])
        expected += float((scale * d).pow(2).sum(dim=1).mean())
    assert float(local_noise_side_error(teacher, t, fake)) == pytest.approx(expected, rel=1e-9)
    assert float(local_noise_side_error(teacher, t, t)) == pytest.approx(0.0, abs=1e-24)


def test_noise_weight_adds_the_noise_side_term_to_the_local_x_pass() -> None:
    teacher = _random_teacher("spline")
    teacher.requires_grad_(False)
    student = build_iaf_like(teacher)
    init_student_from_teacher(teacher, student)
    x, c = _inputs()
    torch.manual_seed(0)
    plain, comps = distillation_step_loss(teacher, student, x, c, x_pass="local")
    torch.manual_seed(0)
    with_noise, comps_n = distillation_step_loss(teacher, student, x, c, beta=0.25, x_pass="local", noise_weight=2.0)
    torch.manual_seed(0)
    quarter, _ = distillation_step_loss(teacher, student, x, c, beta=0.25, x_pass="local")
    t = teacher.forward_trace(x, c)
    expected = float(local_noise_side_error(teacher, t, student_local_trace(student, t, c)).detach())
    assert "noise_x" not in comps and float(comps_n["noise_x"]) == pytest.approx(expected, rel=1e-9) and expected > 0
    assert float(with_noise) == pytest.approx(float(quarter) + 0.25 * 2.0 * expected, rel=1e-9)
    assert float(comps_n["loss"]) == pytest.approx(float(with_noise), rel=1e-12)
    # the chained x-pass has no teacher-forced blocks: no noise-side term
    torch.manual_seed(0)
    _, chain = distillation_step_loss(teacher, student, x, c, x_pass="chain", noise_weight=2.0)
    assert "noise_x" not in chain


def test_new_config_fields_are_checked() -> None:
    with pytest.raises(FlowsError, match="noise_weight"):
        DistillConfig(noise_weight=-1.0)
