"""Distilling the MAF teacher into the IAF student (CaloFlow II), on the machinery of :mod:`flows.training`.

Direction convention: ``forward`` is data → noise, ``inverse`` is noise → data. The frozen teacher is
only run forward (``forward_trace``, its fast direction), the student only inverse (``inverse_trace``,
its fast direction), so every step costs one pass of each model per half-step:

- x-pass: ``z_T = teacher(x_data | c)``; ``x_S = student⁻¹(z_T | c)``; squared error ``x_S`` vs ``x_data``;
- z-pass: ``z ~ N(0, I)``; ``x_S = student⁻¹(z | c)``; ``z_T = teacher(x_S | c)``; squared error ``z_T`` vs ``z``;
- fully guided: the same on every intermediate state and MADE output (see :mod:`flows.losses`);
- with the teacher-forced ("local") x-pass, by default also each student block's error measured on the
  teacher block's noise side (:func:`local_noise_side_error`): the squared error of the states weighs an
  error inside a narrow peak of the density like one in its tails, while the likelihood of data depends
  on the error times the teacher's ``∂z/∂x``.

Each epoch a Monte-Carlo KL(student ‖ teacher) estimate on validation conditions, computed without
gradients and with the same noise every epoch (common random numbers), picks the best checkpoint.

The student's exact likelihood of data, log q(x), needs its slow forward direction (solved voxel by
voxel, :mod:`flows.student_density`): :func:`student_nll` evaluates it on a subset, batched.
:func:`sample_nll` scores the student's own samples in one pass.

References:
    C. Krause, D. Shih, "CaloFlow II: Even Faster and Still Accurate Generation of Calorimeter Showers
    with Normalizing Flows", arXiv:2110.11377.
    A. van den Oord et al., "Parallel WaveNet: Fast High-Fidelity Speech Synthesis", arXiv:1711.10433
    (the optional KL term, ``kl_weight``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import DistillConfig, TrainConfig
from .device import resolve_device
from .errors import FlowsError
from .losses import distillation_loss, kl_student_teacher, squared_error
from .models import IAF, FlowTrace
from .student_density import FastIAFDensity, exact_log_prob
from .training import EpochCallback, FitResult, fit

__all__ = [
    "distill",
    "init_student_from_teacher",
    "student_local_trace",
    "local_noise_side_error",
    "distillation_step_loss",
    "student_nll",
    "sample_nll",
    "paired_max_error",
]

logger = logging.getLogger(__name__)


def distillation_step_loss(
    teacher: nn.Module,
    student: nn.Module,
    x: Tensor,
    context: Tensor,
    beta: float = 0.5,
    fully_guided: bool = True,
    reduction: str = "sum",
    params_weight: float = 1.0,
    x_pass: str = "chain",
    noise_weight: float = 0.0,
    kl_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One CaloFlow II loss evaluation on a batch: the x-pass and the z-pass, fast directions only.

    The x-pass teacher trace runs without gradients (the teacher is frozen and its x-pass outputs are
    targets); the z-pass teacher trace keeps the graph because its targets depend on the student's
    samples ``x_S`` (gradients reach the student through the teacher).

    Args:
        teacher: the frozen MAF (``forward_trace``).
        student: the IAF (``inverse_trace``).
        x: ``(N, D)`` data-side values (preprocessed).
        context: ``(N, C)`` conditions.
        beta, fully_guided, reduction, params_weight: see :func:`flows.losses.distillation_loss`.
        x_pass: "chain" or "local" (see :class:`flows.config.DistillConfig`); with "local" the x-pass components
            (``loss_x``, ``guided_x``) are those of the teacher-forced blocks.
        noise_weight: with ``x_pass="local"``, add ``β·noise_weight·noise_x``
            (:func:`local_noise_side_error`) to the loss; ignored by the chained x-pass.

    Returns:
        ``(loss, components)`` as :func:`flows.losses.distillation_loss`, plus ``noise_x`` when the
        noise-side term is used (``loss`` then includes it).
    """
    with torch.no_grad():
        teacher_x = teacher.forward_trace(x, context)
    if x_pass == "local":
        student_x = student_local_trace(student, teacher_x, context)
    else:
        student_x = student.inverse_trace(teacher_x.outputs, context)
    z = torch.randn_like(x)
    student_z = student.inverse_trace(z, context)
    teacher_z = teacher.forward_trace(student_z.outputs, context)  # gradients flow into the student only
    loss, comps = distillation_loss((teacher_x, student_x), (teacher_z, student_z), beta=beta,
                                    fully_guided=fully_guided, reduction=reduction, params_weight=params_weight)
    if noise_weight > 0 and x_pass == "local":
        noise_x = local_noise_side_error(teacher, teacher_x, student_x, reduction)
        loss = loss + beta * noise_weight * noise_x
        comps["noise_x"] = noise_x.detach()
    # the z-pass's own Monte-Carlo KL(student ‖ teacher): both log-densities come with the fast passes
    kl_z = (student.base_log_prob(z) - student_z.logabsdet
            - teacher.base_log_prob(teacher_z.outputs) - teacher_z.logabsdet).mean()
    comps["kl_z"] = kl_z.detach()
    if kl_weight > 0:
        loss = loss + kl_weight * kl_z
    comps["loss"] = loss.detach()
    return loss, comps


def local_noise_side_error(teacher: nn.Module, teacher_trace: FlowTrace, student_local: FlowTrace,
                           reduction: str = "sum") -> Tensor:
    """Squared error of the teacher-forced student blocks measured on each block's noise side.

    Student block k's output ``x̂_k`` (its estimate of the teacher's data-side state ``s_k``) is mapped
    through teacher block k's elementwise map with the teacher's parameters at ``s_k`` (held fixed), and
    compared with the teacher's output of that block. To first order this is the data-side error
    scaled by the teacher's elementwise derivative ``∂z/∂x``: the errors that move the student's noise
    (hence its likelihood of data) the most are weighted most, where the plain squared error on
    ``x̂_k − s_k`` weighs an error inside a narrow peak of the density as little as one in its tails.
    """
    blocks, perms = teacher.blocks(), teacher.permutations()
    total = teacher_trace.outputs.new_zeros(())
    for k, block in enumerate(blocks):
        mapped, _ = block._elementwise_forward(student_local.states[k], teacher_trace.params[k])
        target = teacher_trace.states[k + 1]
        if k < len(perms):
            target, _ = perms[k].inverse(target)
        total = total + squared_error(mapped, target, reduction)
    return total


def student_local_trace(student: nn.Module, teacher_trace: FlowTrace, context: Tensor | None) -> FlowTrace:
    """The student's blocks run on the teacher's states (teacher forcing), in the teacher's trace order.

    Student block k gets the teacher's state on its noise side (``teacher_trace.states[k + 1]``, the
    permutation undone) and returns its data-side output as ``states[k]`` and its MADE output as
    ``params[k]``; ``states[-1]`` is the teacher's z. Compared with the teacher's trace by
    :func:`flows.losses.trace_squared_error`, every block is a separate regression whose targets do not
    depend on the other blocks, so all blocks learn at once instead of waiting for the blocks nearer
    the noise to become right. ``logabsdet`` is the sum of the blocks' log-determinants (not that of
    one pass).
    """
    cores, perms = student.cores(), student.permutations()
    states: list[Tensor] = []
    params: list[Tensor] = []
    total = teacher_trace.outputs.new_zeros(teacher_trace.outputs.shape[0])
    for k, core in enumerate(cores):
        h = teacher_trace.states[k + 1]
        if k < len(perms):
            h, _ = perms[k].inverse(h)
        p = core.params(h, context)
        out, logabsdet = core._elementwise_forward(h, p)
        states.append(out)
        params.append(p)
        total = total + logabsdet
    states.append(teacher_trace.states[-1])
    return FlowTrace(states[0], total, states, params)


@torch.no_grad()
def init_student_from_teacher(teacher: nn.Module, student: nn.Module) -> bool:
    """Copy each teacher block's MADE weights into the matching student core (a warm start).

    The student's block k computes its spline parameters from its noise-side state, the teacher's
    from its data-side state; with the teacher's weights the student starts as the exact inverse of
    a teacher whose blocks moved the data little, and close to it otherwise — far closer than from a
    random initialisation (measured: docs/experiments.md).

    A student whose MADEs are *wider* than the teacher's (same number of hidden layers) is warm-started
    by embedding: every weight matrix gets the teacher's weights in its leading block (the teacher's
    hidden units), zeros where a teacher unit or the output would read a new unit, and keeps its own
    random initialisation for the new units' incoming weights. The new units then contribute nothing,
    so the student's map at the start is exactly the one of the equal-width warm start, and they learn
    from the first step (their outgoing weights get gradients). This relies on nflows' deterministic
    MADE degrees, under which the first ``H_T`` of ``H_S > H_T`` hidden units have the teacher's
    degrees; the masks are checked.

    Returns:
        Whether the weights were copied (False, with a log message, when the block counts, the numbers
        of hidden layers or the masks differ, or the student is narrower than the teacher).
    """
    blocks, cores = teacher.blocks(), student.cores()
    if len(blocks) != len(cores):
        logger.info("init_from_teacher: %d teacher blocks vs %d student blocks; random initialisation",
                    len(blocks), len(cores))
        return False
    plans = []
    for block, core in zip(blocks, cores):
        t_state, s_state = block.autoregressive_net.state_dict(), core.autoregressive_net.state_dict()
        if t_state.keys() != s_state.keys() or any(
            t_state[k].dim() != s_state[k].dim() or any(a > b for a, b in zip(t_state[k].shape, s_state[k].shape))
            for k in t_state
        ):
            logger.info("init_from_teacher: the student's MADEs cannot hold the teacher's (different layers, or "
                        "narrower); random initialisation")
            return False
        for k in t_state:
            if k.endswith(("mask", "degrees")):
                lead = tuple(slice(0, n) for n in t_state[k].shape)
                if not torch.equal(s_state[k][lead].to(t_state[k].dtype), t_state[k]):
                    logger.info("init_from_teacher: the student's MADE %s differs from the teacher's on the teacher's "
                                "units; random initialisation", k)
                    return False
        plans.append((t_state, core))
    for t_state, core in plans:
        params = dict(core.autoregressive_net.named_parameters())
        for k, value in t_state.items():
            if k not in params:  # masks and degrees: buffers, already equal on the leading block
                continue
            target = params[k]
            if target.shape == value.shape:
                target.copy_(value)
            elif value.dim() == 2:  # (out, in): teacher block, zero reads of new inputs, new rows untouched
                out_t, in_t = value.shape
                target[:out_t, :in_t] = value
                target[:out_t, in_t:] = 0.0
            else:  # a bias: the teacher's units first, the new units keep theirs
                target[: value.shape[0]] = value
    return True


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
        train_config: optimisation settings (see :class:`flows.config.TrainConfig`).
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

    if cfg.init_from_teacher:
        # a resumed run overwrites these weights with its checkpoint's, so this is safe to repeat
        init_student_from_teacher(teacher, student)

    def loss_fn(model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        return distillation_step_loss(teacher, model, batch[0], batch[1], cfg.beta, cfg.fully_guided,
                                      cfg.reduction, cfg.params_weight, cfg.x_pass, cfg.noise_weight,
                                      cfg.kl_weight)

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
        train_data = (x_train, c_train)
        if cfg.passes_per_epoch > 1:
            train_data = (x_train.repeat(cfg.passes_per_epoch, 1), c_train.repeat(cfg.passes_per_epoch, 1))
        return fit(
            student,
            loss_fn,
            train_data,
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

    For an IAF this is the slow direction, solved voxel by voxel per block
    (:class:`flows.student_density.FastIAFDensity`; equal to nflows' D-pass ``log_prob``), on the first
    ``max_examples`` examples only (all when None), batched, with a progress bar.
    """
    n = len(x) if max_examples is None else min(len(x), int(max_examples))
    if n == 0:
        raise FlowsError("student_nll: no examples")
    dev = resolve_device(device) if device is not None else next(student.parameters()).device
    student.eval()
    density = FastIAFDensity(student) if isinstance(student, IAF) else None
    total = 0.0
    starts = range(0, n, batch_size)
    for i in tqdm(starts, desc="student log q(x)", unit="batch", disable=None if progress else True, leave=False):
        xb = x[i : min(i + batch_size, n)].to(dev)
        cb = context[i : min(i + batch_size, n)].to(dev)
        log_q = density.log_prob(xb, cb) if density is not None else exact_log_prob(student, xb, cb)
        total += float(-log_q.double().sum())
    return total / n


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
