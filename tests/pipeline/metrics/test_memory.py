"""PeakMemory: a peak in MB and the method that measured it."""

from __future__ import annotations

import math

import torch

from calodistill.pipeline.metrics.memory import PeakMemory


def test_peak_memory_on_cpu() -> None:
    with PeakMemory(torch.device("cpu")) as mem:
        block = torch.ones(4 * 2**20 // 4)  # 4 MB
        block += 1
    assert mem.method and ("RSS" in mem.method or "ru_maxrss" in mem.method)
    assert not math.isnan(mem.peak_mb) and mem.peak_mb >= 0
