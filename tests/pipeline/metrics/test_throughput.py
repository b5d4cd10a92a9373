"""The budgeted timer (a batch that does not fit is replaced, never extrapolated) and the matmul floors."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch

from calodistill.pipeline.metrics.throughput import (
    BudgetedTimer,
    MatmulCall,
    Timing,
    capture_matmuls,
    matmul_floor_call,
    matmul_replay_call,
    nice_batch_at_most,
)


@pytest.mark.parametrize(("limit", "batch"),
                         [(0.5, 0), (1, 1), (3.9, 2), (7, 5), (10, 10), (499, 200), (10_000, 10_000)])
def test_nice_batch_at_most(limit: float, batch: int) -> None:
    assert nice_batch_at_most(limit) == batch


def test_timing_median() -> None:
    t = Timing(batch=4, seconds=[0.4, 0.1, 0.2], warmup=1)
    assert t.median_s == 0.2 and t.ms_per_shower == pytest.approx(50.0)
    assert t.to_dict()["repeats"] == 3


def test_budgeted_timer_replaces_a_batch_that_does_not_fit() -> None:
    per_shower = 1e-4  # a fake call that takes 0.1 ms per shower

    def make_call(batch: int) -> Callable[[], None]:
        return lambda: time.sleep(per_shower * batch)

    timer = BudgetedTimer("fake", make_call, torch.device("cpu"), budget_s=0.05, repeats=3, warmup=1)
    small, note = timer.measure(10)
    assert small.batch == 10 and note == ""
    big, note = timer.measure(100_000)  # 10 s > 0.05 s budget: the largest 1-2-5 batch that fits instead
    assert 10 <= big.batch < 100_000 and "exceeds the 0.05 s budget" in note and f"timed batch {big.batch}" in note
    assert timer.measure(10) == (small, "")  # cached


def test_matmul_floor_call_runs_the_students_shapes() -> None:
    from calodistill.flows.config import FlowConfig
    from calodistill.flows.fast import FastIAFSampler
    from calodistill.flows.models import build_iaf_like, build_maf

    torch.manual_seed(0)
    student = build_iaf_like(build_maf(FlowConfig(features=6, context_features=2, n_blocks=2, hidden_features=8,
                                                  kind="spline", num_bins=4)))
    sampler = FastIAFSampler(student, chunk_size=4)
    for chunk in (None, 4):
        matmul_floor_call(sampler, 10, chunk, torch.device("cpu"))()  # no error: the shapes chain


def test_capture_matmuls_records_forward_and_backward_products() -> None:
    w = torch.randn(10, 5, requires_grad=True)
    x = torch.randn(3, 5, requires_grad=True)

    def step() -> None:
        y = torch.nn.functional.linear(x, w, torch.zeros(10))
        (y * y).sum().backward()

    calls = capture_matmuls(step)
    # forward (3, 5) @ (5, 10), backward: grad_x = g (3, 10) @ w (10, 5), grad_w = gᵀ (10, 3) @ x (3, 5)
    assert sorted((c.m, c.k, c.n) for c in calls) == [(3, 5, 10), (3, 10, 5), (10, 3, 5)]
    assert next(c for c in calls if (c.m, c.k, c.n) == (3, 5, 10)).b_transposed  # wᵀ is a transposed view
    assert sum(c.flops for c in calls) == 2 * 3 * (3 * 5 * 10)
    assert MatmulCall(2, 3, 4, batch=5).flops == 2 * 5 * 2 * 3 * 4
    call = matmul_replay_call([*calls, MatmulCall(2, 3, 4, batch=5, a_transposed=True)], torch.device("cpu"))
    call()
