"""The optimiser that training uses: Adam, fused where PyTorch can fuse it.

Kept apart from :mod:`flows.training` so that benchmarks step the same optimiser the training loop does.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import TrainConfig
from .transforms import MaskedLinear

__all__ = ["make_adam"]

logger = logging.getLogger(__name__)


def make_adam(model: nn.Module, config: TrainConfig) -> torch.optim.Adam:
    """Adam over the model's parameters, with PyTorch's fused kernel where it can run.

    The fused step updates every parameter in one kernel per tensor instead of a chain of small
    elementwise ops (on CPU ~8× faster for a quickstart-size flow, a fifth of a distillation step at
    one thread: docs/benchmarks.md); the same update up to float rounding. Parameters on a device or of
    a dtype the fused kernel does not take get the default implementation.
    """
    params = list(model.parameters())
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
                                 for p in params)
    if fused:
        try:
            optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError) as exc:  # an older torch or an unsupported device
            logger.debug("fused Adam unavailable (%s); default Adam", exc)
        else:
            # the fused kernel writes the parameters without bumping their version counters, which the
            # MADEs' cached masked weights are keyed on: drop those caches after every step
            masked = [m for m in model.modules() if isinstance(m, MaskedLinear)]
            if masked:
                optimizer.register_step_post_hook(lambda *_: [m.clear_cache() for m in masked])
            return optimizer
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
