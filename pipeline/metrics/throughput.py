"""Sampling throughput within a time budget, and the dense-matmul floors of sampling and training.

:class:`BudgetedTimer` times a call at increasing batches with :func:`~calodistill.pipeline.metrics.timing.time_calls`
and never lets one measurement exceed its budget: a batch that would not fit is replaced by the largest
of the 1-2-5 series that does, and says so. :func:`matmul_floor_call` is the student's dense matrix
products alone, the floor a sampler can approach; :func:`capture_matmuls` records the products a
training step executes (forward and backward) and :func:`matmul_replay_call` runs them alone, the floor
of that step.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .timing import time_calls

if TYPE_CHECKING:  # pragma: no cover
    from ...flows.fast import FastIAFSampler

__all__ = ["BudgetedTimer", "MatmulCall", "Timing", "capture_matmuls", "matmul_floor_call", "matmul_replay_call",
           "nice_batch_at_most"]

logger = logging.getLogger(__name__)


@dataclass
class Timing:
    """One measurement: seconds per call for each repeat at ``batch`` (the median is reported)."""

    batch: int
    seconds: list[float]
    warmup: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def ms_per_shower(self) -> float:
        return 1e3 * self.median_s / self.batch

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "repeats": len(self.seconds), "warmup": self.warmup,
                "median_s": self.median_s, "ms_per_shower": self.ms_per_shower,
                "seconds": self.seconds}


def nice_batch_at_most(limit: float) -> int:
    """Largest number of the 1-2-5 series not above ``limit`` (0 if ``limit`` < 1)."""
    if limit < 1:
        return 0
    best = 1
    decade = 1
    while decade <= limit:
        for m in (1, 2, 5):
            if m * decade <= limit:
                best = m * decade
        decade *= 10
    return best


class BudgetedTimer:
    """Times ``make_call(batch)`` at increasing batches, within ``budget_s`` per measurement.

    The per-shower time of the last measurement (taken at a smaller batch, so an over-estimate per
    shower for larger ones) decides whether the requested batch fits; if not, the largest 1-2-5 batch
    that fits is timed. Repeats shrink (down to 1) and warm-up calls are dropped to stay in budget.
    """

    def __init__(self, name: str, make_call: Callable[[int], Callable[[], Any]], device: torch.device,
                 budget_s: float, repeats: int, warmup: int) -> None:
        self.name = name
        self.make_call = make_call
        self.device = device
        self.budget_s = budget_s
        self.repeats = repeats
        self.warmup = warmup
        self.last: Timing | None = None
        self.cache: dict[int, Timing] = {}

    def measure(self, batch: int) -> tuple[Timing, str]:
        """``(timing, note)``: the timing is at ``timing.batch`` (≤ ``batch``); note says why if smaller."""
        if batch in self.cache:
            return self.cache[batch], ""
        note = ""
        target = batch
        per_shower = None if self.last is None else self.last.median_s / self.last.batch
        if per_shower is not None and per_shower * batch > self.budget_s:
            target = nice_batch_at_most(self.budget_s / per_shower)
            target = max(target, self.last.batch)  # type: ignore[union-attr]
            note = (f"batch {batch} exceeds the {self.budget_s:g} s budget (judged from batch "
                    f"{self.last.batch}); timed batch {target}")  # type: ignore[union-attr]
            if target in self.cache:
                return self.cache[target], note
        call = self.make_call(target)
        repeats, warmup = self.repeats, self.warmup
        if per_shower is not None:
            fits = int(self.budget_s // max(per_shower * target, 1e-12))
            repeats = max(1, min(repeats, fits))
            warmup = min(warmup, max(0, fits - repeats))
        else:  # first measurement: one call first to learn its cost
            first = time_calls(call, self.device, 1, 0)[0]
            fits = int(self.budget_s // max(first, 1e-12))
            repeats = max(1, min(repeats, fits))
            warmup = min(warmup, max(0, fits - repeats))
        logger.info("bench %s: batch %d, %d warm-up + %d repeats", self.name, target, warmup, repeats)
        timing = Timing(target, time_calls(call, self.device, repeats, warmup), warmup)
        logger.info("bench %s: batch %d: %.4g ms per shower", self.name, target, timing.ms_per_shower)
        self.cache[target] = timing
        if self.last is None or target >= self.last.batch:
            self.last = timing
        return timing, note


def matmul_floor_call(sampler: FastIAFSampler, batch: int, chunk: int | None,
                      device: torch.device) -> Callable[[], None]:
    """A call doing only the student's dense products at ``batch`` rows (in chunks of ``chunk``)."""
    rows = min(batch, chunk) if chunk else batch
    shapes = sampler.matmul_shapes(rows)
    weights: list[Tensor] = []
    if sampler.ctx_w is not None:
        weights.append(sampler.ctx_w)
    for blk in sampler.blocks:
        weights.append(blk.w_in)
        weights.extend(w for w, _ in blk.hidden)
        if blk.groups is not None:
            weights.extend(wg for _, _, _, wg, _ in blk.groups)
        else:
            weights.append(blk.w_out)
    gen = torch.Generator(device="cpu").manual_seed(1)
    inputs = {k: torch.randn(rows, k, generator=gen, dtype=sampler.dtype).to(device) for _, k, _ in shapes}
    outs = [torch.empty(rows, n, dtype=sampler.dtype, device=device) for _, _, n in shapes]
    n_chunks = math.ceil(batch / rows)
    last_rows = batch - (n_chunks - 1) * rows

    def call() -> None:
        with torch.inference_mode():
            for i in range(n_chunks):
                r = rows if i < n_chunks - 1 else last_rows
                prev: Tensor | None = None
                for (_, k, _), w, out in zip(shapes, weights, outs):
                    a = prev if prev is not None and prev.shape[1] == k else inputs[k]
                    torch.mm(a[:r], w, out=out[:r])
                    prev = out[:r]

    return call


@dataclass(frozen=True)
class MatmulCall:
    """One dense product ``a @ b`` of shapes ``(m, k) @ (k, n)`` (batched: ``batch`` of them), with the
    memory layout of each operand (``True``: column-major, i.e. a transposed view, as autograd passes)."""

    m: int
    k: int
    n: int
    batch: int = 1
    a_transposed: bool = False
    b_transposed: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n


def _column_major(t: Tensor) -> bool:
    return t.dim() >= 2 and t.stride(-2) == 1 and t.stride(-1) == t.shape[-2] and t.shape[-1] > 1


def capture_matmuls(fn: Callable[[], Any]) -> list[MatmulCall]:
    """The dense products (``mm``, ``addmm``, ``bmm``, ``baddbmm``) that ``fn()`` executes, forward and backward.

    Recorded at the dispatcher (a ``TorchDispatchMode``), so autograd's backward products are included.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    two = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2), aten.bmm.default: (0, 1),
           aten.baddbmm.default: (1, 2)}
    calls: list[MatmulCall] = []

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            if func in two:
                i, j = two[func]
                a, b = args[i], args[j]
                batch = a.shape[0] if a.dim() == 3 else 1
                calls.append(MatmulCall(int(a.shape[-2]), int(a.shape[-1]), int(b.shape[-1]), int(batch),
                                        _column_major(a), _column_major(b)))
            return func(*args, **(kwargs or {}))

    with _Recorder():
        fn()
    return calls


def matmul_replay_call(calls: list[MatmulCall], device: torch.device,
                       dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """A call doing only ``calls``' products, in order, into preallocated outputs (the same shapes and
    operand layouts): the dense-matmul floor of the step they were recorded from."""
    gen = torch.Generator(device="cpu").manual_seed(1)

    def operand(batch: int, rows: int, cols: int, transposed: bool) -> Tensor:
        shape = (rows, cols) if not transposed else (cols, rows)
        t = torch.randn((batch, *shape) if batch > 1 else shape, generator=gen, dtype=dtype).to(device)
        return t.transpose(-2, -1) if transposed else t

    jobs = []
    for c in calls:
        a = operand(c.batch, c.m, c.k, c.a_transposed)
        b = operand(c.batch, c.k, c.n, c.b_transposed)
        out = torch.empty((c.batch, c.m, c.n) if c.batch > 1 else (c.m, c.n), dtype=dtype, device=device)
        jobs.append((torch.bmm if c.batch > 1 else torch.mm, a, b, out))

    def call() -> None:
        with torch.inference_mode():
            for op, a, b, out in jobs:
                op(a, b, out=out)

    return call
