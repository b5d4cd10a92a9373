"""Peak memory of a block of code: the CUDA allocator's peak, or the growth of the process's peak RSS on CPU.

On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU: the peak resident
set (``VmHWM``) reset through ``/proc/self/clear_refs`` where Linux allows it, else ``ru_maxrss`` growth
(a lower bound). :attr:`PeakMemory.method` says which was used.
"""

from __future__ import annotations

import torch

__all__ = ["PeakMemory"]


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory growth of a code block: CUDA allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.peak_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - allocated before"
            return self
        self.base_rss = _proc_status_kb("VmRSS")
        reset = False
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            reset = True
        except OSError:
            pass
        if self.base_rss is not None and reset:
            self.method = "peak RSS (VmHWM, reset via /proc/self/clear_refs) - RSS before"
        else:
            import resource

            self.base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "ru_maxrss growth (lower bound: the process peak is not reset)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.method.startswith("peak RSS"):
            hwm = _proc_status_kb("VmHWM")
            self.peak_mb = float("nan") if hwm is None else (hwm - self.base_rss) / 1024
        else:
            import resource

            self.peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base_rss) / 1024
