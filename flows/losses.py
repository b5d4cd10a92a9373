"""Named training losses: maximum likelihood for the teacher, CaloFlow II distillation for the student.

Direction convention (as everywhere in flows/): ``forward`` is data → noise, ``inverse`` is noise → data.
The MAF teacher is fast forward, the IAF student fast inverse. Distillation uses each model only in its
fast direction.

By default (``reduction="sum"``) every squared error is summed over all non-batch dimensions and
averaged over the batch, so that ``L_x`` is "the mean over the batch of ‖x_S − x‖²" exactly as written
in CaloFlow II. ``reduction="mean"`` averages over the elements instead, so that each fully-guided term
(a state of D values, or a MADE output of D·(3·bins − 1) spline parameters) weighs the same whatever
its size; ``params_weight`` scales the MADE-output terms against the state terms.

References:
    G. Papamakarios, T. Pavlakou, I. Murray, "Masked Autoregressive Flow for Density Estimation",
    NeurIPS 2017, arXiv:1705.07057.
    C. Krause, D. Shih, "CaloFlow II: Even Faster and Still Accurate Generation of Calorimeter Showers
    with Normalizing Flows", arXiv:2110.11377.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor
from torch.nn import functional as F

if TYPE_CHECKING:  # pragma: no cover
    from .models import FlowTrace

__all__ = [
    "nll_loss",
    "squared_error",
    "trace_squared_error",
    "distillation_loss",
    "kl_student_teacher",
]

logger = logging.getLogger(__name__)


class _LogProbModel(Protocol):
    def log_prob(self, inputs: Tensor, context: Tensor | None = None) -> Tensor: ...


class _SamplingModel(Protocol):
    def sample_and_log_prob(self, context: Tensor) -> tuple[Tensor, Tensor]: ...


def nll_loss(flow: _LogProbModel, inputs: Tensor, context: Tensor | None = None) -> Tensor:
    """Negative log-likelihood in nats per example, averaged over the batch (maximum likelihood).

    Minimising it fits the flow's density p(x | c) to the data (forward KL between data and model up to
    the data entropy), the training objective of MAF.

    Args:
        flow: any model with ``log_prob(inputs, context) -> (N,)``.
        inputs: ``(N, D)`` data-side values.
        context: ``(N, C)`` conditions, or None.

    Returns:
        Scalar ``-mean(log p(x | c))``.

    References:
        Papamakarios, Pavlakou, Murray, "Masked Autoregressive Flow for Density Estimation", arXiv:1705.07057.
    """
    return -flow.log_prob(inputs, context=context).mean()


REDUCTIONS = ("sum", "mean")


def squared_error(a: Tensor, b: Tensor, reduction: str = "sum") -> Tensor:
    """``mean over the batch of ‖a − b‖²``, the squared error summed over every non-batch dimension.

    Args:
        a, b: tensors of equal shape, batch first.
        reduction: "sum" (‖a − b‖², batch mean) or "mean" (mean over every element).

    Returns:
        A scalar tensor.
    """
    if a.shape != b.shape:
        raise ValueError(f"squared_error: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    if reduction not in REDUCTIONS:
        raise ValueError(f"squared_error: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    # one fused kernel each way (mse_loss and its backward) instead of sub, pow, sum and their backward
    if reduction == "mean":
        return F.mse_loss(a, b, reduction="mean")
    return F.mse_loss(a, b, reduction="sum") / a.shape[0]


def trace_squared_error(
    teacher_trace: FlowTrace, student_trace: FlowTrace, reduction: str = "sum", params_weight: float = 1.0
) -> Tensor:
    """Fully guided squared error: every block's state and every MADE output, block by block.

    ``states[k]`` of the student pairs with ``states[k]`` of the teacher (``states[0]`` data side,
    ``states[-1]`` noise side), ``params[k]`` with ``params[k]`` (the MADE output of block k).

    Args:
        teacher_trace: the teacher's ``forward_trace``.
        student_trace: the student's ``inverse_trace``.
        reduction: "sum" or "mean" over each term's elements (see :func:`squared_error`).
        params_weight: weight of the MADE-output terms.

    Returns:
        ``Σ_k ‖s_k^S − s_k^T‖² + w·Σ_k ‖θ_k^S − θ_k^T‖²``, each term a batch mean.

    References:
        Krause, Shih, CaloFlow II, arXiv:2110.11377, section 3 ("fully guided" teacher–student training).
    """
    if len(teacher_trace.states) != len(student_trace.states):
        raise ValueError(
            f"trace_squared_error: {len(teacher_trace.states)} teacher states vs {len(student_trace.states)} student states"
        )
    if len(teacher_trace.params) != len(student_trace.params):
        raise ValueError(
            f"trace_squared_error: {len(teacher_trace.params)} teacher MADE outputs vs {len(student_trace.params)} student ones"
        )
    total = teacher_trace.states[0].new_zeros(())
    for s_t, s_s in zip(teacher_trace.states, student_trace.states):
        if s_s is s_t:  # a state the student took from the teacher (teacher forcing): zero error
            continue
        total = total + squared_error(s_s, s_t, reduction)
    if params_weight > 0:
        for p_t, p_s in zip(teacher_trace.params, student_trace.params):
            total = total + params_weight * squared_error(p_s, p_t, reduction)
    return total


def distillation_loss(
    x_pass: tuple[FlowTrace, FlowTrace],
    z_pass: tuple[FlowTrace, FlowTrace],
    beta: float = 0.5,
    fully_guided: bool = True,
    reduction: str = "sum",
    params_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CaloFlow II teacher–student loss: ``(1 − β)·L_z + β·L_x``.

    - x-pass: ``z_T = teacher(x_data | c)``; ``x_S = student.inverse(z_T | c)``; ``L_x = mean ‖x_S − x‖²``.
      Pass ``(teacher.forward_trace(x, c), student.inverse_trace(z_T, c))``.
    - z-pass: ``z ~ N(0, I)``; ``x_S = student.inverse(z | c)``; ``z_T = teacher(x_S | c)``;
      ``L_z = mean ‖z_T − z‖²``. Pass ``(teacher.forward_trace(x_S, c), student.inverse_trace(z, c))``.
    - fully guided: each pass's term becomes the squared error summed over every intermediate state and
      every MADE output (:func:`trace_squared_error`), which includes the plain ``L_x`` / ``L_z`` terms.

    Args:
        x_pass: ``(teacher_trace, student_trace)`` of the x-pass.
        z_pass: ``(teacher_trace, student_trace)`` of the z-pass.
        beta: weight of the x-pass, in [0, 1].
        fully_guided: use every state and MADE output, not only the end points.
        reduction: "sum" or "mean" over each term's elements (see :func:`squared_error`); the reported
            ``loss_x`` / ``loss_z`` are always sums (‖·‖², batch means) so they compare across settings.
        params_weight: weight of the MADE-output terms in the fully guided sums.

    Returns:
        ``(loss, components)``; components (detached) are ``loss_x`` (‖x_S − x‖², data end of the x-pass),
        ``loss_z`` (‖z_T − z‖², noise end of the z-pass), ``guided_x`` / ``guided_z`` (the fully guided
        sums, equal to ``loss_x`` / ``loss_z`` when not fully guided) and ``loss``.

    References:
        Krause, Shih, "CaloFlow II: Even Faster and Still Accurate Generation of Calorimeter Showers with
        Normalizing Flows", arXiv:2110.11377.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"distillation_loss: beta must be in [0, 1], got {beta}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"distillation_loss: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if params_weight < 0:
        raise ValueError(f"distillation_loss: params_weight must be >= 0, got {params_weight}")
    teacher_x, student_x = x_pass
    teacher_z, student_z = z_pass
    with torch.set_grad_enabled(torch.is_grad_enabled() and not fully_guided):  # reported only, if guided
        loss_x = squared_error(student_x.states[0], teacher_x.states[0])
        loss_z = squared_error(teacher_z.states[-1], student_z.states[-1])
    if fully_guided:
        guided_x = trace_squared_error(teacher_x, student_x, reduction, params_weight)
        guided_z = trace_squared_error(teacher_z, student_z, reduction, params_weight)
    elif reduction == "mean":
        guided_x = squared_error(student_x.states[0], teacher_x.states[0], "mean")
        guided_z = squared_error(teacher_z.states[-1], student_z.states[-1], "mean")
    else:
        guided_x, guided_z = loss_x, loss_z
    loss = (1.0 - beta) * guided_z + beta * guided_x
    components = {
        "loss_x": loss_x.detach(),
        "loss_z": loss_z.detach(),
        "guided_x": guided_x.detach(),
        "guided_z": guided_z.detach(),
        "loss": loss.detach(),
    }
    return loss, components


@torch.no_grad()
def kl_student_teacher(
    student: _SamplingModel,
    teacher: _LogProbModel,
    context: Tensor,
    n: int | None = None,
    batch_size: int = 1024,
) -> float:
    """Monte-Carlo estimate of KL(q_student ‖ p_teacher) = E_{x~q}[log q(x|c) − log p(x|c)], in nats.

    Each student sample comes with its exact log q from one fast pass (``sample_and_log_prob``); the
    teacher scores it in one fast pass (``log_prob``). No gradients. The estimate is ≥ 0 in expectation
    (noisy for small ``n``).

    Args:
        student: a model with ``sample_and_log_prob(context) -> (x, log_q)``, one sample per context row.
        teacher: a model with ``log_prob(x, context)``.
        context: ``(M, C)`` conditions; rows are cycled to ``n`` samples.
        n: number of samples (default ``M``).
        batch_size: samples per pass.

    Returns:
        The mean of ``log q − log p`` over the samples.

    References:
        Krause, Shih, CaloFlow II, arXiv:2110.11377 (KL monitored to pick the student's epoch).
    """
    n = len(context) if n is None else int(n)
    if n <= 0 or len(context) == 0:
        raise ValueError("kl_student_teacher: need at least one sample and one context row")
    total = 0.0
    done = 0
    index = torch.arange(n, device=context.device) % len(context)
    while done < n:
        ctx = context[index[done : done + batch_size]]
        x, log_q = student.sample_and_log_prob(ctx)
        log_p = teacher.log_prob(x, context=ctx)
        total += float((log_q - log_p).double().sum())
        done += len(ctx)
    value = total / n
    if not math.isfinite(value):
        logger.warning("kl_student_teacher: non-finite estimate %s", value)
    return value
