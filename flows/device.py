"""The one device resolver: what ``device=None`` / ``"auto"`` / ``"cpu"`` / ``"cuda[:N]"`` means everywhere.

``None`` and ``"auto"`` pick CUDA when torch sees a GPU, else the CPU; asking for CUDA without one is an
error (never a silent fall-back to the CPU, which would make a GPU benchmark a CPU one).
"""

from __future__ import annotations

import torch

from .errors import FlowsError

__all__ = ["describe_device", "resolve_device", "synchronize"]


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
