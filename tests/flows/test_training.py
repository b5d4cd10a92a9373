"""The generic training loop: resume, NaN guard, early stopping, schedules, MLE and the Gaussian baseline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from calodistill.flows.config import TrainConfig
from calodistill.flows.errors import FlowsError, NonFiniteLossError
from calodistill.flows.losses import nll_loss
from calodistill.flows.optim import make_adam
from calodistill.flows.training import (
    DiagonalGaussianBaseline,
    FitResult,
    evaluate_nll,
    fit,
    train_flow_mle,
)


class TinyConditionalGaussian(nn.Module):
    """x | c ~ N(mu(c), diag sigma(c)^2) with a small MLP (with dropout, to exercise the RNG state)."""

    def __init__(self, dim: int = 3, context: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(context, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 2 * dim))

    def log_prob(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        mu, log_sigma = self.net(context).chunk(2, dim=1)
        z = (inputs - mu) * torch.exp(-log_sigma)
        return (-0.5 * z**2 - log_sigma - 0.5 * math.log(2 * math.pi)).sum(dim=1)


def _data(n: int = 200, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, 2, generator=g)
    x = torch.stack([c[:, 0] * 2 + 1, c[:, 1] - c[:, 0], 0.5 * c[:, 0] * c[:, 1]], dim=1)
    x = x + 0.3 * torch.randn(n, 3, generator=g)
    return x, c


def _loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return nll_loss(model, batch[0], batch[1])  # type: ignore[arg-type]


CFG = dict(epochs=4, batch_size=32, lr=1e-2, schedule="onecycle", patience=0, seed=7, progress=False)


def _cfg(**kw: object) -> TrainConfig:
    base = {k: v for k, v in CFG.items() if k != "progress"}
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step"])
def test_resume_equals_uninterrupted(tmp_path: Path, schedule: str) -> None:
    x, c = _data()
    xv, cv = _data(64, seed=1)
    cfg = _cfg(schedule=schedule, step_epochs=1)

    torch.manual_seed(123)
    full = TinyConditionalGaussian()
    res_full = fit(full, _loss, (x, c), cfg, tmp_path / "full", val_data=(xv, cv), progress=False)

    def interrupt_after_two(metrics: dict[str, float], epoch: int) -> None:
        if epoch == 2:
            raise _Interrupt

    torch.manual_seed(123)
    part = TinyConditionalGaussian()
    with pytest.raises(_Interrupt):
        fit(part, _loss, (x, c), cfg, tmp_path / "part", val_data=(xv, cv), on_epoch_end=interrupt_after_two, progress=False)
    torch.manual_seed(999)  # a different process state: everything must come from the checkpoint
    np.random.seed(5)
    resumed = TinyConditionalGaussian()
    seen: list[int] = []
    res_part = fit(
        resumed,
        _loss,
        (x, c),
        cfg,
        tmp_path / "part",
        val_data=(xv, cv),
        on_epoch_end=lambda m, e: seen.append(e),
        progress=False,
    )
    assert res_part.resumed_from == 2 and seen == [3, 4]
    assert res_full.epochs_run == res_part.epochs_run == 4
    assert res_full.best_epoch == res_part.best_epoch
    def strip(history: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in history]

    assert strip(res_full.history) == strip(res_part.history)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    # the final checkpoints agree too, and load with weights_only=True
    last_full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    last_part = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    for k in last_full["model"]:
        assert torch.equal(last_full["model"][k], last_part["model"][k])
    assert torch.equal(last_full["rng"]["torch"], last_part["rng"]["torch"])


def test_finished_run_returns_without_training(tmp_path: Path) -> None:
    x, c = _data()
    cfg = _cfg(epochs=2)
    model = TinyConditionalGaussian()
    res1 = fit(model, _loss, (x, c), cfg, tmp_path, val_data=_data(32, 1), progress=False)
    calls: list[int] = []
    model2 = TinyConditionalGaussian()
    res2 = fit(model2, _loss, (x, c), cfg, tmp_path, val_data=_data(32, 1), on_epoch_end=lambda m, e: calls.append(e), progress=False)
    assert calls == [] and res2.resumed_from == 2 and res2.best_epoch == res1.best_epoch
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_with_different_config_is_refused(tmp_path: Path) -> None:
    x, c = _data()
    fit(TinyConditionalGaussian(), _loss, (x, c), _cfg(epochs=1), tmp_path, progress=False)
    with pytest.raises(FlowsError, match=r"different training config \(lr=0.01\)"):
        fit(TinyConditionalGaussian(), _loss, (x, c), _cfg(epochs=1, lr=1e-3), tmp_path, progress=False)


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    x, c = _data()
    cfg = _cfg(epochs=5)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    calls = {"n": 0}

    def poisoned(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        if model.training:
            calls["n"] += 1
            if calls["n"] == 2 * steps_per_epoch + 3:  # epoch 3, step 3
                return nll_loss(model, batch[0], batch[1]) * float("nan")  # type: ignore[arg-type]
        return _loss(model, batch)

    snapshots: dict[int, dict[str, Tensor]] = {}
    model = TinyConditionalGaussian()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 3, step 3; last good checkpoint kept"):
        fit(
            model,
            poisoned,
            (x, c),
            cfg,
            tmp_path,
            val_data=_data(32, 1),
            on_epoch_end=lambda m, e: snapshots.__setitem__(e, {k: v.clone() for k, v in model.state_dict().items()}),
            progress=False,
        )
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and len(last["history"]) == 2
    for k, v in last["model"].items():
        assert torch.isfinite(v).all()
        assert torch.equal(v, snapshots[2][k])
    assert (tmp_path / "best.pt").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_huge_learning_rate_is_caught(tmp_path: Path) -> None:
    x, c = _data()
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        fit(TinyConditionalGaussian(), _loss, (x, c), _cfg(lr=1e30, schedule="constant", grad_clip=0), tmp_path, progress=False)


def test_early_stopping_keeps_best(tmp_path: Path) -> None:
    x, c = _data()
    # a validation metric that improves for 2 epochs then gets worse: patience 2 stops at epoch 4
    values = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0])
    states: dict[int, dict[str, Tensor]] = {}
    model = TinyConditionalGaussian()
    res = fit(
        model,
        _loss,
        (x, c),
        _cfg(epochs=8, patience=2),
        tmp_path,
        validate=lambda m: {"val_score": next(values)},
        monitor="val_score",
        on_epoch_end=lambda m, e: states.__setitem__(e, {k: v.clone() for k, v in model.state_dict().items()}),
        progress=False,
    )
    assert isinstance(res, FitResult)
    assert res.stopped_early and res.epochs_run == 4 and res.best_epoch == 2 and res.best_metric == 2.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, states[2][k])
    # resuming a stopped run does not train further
    res2 = fit(TinyConditionalGaussian(), _loss, (x, c), _cfg(epochs=8, patience=2), tmp_path, validate=lambda m: {"val_score": 0.0}, monitor="val_score", progress=False)
    assert res2.epochs_run == 4 and res2.stopped_early


def test_train_flow_mle_reports_per_dim_and_beats_baseline() -> None:
    torch.manual_seed(0)
    x, c = _data(600)
    xv, cv = _data(200, seed=1)
    xt, ct = _data(400, seed=2)
    metrics: list[dict[str, float]] = []
    model = TinyConditionalGaussian()
    res = train_flow_mle(
        model, x, c, xv, cv, _cfg(epochs=15, lr=2e-2), None, on_epoch_end=lambda m, e: metrics.append(m), progress=False
    )
    assert len(metrics) == res.epochs_run == 15
    for m in metrics:
        assert {"train_nll", "train_nll_per_dim", "val_nll", "val_nll_per_dim", "lr"} <= set(m)
        assert m["val_nll_per_dim"] == pytest.approx(m["val_nll"] / 3, rel=1e-6)
    assert metrics[-1]["train_nll"] < metrics[0]["train_nll"]
    test_nll = evaluate_nll(model, xt, ct, batch_size=64)
    baseline = DiagonalGaussianBaseline().fit(x).nll(xt)
    assert test_nll < baseline - 0.5  # the conditional model uses c, the baseline cannot


def test_diagonal_gaussian_baseline_matches_scipy() -> None:
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    x = rng.normal([1.0, -2.0], [0.5, 3.0], size=(1000, 2))
    base = DiagonalGaussianBaseline().fit(x)
    expected = -norm.logpdf(x, x.mean(0), x.std(0)).sum(1).mean()
    assert base.nll(x) == pytest.approx(expected, rel=1e-10)
    assert base.nll(torch.from_numpy(x)) == pytest.approx(expected, rel=1e-10)


def test_bad_config_names_the_field() -> None:
    with pytest.raises(FlowsError, match="schedule: must be one of"):
        TrainConfig(schedule="linear")
    with pytest.raises(FlowsError, match="epochs: must be an integer >= 1"):
        TrainConfig(epochs=0)


def test_make_adam_is_fused_on_cpu_and_keeps_the_masked_weight_cache_fresh() -> None:
    """The fused step does not bump the parameters' version counters, which the MADE's masked-weight
    cache is keyed on: ``make_adam`` clears the cache after each step, so inference sees the new weights."""
    from calodistill.flows.config import FlowConfig
    from calodistill.flows.models import build_maf
    from calodistill.flows.transforms import MaskedLinear

    torch.manual_seed(0)
    flow = build_maf(FlowConfig(features=5, context_features=2, n_blocks=1, hidden_features=8, kind="affine"))
    opt = make_adam(flow, TrainConfig(lr=0.1))
    assert opt.defaults["fused"] is True
    x, c = torch.randn(16, 5), torch.randn(16, 2)
    with torch.no_grad():
        flow.log_prob(x, c)  # fills the caches
    nll_loss(flow, x, c).backward()
    opt.step()
    layers = [m for m in flow.modules() if isinstance(m, MaskedLinear)]
    with torch.no_grad():
        for m in layers:
            torch.testing.assert_close(m.masked_weight(), m.weight * m.mask)
