"""Distilling the MAF teacher into the IAF student (CaloFlow II), on the machinery of :mod:`flows.training`.

Direction convention: ``forward`` is data → noise, ``inverse`` is noise → data. The frozen teacher is
only run forward (``forward_trace``, its fast direction), the student only inverse (``inverse_trace``,
its fast direction), so every step costs one pass of each model per half-step:

- x-pass: ``z_T = teacher(x_data | c)``; ``x_S = student⁻¹(z_T | c)``; squared error ``x_S`` vs ``x_data``;
- z-pass: ``z ~ N(0, I)``; ``x_S = student⁻¹(z | c)``; ``z_T = teacher(x_S | c)``; squared error ``z_T`` vs ``z``;
- fully guided: the same on every intermediate state and MADE output (see :mod:`flows.losses`).

Each epoch a Monte-Carlo KL(student ‖ teacher) estimate on validation conditions, computed without
gradients and with the same noise every epoch (common random numbers), picks the best checkpoint.

The student's exact likelihood of data, log q(x), needs its slow forward direction (D sequential
passes): :func:`student_nll` evaluates it on a subset, batched, with a progress bar.
:func:`sample_nll` scores the student's own samples in one pass.

References:
    C. Krause, D. Shih, "CaloFlow II: Even Faster and Still Accurate Generation of Calorimeter Showers
    with Normalizing Flows", arXiv:2110.11377.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flows.errors import FlowsError
from flows.losses import distillation_loss, kl_student_teacher
from flows.training import EpochCallback, FitResult, TrainConfig, evaluate_nll, fit, resolve_device

__all__ = [
    "DistillConfig",
    "distill",
    "distillation_step_loss",
    "student_nll",
    "sample_nll",
    "paired_max_error",
]

logger = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """Distillation-specific settings (the optimisation ones are a :class:`TrainConfig`).

    Attributes:
        beta: weight of the x-pass in ``(1 − β)·L_z + β·L_x``.
        fully_guided: add the squared errors of every intermediate state and MADE output.
        kl_samples: student samples per KL(student ‖ teacher) estimate (one per validation condition,
            cycled).
        kl_batch_size: samples per pass of the KL estimate.
        kl_seed: seed of the KL estimate's noise (the same every epoch).
    """

    beta: float = 0.5
    fully_guided: bool = True
    kl_samples: int = 2000
    kl_batch_size: int = 1000
    kl_seed: int = 12345

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise FlowsError(f"distill config: beta must be in [0, 1], got {self.beta}")
        if self.kl_samples < 1 or self.kl_batch_size < 1:
            raise FlowsError("distill config: kl_samples and kl_batch_size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields."""
        return dataclasses.asdict(self)


def distillation_step_loss(
    teacher: nn.Module,
    student: nn.Module,
    x: Tensor,
    context: Tensor,
    beta: float = 0.5,
    fully_guided: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One CaloFlow II loss evaluation on a batch: the x-pass and the z-pass, fast directions only.

    Args:
        teacher: the frozen MAF (``forward_trace``).
        student: the IAF (``inverse_trace``).
        x: ``(N, D)`` data-side values (preprocessed).
        context: ``(N, C)`` conditions.
        beta, fully_guided: see :func:`flows.losses.distillation_loss`.

    Returns:
        ``(loss, components)`` as :func:`flows.losses.distillation_loss`.
    """
    with torch.no_grad():
        teacher_x = teacher.forward_trace(x, context)
    student_x = student.inverse_trace(teacher_x.outputs, context)
    z = torch.randn_like(x)
    student_z = student.inverse_trace(z, context)
    teacher_z = teacher.forward_trace(student_z.outputs, context)  # gradients flow into the student only
    return distillation_loss((teacher_x, student_x), (teacher_z, student_z), beta=beta, fully_guided=fully_guided)


def distill(
    teacher: nn.Module,
    student: nn.Module,
    x_train: Tensor,
    c_train: Tensor,
    x_val: Tensor,
    c_val: Tensor,
    train_config: TrainConfig,
    config: DistillConfig | None = None,
    checkpoint_dir: Path | str | None = None,
    *,
    device: str | torch.device | None = None,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
    desc: str = "distill",
) -> FitResult:
    """Train ``student`` to reproduce the frozen ``teacher`` (CaloFlow II), resumably.

    Metrics per epoch: ``train_loss``, ``train_loss_x``, ``train_loss_z``, ``train_guided_x``,
    ``train_guided_z``, the same on the validation split (``val_*``), ``val_kl`` (the KL(student ‖
    teacher) estimate in nats per shower, which selects the best epoch and drives early stopping) and
    ``lr``.

    Args:
        teacher: a trained MAF with ``forward_trace`` and ``log_prob``; frozen (its parameters'
            ``requires_grad`` are restored on return) and kept in eval mode.
        student: an IAF with ``inverse_trace`` and ``sample_and_log_prob``, e.g.
            ``flows.models.build_iaf_like(teacher)``.
        x_train, c_train: preprocessed training data and conditions.
        x_val, c_val: validation data and conditions (the KL estimate uses ``c_val``).
        train_config: optimisation settings (see :class:`TrainConfig`).
        config: distillation settings.
        checkpoint_dir: resumable checkpoints of the student (see :func:`flows.training.fit`).
        device, on_epoch_end, progress, desc: as in :func:`flows.training.fit`.

    Returns:
        The :class:`FitResult`; the student holds the weights of the epoch with the lowest KL.

    References:
        Krause, Shih, "CaloFlow II", arXiv:2110.11377.
    """
    cfg = config or DistillConfig()
    dev = resolve_device(device)
    teacher.to(dev)
    teacher.eval()
    requires_grad = [p.requires_grad for p in teacher.parameters()]
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        return distillation_step_loss(teacher, model, batch[0], batch[1], cfg.beta, cfg.fully_guided)

    val_batches = [
        (x_val[i : i + train_config.eval_batch_size], c_val[i : i + train_config.eval_batch_size])
        for i in range(0, len(x_val), train_config.eval_batch_size)
    ]
    kl_context = c_val.to(dev)

    def validate(model: nn.Module) -> dict[str, float]:
        fork_devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(cfg.kl_seed)
            sums: dict[str, float] = {}
            for xb, cb in val_batches:
                _, comps = loss_fn(model, (xb.to(dev), cb.to(dev)))
                for k, v in comps.items():
                    sums[f"val_{k}"] = sums.get(f"val_{k}", 0.0) + float(v) * len(xb)
            metrics = {k: v / len(x_val) for k, v in sums.items()}
            metrics["val_kl"] = kl_student_teacher(model, teacher, kl_context, cfg.kl_samples, cfg.kl_batch_size)
        return metrics

    try:
        return fit(
            student,
            loss_fn,
            (x_train, c_train),
            train_config,
            checkpoint_dir,
            validate=validate,
            monitor="val_kl",
            loss_name="loss",
            device=dev,
            on_epoch_end=on_epoch_end,
            progress=progress,
            desc=desc,
        )
    finally:
        for p, flag in zip(teacher.parameters(), requires_grad):
            p.requires_grad_(flag)


def student_nll(
    student: nn.Module,
    x: Tensor,
    context: Tensor,
    max_examples: int | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """Exact NLL of data under the student, ``-mean log q(x | c)``, in nats per example.

    For an IAF this is the slow direction (D sequential passes per batch), so it runs on the first
    ``max_examples`` examples only (all when None), batched, with a progress bar.
    """
    n = len(x) if max_examples is None else min(len(x), int(max_examples))
    if n == 0:
        raise FlowsError("student_nll: no examples")
    return evaluate_nll(
        student, x[:n], context[:n], batch_size=batch_size, device=device, progress=progress, desc="student log q(x)"
    )


@torch.no_grad()
def sample_nll(
    student: nn.Module, context: Tensor, batch_size: int = 1000, device: str | torch.device | None = None
) -> float:
    """``-mean log q(x_S | c)`` over one student sample per condition row (one fast pass per batch)."""
    dev = resolve_device(device) if device is not None else next(student.parameters()).device
    student.eval()
    total = 0.0
    for i in range(0, len(context), batch_size):
        _, log_q = student.sample_and_log_prob(context[i : i + batch_size].to(dev))
        total += float(-log_q.double().sum())
    return total / len(context)


@torch.no_grad()
def paired_max_error(teacher: nn.Module, student: nn.Module, x: Tensor, context: Tensor) -> tuple[float, float]:
    """How well the student reproduces the teacher given the teacher's noise.

    ``z_T = teacher(x | c)``, ``x_S = student⁻¹(z_T | c)``; returns ``(max |x_S − x|, rms(x_S − x))``.
    """
    teacher.eval()
    student.eval()
    z = teacher.forward_trace(x, context).outputs
    x_s = student.inverse_trace(z, context).outputs
    diff = (x_s - x).double()
    return float(diff.abs().max()), float(math.sqrt(float(diff.pow(2).mean())))
