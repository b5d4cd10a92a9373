"""The training losses as they run (compiled spline, fused squared errors, cached frozen weights) equal a
reference implementation: nflows' spline through autograd and the CaloFlow II loss written out plainly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from calodistill.flows.config import FlowConfig
from calodistill.flows.distillation import (
    distillation_step_loss,
    init_student_from_teacher,
)
from calodistill.flows.losses import nll_loss, squared_error
from calodistill.flows.models import IAF, MAF, build_iaf_like, build_maf


def _models(dtype: torch.dtype, features: int = 12, seed: int = 0) -> tuple[MAF, IAF]:
    torch.manual_seed(seed)
    cfg = FlowConfig(features=features, context_features=3, n_blocks=3, hidden_features=16, kind="spline",
                     num_bins=8, tail_bound=3.0, permutation="random", permutation_seed=2)
    teacher = build_maf(cfg).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from the identity initialisation
        for p in teacher.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=dtype))
    student = build_iaf_like(teacher)
    init_student_from_teacher(teacher, student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=dtype))
    return teacher, student


def _reference(flow: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``flow`` computing its splines with nflows' function through autograd."""
    ref = copy.deepcopy(flow)
    for block in (ref.cores() if isinstance(ref, IAF) else ref.blocks()):
        block.use_nflows_spline = True
    ref.set_weight_cache(False)
    return ref


def _inputs(n: int, features: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = 1.5 * torch.randn(n, features, generator=gen, dtype=dtype)
    x[0, 0] = 4.0  # a linear tail
    return x, torch.randn(n, 3, generator=gen, dtype=dtype)


def _reference_squared_error(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).reshape(a.shape[0], -1).pow(2).sum(dim=1).mean()


def _reference_distillation_loss(teacher: MAF, student: IAF, x: Tensor, c: Tensor, beta: float,
                                 noise_weight: float) -> Tensor:
    """CaloFlow II, fully guided, teacher-forced x-pass with the noise-side term, written out plainly."""
    with torch.no_grad():
        tx = teacher.forward_trace(x, c)
    cores, perms, blocks = student.cores(), student.permutations(), teacher.blocks()
    guided_x = x.new_zeros(())
    noise_x = x.new_zeros(())
    for k, core in enumerate(cores):  # each student block on the teacher's noise-side state
        h = tx.states[k + 1]
        target = h
        if k < len(perms):
            h = perms[k].inverse(h)[0]
            target = h
        p = core.params(h, c)
        out, _ = core._elementwise_forward(h, p)
        guided_x = guided_x + _reference_squared_error(out, tx.states[k]) + _reference_squared_error(p, tx.params[k])
        mapped, _ = blocks[k]._elementwise_forward(out, tx.params[k])
        noise_x = noise_x + _reference_squared_error(mapped, target)
    z = torch.randn_like(x)
    sz = student.inverse_trace(z, c)
    tz = teacher.forward_trace(sz.outputs, c)
    guided_z = sum(_reference_squared_error(a, b) for a, b in zip(tz.states, sz.states))
    guided_z = guided_z + sum(_reference_squared_error(a, b) for a, b in zip(tz.params, sz.params))
    return (1 - beta) * guided_z + beta * guided_x + beta * noise_weight * noise_x


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_teacher_log_prob_and_gradients_equal_reference(dtype: torch.dtype, tol: float) -> None:
    teacher, _ = _models(dtype)
    ref = _reference(teacher)
    x, c = _inputs(64, 12, dtype)
    loss, loss_ref = nll_loss(teacher, x, c), nll_loss(ref, x, c)
    torch.testing.assert_close(loss, loss_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(teacher.log_prob(x, c), ref.log_prob(x, c), rtol=tol, atol=tol)
    loss.backward()
    loss_ref.backward()
    for (name, p), q in zip(teacher.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_distillation_loss_and_gradients_equal_reference(dtype: torch.dtype, tol: float) -> None:
    teacher, student = _models(dtype)
    frozen = copy.deepcopy(teacher).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen_ref, student_ref = _reference(frozen), _reference(student)
    x, c = _inputs(16, 12, dtype)
    torch.manual_seed(7)
    loss, comps = distillation_step_loss(frozen, student, x, c, beta=0.5, fully_guided=True, x_pass="local",
                                         noise_weight=4.0)
    torch.manual_seed(7)
    loss_ref = _reference_distillation_loss(frozen_ref, student_ref, x, c, beta=0.5, noise_weight=4.0)
    torch.testing.assert_close(loss, loss_ref, rtol=tol, atol=tol)
    assert comps["loss"] == loss.detach() and comps["noise_x"] > 0
    loss.backward()
    loss_ref.backward()
    for (name, p), q in zip(student.named_parameters(), student_ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol, msg=name)
    assert all(p.grad is None for p in frozen.parameters())


def test_squared_error_equals_plain_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64), torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(squared_error(a, b), _reference_squared_error(a, b), rtol=1e-14, atol=0)
    torch.testing.assert_close(squared_error(a, b, "mean"), (a - b).pow(2).mean(), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="reduction"):
        squared_error(a, b, "max")


def test_frozen_weights_cached_under_grad_and_refreshed_after_updates() -> None:
    """A frozen MADE reuses its masked weights while gradients flow through it; unfreezing or an update
    of the weights recomputes them."""
    teacher, _ = _models(torch.float64)
    layer = teacher.masked_linears()[0]
    x, c = _inputs(4, 12, torch.float64)
    for p in teacher.parameters():
        p.requires_grad_(False)
    xg = x.clone().requires_grad_()
    teacher.log_prob(xg, c).sum().backward()
    cached = layer._cache
    assert cached is not None and xg.grad is not None
    teacher.log_prob(x, c)
    assert layer._cache is cached
    with torch.no_grad():
        layer.weight.mul_(1.5)
    lp = teacher.log_prob(x, c)
    assert layer._cache is not cached
    torch.testing.assert_close(layer._cache, layer.weight * layer.mask, rtol=0, atol=0)
    for p in teacher.parameters():
        p.requires_grad_(True)
    loss = -teacher.log_prob(x, c).mean()  # trainable again: the product is recomputed, with its graph
    loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    torch.testing.assert_close(-loss.detach(), lp.mean())
