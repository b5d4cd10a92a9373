"""The one device resolver: what ``device=None`` / ``"auto"`` / ``"cpu"`` / ``"cuda[:N]"`` means everywhere.

``None`` and ``"auto"`` pick CUDA when torch sees a GPU, else the CPU; asking for CUDA without one is an
error (never a silent fall-back to the CPU, which would make a GPU benchmark a CPU one).
:func:`available_cpus` counts the CPUs this process may actually use (affinity, cgroup quota), which
``os.cpu_count()`` does not, and :func:`torch_threads` shares them between concurrent stages.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .errors import FlowsError

__all__ = ["available_cpus", "describe_device", "resolve_device", "synchronize", "torch_threads"]

_CGROUP = Path("/sys/fs/cgroup")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a :class:`torch.device`.

    Args:
        device: ``None`` or ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``
            or a :class:`torch.device`.

    Raises:
        FlowsError: ``device: ...`` for an unknown name, or CUDA asked for where torch sees none.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise FlowsError(f"device: must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise FlowsError(f"device: must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FlowsError(f"device: {device} requested but torch sees no CUDA device")
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (a no-op on the CPU); call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_device(device: str | torch.device | None = None) -> str:
    """``"cpu"`` or ``"cuda:0 (NVIDIA H200)"``: the resolved device with its product name, for tags and logs."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


def _cgroup_cpu_limit(root: Path = _CGROUP, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (quota / period), or None when unlimited or unreadable.

    cgroup v2: ``cpu.max`` ("max 100000" or "200000 100000") of the process's own cgroup, else the root's;
    cgroup v1: ``cpu/cpu.cfs_quota_us`` (−1: none) over ``cpu/cpu.cfs_period_us``.
    """
    candidates: list[tuple[Path, Path | None]] = []
    try:
        for line in proc_cgroup.read_text().splitlines():
            hier, _, path = line.partition(":")[2].partition(":")
            if hier == "" and path:  # the v2 entry: "0::/path"
                candidates.append((root / path.lstrip("/") / "cpu.max", None))
    except OSError:
        pass
    candidates += [(root / "cpu.max", None), (root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us")]
    for quota_file, period_file in candidates:
        try:
            if period_file is None:
                quota, _, period = quota_file.read_text().strip().partition(" ")
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
        except OSError:
            continue
        if quota in ("max", "-1") or not period:
            return None
        try:
            q, p = float(quota), float(period)
        except ValueError:
            return None
        return q / p if q > 0 and p > 0 else None
    return None


def available_cpus() -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup CPU quota where one is readable.

    A fractional quota rounds down (at least 1): a thread more than the quota allows is throttled.
    """
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.floor(limit)))
    return max(1, n)


def torch_threads(concurrent: int = 1) -> int:
    """torch intra-op threads for one of ``concurrent`` stages sharing this process's CPUs (at least 1).

    More threads than free cores make OpenMP's spinning barriers collapse (measured: docs/benchmarks.md).
    """
    return max(1, available_cpus() // max(1, int(concurrent)))
