"""Wall-clock timing of sampling: seconds per call, synchronised with CUDA, and ms per shower.

One clock for every caller: the benchmark stage (:func:`time_calls`, with statistics and a budget),
the distill stage's sampling-time metrics (:func:`time_sampling`) and the evaluate stage's per-batch table
(:func:`time_per_shower`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...flows.device import resolve_device, synchronize
from ..data.bundle import ModelBundle

__all__ = ["DEFAULT_TIMING_BATCHES", "time_calls", "time_per_shower", "time_sampling", "timed_call"]

logger = logging.getLogger(__name__)

DEFAULT_TIMING_BATCHES: tuple[int, ...] = (1, 100, 10_000)


def timed_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds that one call of ``fn`` takes on ``device`` (queued CUDA work is waited for on both sides)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    On CUDA each call is timed with CUDA events between synchronisations; on CPU with
    ``time.perf_counter``.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    out: list[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            out.append(start.elapsed_time(end) / 1e3)
        else:
            out.append(timed_call(fn, device))
    return out


def time_sampling(
    model_dir: Path,
    batch: int,
    device: str | None = None,
    repeats: int = 3,
    seed: int = 0,
    energy_range_mev: tuple[float, float] = (1_000.0, 100_000.0),
) -> float:
    """Median wall time per shower (ms) of ``ShowerGenerator.sample`` at a fixed batch.

    One warm-up call (at most 16 showers), then ``repeats`` timed calls of ``batch`` showers with
    log-uniform incident energies in ``energy_range_mev``; the median per-shower time is returned.
    Times Flow I + Flow II + the inverse preprocessing (what a user of ``generate`` waits for).

    Args:
        model_dir: a teacher or student model directory (opened as a :class:`ModelBundle`).
        batch: showers per timed call.
        device: torch device (default: CUDA when present, else CPU).
        repeats: timed calls.
        seed: energies and sampling seed.
        energy_range_mev: incident-energy range.
    """
    dev = resolve_device(device)
    gen = ModelBundle.open(model_dir).generator(dev)
    rng = np.random.default_rng(seed)
    lo, hi = np.log(energy_range_mev[0]), np.log(energy_range_mev[1])
    energies = np.exp(rng.uniform(lo, hi, size=batch))
    torch.manual_seed(seed)
    gen.sample(energies[: min(16, batch)], batch_size=batch, device=str(dev))
    times = [timed_call(lambda: gen.sample(energies, batch_size=batch, device=str(dev)), dev)
             for _ in range(max(1, repeats))]
    return float(np.median(times)) * 1000.0 / batch


def time_per_shower(
    generator: Any,
    incident_energy: np.ndarray,
    batch_sizes: tuple[int, ...] = DEFAULT_TIMING_BATCHES,
    device: str | None = None,
    max_seconds: float = 60.0,
    seed: int = 0,
) -> dict[int, float]:
    """Wall-clock sampling time per shower (ms) at each batch size, one generator call per size.

    A warm-up call at batch 1 comes first; a size whose expected duration (from the largest batch timed so
    far, probing ten times larger batches while they fit) exceeds ``max_seconds`` is skipped and absent
    from the result. CUDA work is synchronised before reading the
    clock. (The benchmark stage repeats this with statistics and a matmul floor.)

    Args:
        generator: an object with ``sample(e_inc_mev, batch_size=..., device=...)``.
        incident_energy: energies (MeV) to draw the conditions from.
        batch_sizes: showers per call.
        device: torch device.
        max_seconds: time budget of one call.
        seed: seeds the choice of energies and the samples.

    Returns:
        ``{batch_size: ms per shower}``.
    """
    dev = resolve_device(device)
    rng = np.random.default_rng(seed)

    def call(n: int) -> float:
        e = rng.choice(np.asarray(incident_energy, dtype=np.float64), n, replace=True)
        with torch.no_grad():
            return timed_call(lambda: generator.sample(e, batch_size=n, seed=seed, device=str(dev)), dev)

    out: dict[int, float] = {}
    measured, per_shower = 1, call(1)
    for bs in sorted(int(b) for b in batch_sizes):
        # A linear estimate from a much smaller batch overrates batched models (the per-call overhead
        # dominates at batch 1): probe ten times larger batches while they fit in the budget.
        while per_shower * bs > max_seconds and measured * 10 < bs and per_shower * measured * 10 <= max_seconds:
            measured *= 10
            per_shower = call(measured) / measured
        if per_shower * bs > max_seconds:
            logger.info("timing: batch %d skipped (expected %.0f s > %.0f s budget)", bs, per_shower * bs, max_seconds)
            continue
        seconds = call(bs)
        measured, per_shower = bs, seconds / bs
        out[bs] = 1e3 * per_shower
    return out
