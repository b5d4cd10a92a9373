"""A generic, resumable training loop, and maximum-likelihood training of flows on top of it.

:func:`fit` trains any module on in-memory tensors with a loss you pass (Adam, a learning-rate
schedule, seeded mini-batches, gradient clipping, best-epoch selection, early stopping). After every
epoch it writes, atomically, ``last.pt`` (everything needed to resume: an interrupted run ends
bit-for-bit where an uninterrupted one ends) and ``best.pt`` (the best weights so far); a NaN or inf
loss stops it with :class:`flows.errors.NonFiniteLossError` and leaves them as they were.
:func:`train_flow_mle` is the teacher's (and Flow I's) trainer; :class:`DiagonalGaussianBaseline` is
the density every flow should beat.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset
from tqdm.auto import tqdm

from .checkpoints import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    rng_state,
    seed_all,
    set_rng_state,
)
from .config import TrainConfig
from .device import resolve_device
from .errors import FlowsError, NonFiniteLossError
from .losses import nll_loss
from .optim import make_adam
from .serialization import atomic_torch_save

__all__ = [
    "FitResult",
    "fit",
    "train_flow_mle",
    "evaluate_nll",
    "DiagonalGaussianBaseline",
    "LossFn",
]

logger = logging.getLogger(__name__)

LossOutput = Tensor | tuple[Tensor, dict[str, Tensor]]
LossFn = Callable[[nn.Module, tuple[Tensor, ...]], LossOutput]
"""``loss_fn(model, batch) -> loss`` or ``(loss, components)``; ``batch`` is a tuple of tensors on the device."""


@dataclass
class FitResult:
    """The outcome of :func:`fit`.

    Attributes:
        best_epoch: 1-based epoch whose weights the model holds on return.
        best_metric: the monitored validation metric at that epoch.
        epochs_run: epochs completed in total (including those of earlier, resumed calls).
        stopped_early: whether early stopping ended the run.
        resumed_from: completed epochs found in the checkpoint at the start (0 for a fresh run).
        history: one dict of metrics per completed epoch (``epoch``, ``lr``, ``train_*``, ``val_*``...).
    """

    best_epoch: int
    best_metric: float
    epochs_run: int
    stopped_early: bool
    resumed_from: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total + 1, cycle_momentum=False
        )
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config.step_epochs * steps_per_epoch, gamma=config.step_gamma
        )
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(total, 1), gamma=1.0)


def _as_tensors(data: Sequence[Tensor], name: str) -> tuple[Tensor, ...]:
    tensors = tuple(torch.as_tensor(t) for t in data)
    if not tensors:
        raise FlowsError(f"{name}: no tensors given")
    n = len(tensors[0])
    if n == 0:
        raise FlowsError(f"{name}: no examples")
    if any(len(t) != n for t in tensors):
        raise FlowsError(f"{name}: tensors of different lengths {[len(t) for t in tensors]}")
    return tensors


def _split_loss(out: LossOutput) -> tuple[Tensor, dict[str, Tensor]]:
    if isinstance(out, tuple):
        return out[0], dict(out[1])
    return out, {}


def _batches(tensors: tuple[Tensor, ...], batch_size: int) -> list[tuple[Tensor, ...]]:
    n = len(tensors[0])
    return [tuple(t[i : i + batch_size] for t in tensors) for i in range(0, n, batch_size)]


def _mean_loss_validator(
    loss_fn: LossFn, val_tensors: tuple[Tensor, ...], batch_size: int, device: torch.device, loss_name: str
) -> Callable[[nn.Module], dict[str, float]]:
    def validate(model: nn.Module) -> dict[str, float]:
        sums: dict[str, float] = {}
        n_total = 0
        with torch.no_grad():
            for batch in _batches(val_tensors, batch_size):
                batch = tuple(t.to(device) for t in batch)
                loss, comps = _split_loss(loss_fn(model, batch))
                n = len(batch[0])
                n_total += n
                sums[f"val_{loss_name}"] = sums.get(f"val_{loss_name}", 0.0) + float(loss) * n
                for k, v in comps.items():
                    sums[f"val_{k}"] = sums.get(f"val_{k}", 0.0) + float(v) * n
        return {k: v / n_total for k, v in sums.items()}

    return validate


class EpochCallback(Protocol):
    def __call__(self, metrics: dict[str, float], epoch: int) -> None: ...


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    train_data: Sequence[Tensor],
    config: TrainConfig,
    checkpoint_dir: Path | str | None = None,
    *,
    val_data: Sequence[Tensor] | None = None,
    validate: Callable[[nn.Module], dict[str, float]] | None = None,
    monitor: str | None = None,
    loss_name: str = "loss",
    device: str | torch.device | None = None,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
    desc: str = "train",
) -> FitResult:
    """Train ``model`` by minimising ``loss_fn`` over mini-batches of ``train_data``.

    Each epoch: shuffled mini-batches (a DataLoader over the in-memory tensors whose generator is
    seeded from ``(config.seed, epoch)``), Adam steps with gradient clipping and the schedule stepped
    per batch, then validation; the weights with the lowest ``monitor`` metric are kept in ``best.pt``;
    ``last.pt`` (everything needed to resume) is replaced atomically; then ``on_epoch_end(metrics, epoch)``.
    Calling :func:`fit` again with the same ``checkpoint_dir`` resumes after the last completed epoch
    (or returns at once when the run had finished). On return the model holds the best weights.

    Args:
        model: the module to train (moved to ``device``).
        loss_fn: ``loss_fn(model, batch) -> loss | (loss, components)``, a scalar mean over the batch;
            components (scalars) are averaged and reported as ``train_<name>`` / ``val_<name>``.
        train_data: tensors of equal length (e.g. ``(x, context)``), kept on the CPU.
        config: hyperparameters.
        checkpoint_dir: where ``last.pt`` / ``best.pt`` live; None trains without checkpoints.
        val_data: tensors for the default validation (mean of ``loss_fn``, reported as ``val_<loss_name>``).
        validate: a custom validation ``validate(model) -> metrics`` (run under ``torch.no_grad`` in eval
            mode), used instead of ``val_data``.
        monitor: the metric that selects the best epoch and drives early stopping (lower is better);
            default ``val_<loss_name>``, or ``train_<loss_name>`` without validation.
        loss_name: the name of the loss in the metrics.
        device: "cpu", "cuda" or None (CUDA when present).
        on_epoch_end: called with the epoch's metrics (floats) and the 1-based epoch number.
        progress: show a tqdm bar per epoch (rate and ETA); silent when not a terminal.
        desc: the bar's label.

    Returns:
        A :class:`FitResult`.

    Raises:
        NonFiniteLossError: a training loss or validation metric was NaN or inf; ``last.pt`` and
            ``best.pt`` of the last completed epoch are left untouched.
        FlowsError: a checkpoint from a different configuration, or unreadable.
    """
    dev = resolve_device(device)
    train_tensors = _as_tensors(train_data, "train data")
    if validate is None and val_data is not None:
        validate = _mean_loss_validator(
            loss_fn, _as_tensors(val_data, "validation data"), config.eval_batch_size, dev, loss_name
        )
    if monitor is None:
        monitor = f"val_{loss_name}" if validate is not None else f"train_{loss_name}"

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    last_path = best_path = None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"

    model.to(dev)
    optimizer = make_adam(model, config)
    n_train = len(train_tensors[0])
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    scheduler = _make_scheduler(optimizer, config, steps_per_epoch)

    history: list[dict[str, float]] = []
    start_epoch = 0
    best_metric = math.inf
    best_epoch = 0
    bad_epochs = 0
    stopped_early = False
    best_state: dict[str, Tensor] | None = None

    if last_path is not None and last_path.exists():
        ckpt = load_checkpoint(last_path)
        saved_cfg = ckpt.get("config", {})
        diff = sorted(k for k, v in config.to_dict().items() if saved_cfg.get(k) != v)
        if diff:
            raise FlowsError(
                f"{last_path}: checkpoint was written with a different training config "
                f"({', '.join(f'{k}={saved_cfg.get(k)!r}' for k in diff)}); use a fresh checkpoint directory"
            )
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise FlowsError(f"{last_path}: checkpoint does not match the model ({str(exc).splitlines()[0]})") from exc
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = int(ckpt["epoch"])
        best_metric = float(ckpt["best_metric"])
        best_epoch = int(ckpt["best_epoch"])
        bad_epochs = int(ckpt["bad_epochs"])
        stopped_early = bool(ckpt["stopped_early"])
        history = [dict(h) for h in ckpt["history"]]
        set_rng_state(ckpt["rng"])
        logger.info("%s: resuming from %s after epoch %d", desc, last_path, start_epoch)
    else:
        seed_all(config.seed)
    resumed_from = start_epoch

    dataset = TensorDataset(*train_tensors)
    generator = torch.Generator()
    epoch = start_epoch
    while epoch < config.epochs and not stopped_early:
        t0 = time.perf_counter()
        generator.manual_seed(config.seed * 1_000_003 + epoch)
        sampler = BatchSampler(RandomSampler(dataset, generator=generator), config.batch_size, drop_last=False)
        loader = DataLoader(dataset, sampler=sampler, batch_size=None, generator=generator)
        model.train()
        sums: dict[str, float] = {}
        seen = 0
        bar = tqdm(
            loader,
            desc=f"{desc} {epoch + 1}/{config.epochs}",
            unit="batch",
            total=steps_per_epoch,
            disable=None if progress else True,
            leave=False,
        )
        for step, batch in enumerate(bar):
            batch = tuple(t.to(dev, non_blocking=True) for t in batch)
            loss, comps = _split_loss(loss_fn(model, batch))
            value = float(loss.detach())
            if not math.isfinite(value):
                bar.close()
                kept = f"last good checkpoint kept: {last_path}" if last_path is not None else "no checkpoint directory"
                raise NonFiniteLossError(
                    f"{desc}: non-finite loss ({value}) at epoch {epoch + 1}, step {step + 1}; {kept}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                norm = float(nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
                if not math.isfinite(norm):
                    bar.close()
                    kept = f"last good checkpoint kept: {last_path}" if last_path is not None else "no checkpoint directory"
                    raise NonFiniteLossError(
                        f"{desc}: non-finite gradient norm ({norm}) at epoch {epoch + 1}, step {step + 1}; {kept}"
                    )
            optimizer.step()
            scheduler.step()
            n = len(batch[0])
            seen += n
            sums[f"train_{loss_name}"] = sums.get(f"train_{loss_name}", 0.0) + value * n
            for k, v in comps.items():
                sums[f"train_{k}"] = sums.get(f"train_{k}", 0.0) + float(v) * n
            bar.set_postfix({loss_name: f"{value:.4g}"}, refresh=False)
        bar.close()
        metrics = {k: v / seen for k, v in sums.items()}
        metrics["lr"] = float(scheduler.get_last_lr()[0])
        if validate is not None:
            model.eval()
            with torch.no_grad():
                metrics.update({k: float(v) for k, v in validate(model).items()})
        if monitor not in metrics:
            raise FlowsError(f"{desc}: monitored metric {monitor!r} not among {sorted(metrics)}")
        current = metrics[monitor]
        if not math.isfinite(current):
            kept = f"last good checkpoint kept: {last_path}" if last_path is not None else "no checkpoint directory"
            raise NonFiniteLossError(f"{desc}: non-finite {monitor} ({current}) at epoch {epoch + 1}; {kept}")
        epoch += 1
        metrics["epoch_time_s"] = time.perf_counter() - t0
        if current < best_metric - config.min_delta:
            best_metric, best_epoch, bad_epochs = current, epoch, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if best_path is not None:
                atomic_torch_save({"model": best_state, "epoch": epoch, "metric": best_metric}, best_path)
        else:
            bad_epochs += 1
            if config.patience and bad_epochs >= config.patience:
                stopped_early = True
        metrics["best_" + monitor] = best_metric
        history.append({"epoch": float(epoch), **metrics})
        if last_path is not None:
            atomic_torch_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": config.to_dict(),
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "best_metric": best_metric,
                    "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs,
                    "stopped_early": stopped_early,
                    "history": history,
                    "rng": rng_state(),
                },
                last_path,
            )
        logger.info(
            "%s epoch %d/%d: %s",
            desc,
            epoch,
            config.epochs,
            ", ".join(f"{k}={v:.5g}" for k, v in metrics.items() if k != "epoch_time_s"),
        )
        if on_epoch_end is not None:
            on_epoch_end(dict(metrics), epoch)
        if stopped_early:
            logger.info("%s: early stopping after epoch %d (best epoch %d)", desc, epoch, best_epoch)

    # restore the best weights
    if best_state is None and best_path is not None and best_path.exists():
        best_state = load_checkpoint(best_path)["model"]
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(
        best_epoch=best_epoch,
        best_metric=best_metric,
        epochs_run=epoch,
        stopped_early=stopped_early,
        resumed_from=resumed_from,
        history=history,
    )


# ---------------------------------------------------------------------------------------------------
# maximum likelihood


class _FlowLike(Protocol):
    def log_prob(self, inputs: Tensor, context: Tensor | None = None) -> Tensor: ...


@torch.no_grad()
def evaluate_nll(
    flow: nn.Module,
    x: Tensor,
    context: Tensor | None = None,
    batch_size: int = 2048,
    device: str | torch.device | None = None,
    progress: bool = False,
    desc: str = "log-prob",
) -> float:
    """Mean negative log-likelihood ``-mean log p(x | c)`` in nats per example.

    Uses ``flow.log_prob`` (one pass for a MAF; D passes for an IAF student). Batched; the model is put
    in eval mode.

    Args:
        flow: a model with ``log_prob(inputs, context)``.
        x: ``(N, D)`` inputs.
        context: ``(N, C)`` conditions or None.
        batch_size: examples per pass.
        device: where to compute (default: the model's device).
        progress: show a progress bar over batches.
        desc: the bar's label.
    """
    if device is None:
        param = next(iter(flow.parameters()), None)
        dev = param.device if param is not None else torch.device("cpu")
    else:
        dev = resolve_device(device)
    flow.eval()
    total = 0.0
    n = len(x)
    starts = range(0, n, batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", disable=None if progress else True, leave=False):
        xb = x[i : i + batch_size].to(dev)
        cb = context[i : i + batch_size].to(dev) if context is not None else None
        total += float(-flow.log_prob(xb, context=cb).double().sum())
    return total / n


def train_flow_mle(
    flow: nn.Module,
    x_train: Tensor,
    c_train: Tensor | None,
    x_val: Tensor,
    c_val: Tensor | None,
    config: TrainConfig,
    checkpoint_dir: Path | str | None = None,
    *,
    device: str | torch.device | None = None,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
    desc: str = "flow",
) -> FitResult:
    """Train a (conditional) flow by maximum likelihood with :func:`fit`.

    Metrics per epoch: ``train_nll``, ``train_nll_per_dim``, ``val_nll``, ``val_nll_per_dim`` (nats per
    example and per dimension), ``lr``; the best epoch has the lowest ``val_nll``.

    Args:
        flow: a model with ``log_prob(inputs, context)``.
        x_train, c_train: training inputs ``(N, D)`` and conditions ``(N, C)`` (or None: unconditional).
        x_val, c_val: validation inputs and conditions.
        config: hyperparameters.
        checkpoint_dir: resumable checkpoints (see :func:`fit`).
        device, on_epoch_end, progress, desc: as in :func:`fit`.

    References:
        Papamakarios, Pavlakou, Murray, "Masked Autoregressive Flow for Density Estimation", arXiv:1705.07057.
    """
    dim = int(x_train.shape[1])
    conditional = c_train is not None

    def loss_fn(model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        loss = nll_loss(model, batch[0], batch[1] if conditional else None)  # type: ignore[arg-type]
        return loss, {"nll_per_dim": loss.detach() / dim}

    train = (x_train, c_train) if conditional else (x_train,)
    val = (x_val, c_val) if conditional else (x_val,)
    return fit(
        flow,
        loss_fn,
        train,  # type: ignore[arg-type]
        config,
        checkpoint_dir,
        val_data=val,  # type: ignore[arg-type]
        loss_name="nll",
        device=device,
        on_epoch_end=on_epoch_end,
        progress=progress,
        desc=desc,
    )


class DiagonalGaussianBaseline:
    """A diagonal Gaussian fitted by maximum likelihood: the density baseline a flow must beat.

    Fitted to the same (preprocessed) training inputs as the flow and scored on the same test inputs,
    so that its NLL is directly comparable with the flow's (nats per example).
    """

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def fit(self, x: Tensor | np.ndarray) -> DiagonalGaussianBaseline:
        """Fit per-dimension means and standard deviations (the MLE) to ``x`` ``(N, D)``."""
        arr = np.asarray(x.detach().cpu().numpy() if isinstance(x, Tensor) else x, dtype=np.float64)
        self.mean = arr.mean(axis=0)
        self.std = np.maximum(arr.std(axis=0), 1e-12)
        return self

    def log_prob(self, x: Tensor | np.ndarray) -> np.ndarray:
        """Per-example log-density ``(N,)`` in nats."""
        if self.mean is None or self.std is None:
            raise FlowsError("DiagonalGaussianBaseline: call fit() first")
        arr = np.asarray(x.detach().cpu().numpy() if isinstance(x, Tensor) else x, dtype=np.float64)
        zz = (arr - self.mean) / self.std
        return -0.5 * (zz**2).sum(axis=1) - np.log(self.std).sum() - 0.5 * arr.shape[1] * math.log(2 * math.pi)

    def nll(self, x: Tensor | np.ndarray) -> float:
        """Mean negative log-likelihood in nats per example."""
        return float(-self.log_prob(x).mean())
