"""``calodistill distill``: arguments, description and example; the work is done by
:mod:`calodistill.pipeline.stages.distill`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..stages.distill import DistillStageConfig, distill_student
from .train_teacher import (
    add_config_arguments,
    config_from_args,
    print_metrics,
)

__all__ = ["configure_parser", "run_cli"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``calodistill distill``."""
    parser.description = (
        "Distil the IAF student from a trained MAF teacher (CaloFlow II): x-pass and z-pass squared errors, "
        "fully guided through every block, KL(student || teacher) picks the epoch. Writes STUDENT_DIR, "
        "self-contained for generation (preprocessing.json, flow1.pt, student.pt, metrics.json, provenance.json, "
        "checkpoints/); running it again with the same teacher, data and settings resumes, with others it is "
        "refused (--overwrite starts over). Settings: defaults < --config FILE < --set key=value."
    )
    parser.epilog = (
        "Example:\n  calodistill distill --teacher models/teacher --data data/calogan --out models/student \\\n"
        "      --set train.epochs=30 --set student.hidden_features=256"
    )
    parser.add_argument("--teacher", type=Path, required=True, metavar="MODEL_DIR", help="directory from `calodistill train-teacher`")
    parser.add_argument("--data", type=Path, required=True, metavar="DATASET_DIR", help="dataset written by `calodistill ingest`")
    parser.add_argument("--out", type=Path, required=True, metavar="STUDENT_DIR", help="student directory to write")
    add_config_arguments(parser)


def run_cli(args: argparse.Namespace) -> int:
    """Run ``calodistill distill``; print the likelihood and sample comparisons."""
    cfg = config_from_args(DistillStageConfig, args)
    metrics = distill_student(args.teacher, args.data, args.out, cfg, device=args.device, overwrite=args.overwrite)
    print_metrics(
        f"student written to {args.out}",
        metrics,
        ["test_nll", "teacher_test_nll_subset", "test_nll_rel_diff", "teacher_test_nll", "kl_student_teacher",
         "student_sample_nll", "paired_rms", "layer_frac_max_rel_diff", "response_rel_diff", "voxel_mean_rel_l1",
         "flow2_max_rel_diff",
         "student_sample_ms_per_shower", "teacher_sample_ms_per_shower", "epochs", "best_epoch", "distill_time_s"],
    )
    return 0
