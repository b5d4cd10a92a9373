"""CaloFlow II distillation: losses, the KL estimate, and a tiny teacher distilled into its student."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from calodistill.flows.config import DistillConfig, FlowConfig, TrainConfig
from calodistill.flows.distillation import (
    distill,
    distillation_step_loss,
    init_student_from_teacher,
    paired_max_error,
    sample_nll,
    student_local_trace,
    student_nll,
)
from calodistill.flows.errors import FlowsError, NonFiniteLossError
from calodistill.flows.losses import (
    distillation_loss,
    kl_student_teacher,
    squared_error,
)
from calodistill.flows.models import IAF, MAF, build_iaf_like, build_maf
from calodistill.flows.training import evaluate_nll


def _teacher(kind: str = "affine", n_blocks: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32) -> MAF:
    """A non-trivial tiny teacher that a student of the same size can represent exactly.

    Random weights everywhere, then the MADEs' input layers zeroed: each block's parameters depend
    on the condition only, so the teacher is an elementwise map given c and the student's ideal
    weights exist (its own input layers at zero, the rest equal to the teacher's).
    """
    torch.manual_seed(seed)
    cfg = FlowConfig(features=6, context_features=2, n_blocks=n_blocks, hidden_features=16, kind=kind,
                     num_bins=4, tail_bound=5.0, activation="tanh")
    teacher = build_maf(cfg).to(dtype)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for block in teacher.blocks():
            block.autoregressive_net.hidden_layers[0].weight.zero_()
    teacher.eval()
    return teacher


def _data(teacher: MAF, n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, 2, generator=g, dtype=next(teacher.parameters()).dtype)
    with torch.no_grad():
        x = teacher.sample(None, c, generator=g)
    return x, c


def _copy_into_student(teacher: MAF, student: IAF) -> None:
    """The exact solution for a :func:`_teacher`: the teacher's MADE weights in the student's cores."""
    with torch.no_grad():
        for block, core in zip(teacher.blocks(), student.cores()):
            core.autoregressive_net.load_state_dict(block.autoregressive_net.state_dict())


# ---------------------------------------------------------------------------------------------------
# losses


def test_squared_error_is_batch_mean_of_squared_norm() -> None:
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    assert float(squared_error(a, b)) == pytest.approx((5.0 + 9.0) / 2)
    with pytest.raises(ValueError, match="shapes"):
        squared_error(a, b[:, :1])


@pytest.mark.parametrize("kind", ["affine", "spline"])
def test_exact_student_has_zero_loss_and_zero_kl(kind: str) -> None:
    teacher = _teacher(kind, n_blocks=2, dtype=torch.float64)
    student = build_iaf_like(teacher)
    _copy_into_student(teacher, student)
    x, c = _data(teacher, 64, seed=1)
    with torch.no_grad():
        loss, comps = distillation_step_loss(teacher, student, x, c)
    assert float(loss) < 1e-18 and float(comps["loss_x"]) < 1e-20 and float(comps["loss_z"]) < 1e-20
    assert kl_student_teacher(student, teacher, c, n=128, batch_size=50) == pytest.approx(0.0, abs=1e-10)
    max_err, _ = paired_max_error(teacher, student, x, c)
    assert max_err < 1e-10
    # the student's exact (slow) log q equals the teacher's log p for this exact student
    assert student_nll(student, x, c, max_examples=16, batch_size=8, progress=False) == pytest.approx(
        evaluate_nll(teacher, x[:16], c[:16]), rel=1e-9
    )


def test_untrained_student_has_positive_loss_and_kl_and_components() -> None:
    teacher = _teacher("spline", n_blocks=2)
    student = build_iaf_like(teacher)
    x, c = _data(teacher, 256, seed=1)
    teacher.requires_grad_(False)  # as distill() does
    loss, comps = distillation_step_loss(teacher, student, x, c, beta=0.5, fully_guided=True)
    assert set(comps) == {"loss_x", "loss_z", "guided_x", "guided_z", "kl_z", "loss"}
    assert comps["guided_x"] >= comps["loss_x"] > 0 and comps["guided_z"] >= comps["loss_z"] > 0
    assert float(loss.detach()) == pytest.approx(0.5 * float(comps["guided_x"]) + 0.5 * float(comps["guided_z"]), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    # not fully guided: only the end points; beta weights the passes
    torch.manual_seed(3)
    _, plain = distillation_step_loss(teacher, student, x, c, beta=1.0, fully_guided=False)
    assert float(plain["loss"]) == pytest.approx(float(plain["loss_x"]), rel=1e-6)
    assert kl_student_teacher(student, teacher, c, n=512) > 0.05


@pytest.mark.parametrize("x_pass", ["chain", "local"])
def test_kl_z_is_the_z_pass_monte_carlo_kl_and_kl_weight_adds_it(x_pass: str) -> None:
    teacher = _teacher("spline", n_blocks=2, dtype=torch.float64)
    student = build_iaf_like(teacher).to(torch.float64)
    x, c = _data(teacher, 128, seed=1)
    teacher.requires_grad_(False)
    torch.manual_seed(7)
    base, comps = distillation_step_loss(teacher, student, x, c, x_pass=x_pass)
    torch.manual_seed(7)
    weighted, comps_w = distillation_step_loss(teacher, student, x, c, x_pass=x_pass, kl_weight=2.5)
    # the same noise by hand: z ~ N(0, I) is the step's only random draw
    torch.manual_seed(7)
    z = torch.randn_like(x)
    with torch.no_grad():
        x_s, logabsdet = student.inverse(z, c)
        by_hand = float((student.base_log_prob(z) - logabsdet - teacher.log_prob(x_s, c)).mean())
    assert float(comps["kl_z"]) == pytest.approx(by_hand, rel=1e-10, abs=1e-10)
    assert by_hand > 0.05  # an untrained student is measurably off
    assert float(weighted) == pytest.approx(float(base) + 2.5 * by_hand, rel=1e-10)
    assert float(comps_w["loss"]) == pytest.approx(float(weighted), rel=1e-12)
    weighted.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # an exact student: no KL to add
    exact = build_iaf_like(teacher).to(torch.float64)
    _copy_into_student(teacher, exact)
    with torch.no_grad():
        _, comps_exact = distillation_step_loss(teacher, exact, x, c, x_pass=x_pass, kl_weight=1.0)
    assert abs(float(comps_exact["kl_z"])) < 1e-10


def test_mean_reduction_and_params_weight() -> None:
    teacher = _teacher("spline", n_blocks=2)
    student = build_iaf_like(teacher)
    x, c = _data(teacher, 32, seed=1)
    t = teacher.forward_trace(x, c)
    s = student.inverse_trace(t.outputs, c)
    summed = float(squared_error(s.states[0], t.states[0]))
    assert float(squared_error(s.states[0], t.states[0], "mean")) == pytest.approx(summed / x.shape[1], rel=1e-6)
    _, states_only = distillation_loss((t, s), (t, s), beta=1.0, params_weight=0.0)
    _, both = distillation_loss((t, s), (t, s), beta=1.0, params_weight=1.0)
    params_sum = sum(float(squared_error(ps, pt)) for pt, ps in zip(t.params, s.params))
    assert float(both["guided_x"]) == pytest.approx(float(states_only["guided_x"]) + params_sum, rel=1e-5)
    _, mean = distillation_loss((t, s), (t, s), beta=1.0, reduction="mean")
    expected = sum(float(squared_error(a, b, "mean")) for a, b in zip(s.states + s.params, t.states + t.params))
    assert float(mean["guided_x"]) == pytest.approx(expected, rel=1e-5)
    assert float(mean["loss_x"]) == pytest.approx(summed, rel=1e-6)  # reported end points stay sums
    with pytest.raises(ValueError, match="reduction"):
        distillation_loss((t, s), (t, s), reduction="max")


@pytest.mark.parametrize("kind", ["affine", "spline"])
def test_init_from_teacher_copies_made_weights(kind: str) -> None:
    # for the tiny teacher (blocks independent of the inputs) the teacher's weights are the exact student
    teacher = _teacher(kind, n_blocks=2, dtype=torch.float64)
    student = build_iaf_like(teacher)
    x, c = _data(teacher, 64, seed=1)
    assert paired_max_error(teacher, student, x, c)[0] > 1e-3
    assert init_student_from_teacher(teacher, student)
    assert paired_max_error(teacher, student, x, c)[0] < 1e-10
    # different MADE sizes: nothing copied
    other = build_iaf_like(teacher, hidden_features=8)
    before = [p.clone() for p in other.parameters()]
    assert not init_student_from_teacher(teacher, other)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))


def test_local_x_pass_is_zero_for_exact_student_and_trains_each_block() -> None:
    teacher = _teacher("spline", n_blocks=3, dtype=torch.float64)
    student = build_iaf_like(teacher)
    x, c = _data(teacher, 32, seed=1)
    t = teacher.forward_trace(x, c)
    local = student_local_trace(student, t, c)
    assert len(local.states) == len(t.states) and len(local.params) == len(t.params)
    assert torch.equal(local.states[-1], t.states[-1])
    # each block's output depends only on its own weights: block 0's output is unchanged when block 1 changes
    with torch.no_grad():
        for q in student.cores()[1].parameters():
            q.add_(1.0)
    again = student_local_trace(student, t, c)
    assert torch.equal(again.states[0], local.states[0]) and not torch.allclose(again.states[1], local.states[1])
    _copy_into_student(teacher, student)
    with torch.no_grad():
        loss, comps = distillation_step_loss(teacher, student, x, c, x_pass="local")
    assert float(loss) < 1e-18 and float(comps["loss_x"]) < 1e-20


def test_distillation_loss_rejects_bad_beta_and_mismatched_traces() -> None:
    teacher = _teacher(n_blocks=2)
    student = build_iaf_like(teacher)
    x, c = _data(teacher, 8, seed=1)
    t = teacher.forward_trace(x, c)
    s = student.inverse_trace(t.outputs, c)
    with pytest.raises(ValueError, match="beta"):
        distillation_loss((t, s), (t, s), beta=1.5)
    short = s._replace(states=s.states[:-1])
    with pytest.raises(ValueError, match="states"):
        distillation_loss((t, short), (t, s))


# ---------------------------------------------------------------------------------------------------
# the distillation loop

TOLERANCE_RMS = 0.05  # rms of x_S − x given the teacher's z, in preprocessed units (x has std ≈ 1.5 here)


def _run_distill(tmp_path: Path, epochs: int, kind: str, n_blocks: int,
                 x_pass: str = "local") -> tuple[MAF, IAF, list[dict[str, float]], dict]:
    teacher = _teacher(kind, n_blocks)
    x, c = _data(teacher, 1024, seed=1)
    xv, cv = _data(teacher, 512, seed=2)
    torch.manual_seed(5)
    student = build_iaf_like(teacher)
    with torch.no_grad():
        _, before = distillation_step_loss(teacher, student, xv, cv)
    history: list[dict[str, float]] = []
    distill(
        teacher, student, x, c, xv, cv,
        TrainConfig(epochs=epochs, batch_size=32, lr=3e-2, patience=0, schedule="onecycle", seed=1),
        DistillConfig(kl_samples=2048, kl_batch_size=1024, init_from_teacher=False, x_pass=x_pass),  # from scratch
        tmp_path / "ckpt",
        on_epoch_end=lambda m, e: history.append(m),
        progress=False,
    )
    return teacher, student, history, {k: float(v) for k, v in before.items()}


@pytest.mark.parametrize("x_pass", ["chain", "local"])
def test_distillation_drives_losses_down_and_student_matches_teacher(tmp_path: Path, x_pass: str) -> None:
    teacher, student, history, before = _run_distill(tmp_path, epochs=12, kind="affine", n_blocks=1, x_pass=x_pass)
    xt, ct = _data(teacher, 512, seed=3)
    last = history[-1]
    # orders of magnitude: from the untrained student to the last epoch, on validation data
    assert last["val_loss_x"] < before["loss_x"] / 100, (before, last)
    assert last["val_loss_z"] < before["loss_z"] / 100, (before, last)
    assert all(math.isfinite(m["val_kl"]) for m in history)
    # the KL estimate is ≥ ~0 (up to Monte-Carlo noise) and falls from the first epoch
    assert min(m["val_kl"] for m in history) > -0.02
    assert history[0]["val_kl"] > 10 * max(abs(history[-1]["val_kl"]), 1e-3)
    # the selected student, given the teacher's z, reproduces the teacher's x
    max_err, rms = paired_max_error(teacher, student, xt, ct)
    assert rms < TOLERANCE_RMS * 2 and max_err < 1.5, (rms, max_err)
    # likelihoods: the student's exact NLL of data and of its own samples are close to the teacher's
    t_nll = evaluate_nll(teacher, xt, ct)
    s_nll = student_nll(student, xt, ct, max_examples=256, batch_size=128, progress=False)
    assert abs(s_nll - evaluate_nll(teacher, xt[:256], ct[:256])) < 0.05 * abs(t_nll) + 0.05
    assert math.isfinite(sample_nll(student, ct))


@pytest.mark.slow
def test_distillation_of_spline_teacher_reaches_tolerance(tmp_path: Path) -> None:
    teacher, student, history, before = _run_distill(tmp_path, epochs=40, kind="spline", n_blocks=2)
    last = history[-1]
    assert last["val_loss_x"] < before["loss_x"] / 100
    assert last["val_loss_z"] < before["loss_z"] / 100
    xt, ct = _data(teacher, 512, seed=3)
    _, rms = paired_max_error(teacher, student, xt, ct)
    assert rms < TOLERANCE_RMS


def test_distill_resume_equals_uninterrupted(tmp_path: Path) -> None:
    teacher = _teacher("affine", 2)
    x, c = _data(teacher, 128, seed=1)
    xv, cv = _data(teacher, 64, seed=2)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e-2, patience=0, seed=4)
    dcfg = DistillConfig(kl_samples=64)

    class Stop(Exception):
        pass

    def stop_at_1(m: dict[str, float], e: int) -> None:
        if e == 1:
            raise Stop

    torch.manual_seed(1)
    full = build_iaf_like(teacher)
    distill(teacher, full, x, c, xv, cv, cfg, dcfg, tmp_path / "a", progress=False)
    torch.manual_seed(1)
    part = build_iaf_like(teacher)
    with pytest.raises(Stop):
        distill(teacher, part, x, c, xv, cv, cfg, dcfg, tmp_path / "b", on_epoch_end=stop_at_1, progress=False)
    torch.manual_seed(77)
    resumed = build_iaf_like(teacher)
    res = distill(teacher, resumed, x, c, xv, cv, cfg, dcfg, tmp_path / "b", progress=False)
    assert res.resumed_from == 1 and res.epochs_run == 3
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(p.requires_grad for p in teacher.parameters())  # the teacher is unfrozen on return


def test_distill_nan_guard(tmp_path: Path) -> None:
    teacher = _teacher("affine", 1)
    x, c = _data(teacher, 64, seed=1)
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        distill(teacher, build_iaf_like(teacher), x, c, x, c,
                TrainConfig(epochs=3, batch_size=16, lr=1e30, schedule="constant", grad_clip=0),
                DistillConfig(kl_samples=16), tmp_path, progress=False)


def test_distill_config_rejects_bad_values() -> None:
    with pytest.raises(FlowsError, match="beta"):
        DistillConfig(beta=2.0)
    with pytest.raises(FlowsError, match="reduction"):
        DistillConfig(reduction="max")
    with pytest.raises(FlowsError, match="x_pass"):
        DistillConfig(x_pass="forced")
    with pytest.raises(FlowsError, match="params_weight"):
        DistillConfig(params_weight=-1.0)
    with pytest.raises(FlowsError, match="passes_per_epoch"):
        DistillConfig(passes_per_epoch=0)
    with pytest.raises(FlowsError, match="kl_weight"):
        DistillConfig(kl_weight=-0.5)
    with pytest.raises(FlowsError, match="kl_weight"):
        DistillConfig(kl_weight=float("nan"))


def test_passes_per_epoch_multiplies_steps(tmp_path: Path) -> None:
    teacher = _teacher("affine", 1)
    x, c = _data(teacher, 64, seed=1)
    steps: list[int] = []
    counting = build_iaf_like(teacher)
    original = counting.inverse_trace

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        if torch.is_grad_enabled():
            steps.append(1)
        return original(*args, **kwargs)

    counting.inverse_trace = counted  # type: ignore[method-assign]
    distill(teacher, counting, x, c, x[:16], c[:16], TrainConfig(epochs=1, batch_size=16, patience=0),
            DistillConfig(kl_samples=16, passes_per_epoch=3, x_pass="chain"), progress=False)
    assert len(steps) == 2 * 3 * 4  # two student passes per step, 3 passes of 4 batches
