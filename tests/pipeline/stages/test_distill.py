"""Stage ``distill``: the warm start of a student wider than the teacher, and the distillation defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from calodistill.pipeline.config import build_config
from calodistill.pipeline.errors import CalodistillError
from calodistill.pipeline.stages.distill import DistillStageConfig, distill_student
from tests.pipeline.stages.test_train_teacher import tiny_dataset, tiny_teacher  # noqa: F401  (module fixtures)

TINY = {"train.epochs": 1, "distill.kl_samples": 16, "nll_subset": 4, "check_samples": 0,
        "teacher_check_samples": 0, "progress": False}


@pytest.mark.parametrize(("hidden", "warm"), [(0, 1.0), (12, 1.0), (4, 0.0)])
def test_student_width_decides_the_warm_start(tiny_teacher: Path, tiny_dataset: Path, tmp_path: Path,  # noqa: F811
                                              hidden: int, warm: float) -> None:
    # the tiny teacher's MADEs have 8 hidden units: equal (0) and wider (12) students start from its
    # weights, a narrower one (4) cannot
    metrics = distill_student(tiny_teacher, tiny_dataset, tmp_path / "student",
                              {**TINY, "student.hidden_features": hidden}, device="cpu")
    assert metrics["warm_started"] == warm
    assert metrics["student_parameters"] != metrics["teacher_parameters"] or hidden == 0
    # both models' exact test NLL on the same nll_subset showers
    assert metrics["nll_subset"] == 4 and metrics["teacher_test_nll"] == metrics["teacher_test_nll_subset"]
    rel = (metrics["test_nll"] - metrics["teacher_test_nll"]) / abs(metrics["teacher_test_nll"])
    assert metrics["test_nll_rel_diff"] == pytest.approx(rel) and metrics["teacher_test_nll_all"] < float("inf")


def test_distill_defaults_use_the_noise_side_x_pass() -> None:
    cfg = build_config(DistillStageConfig, ({"distill.noise_weight": 2.5}, "test"))
    assert cfg.distill.noise_weight == 2.5 and cfg.distill.x_pass == "local"
    assert DistillStageConfig().distill.noise_weight > 0


def test_rerun_with_another_teacher_is_refused(tiny_teacher: Path, tiny_dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    import json
    import shutil

    import torch

    from calodistill.flows.serialization import load_flow, save_flow

    out = tmp_path / "student"
    distill_student(tiny_teacher, tiny_dataset, out, TINY, device="cpu")
    record = json.loads((out / "provenance.json").read_text())
    assert record["stage"] == "distill" and len(record["teacher_digest"]) == 16
    before = {p.name: p.read_bytes() for p in out.glob("*.json")}
    # the same teacher copied elsewhere is the same teacher: the rerun resumes
    same = shutil.copytree(tiny_teacher, tmp_path / "same_teacher")
    distill_student(same, tiny_dataset, out, TINY, device="cpu")
    # a teacher with other weights is not
    other = shutil.copytree(tiny_teacher, tmp_path / "other_teacher")
    flow = load_flow(other / "teacher.pt")
    with torch.no_grad():
        next(flow.parameters()).add_(0.1)
    save_flow(other / "teacher.pt", flow, flow.config)
    with pytest.raises(CalodistillError) as exc:
        distill_student(other, tiny_dataset, out, TINY, device="cpu")
    text = str(exc.value)
    assert "holds a distill run made from other inputs or settings" in text and "\n" not in text
    assert f"teacher {tiny_teacher.resolve()} (digest " in text and f"vs {other.resolve()} (digest " in text
    assert {p.name: p.read_bytes() for p in out.glob("*.json") if p.name != "metrics.json"} == {
        k: v for k, v in before.items() if k != "metrics.json"}
    with pytest.raises(CalodistillError, match="is the --teacher directory"):
        distill_student(tiny_teacher, tiny_dataset, tiny_teacher, TINY, device="cpu")
