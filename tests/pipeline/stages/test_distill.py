"""Stage ``distill``: the warm start of a student wider than the teacher, and the distillation defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from calodistill.pipeline.config import build_config
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


def test_distill_defaults_use_the_noise_side_x_pass() -> None:
    cfg = build_config(DistillStageConfig, ({"distill.noise_weight": 2.5}, "test"))
    assert cfg.distill.noise_weight == 2.5 and cfg.distill.x_pass == "local"
    assert DistillStageConfig().distill.noise_weight > 0
