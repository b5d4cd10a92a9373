"""``calodistill train-teacher``: arguments, description and example; the work is done by
:mod:`calodistill.pipeline.stages.train_teacher`."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from ..config import build_config, load_config_file, set_sources
from ..stages.train_teacher import TeacherTrainConfig, train_teacher

__all__ = ["configure_parser", "run_cli"]

T = TypeVar("T")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``, ``--set key=value`` (repeatable), ``--device``, ``--quiet``, ``--overwrite``."""
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML or JSON file of settings (nested or dotted keys)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, value parsed as YAML, e.g. --set teacher.train.lr=1e-3 (repeatable)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: CUDA when present")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an existing model directory instead of resuming the run there")


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The typed config: defaults < ``--config FILE`` < ``--quiet`` < each ``--set KEY=VALUE``."""
    file_data = load_config_file(args.config) if args.config else None
    quiet = {"progress": False} if getattr(args, "quiet", False) else None
    return build_config(cls, (file_data, str(args.config)), (quiet, "--quiet"), *set_sources(args.overrides))


def print_metrics(title: str, metrics: Mapping[str, float], keys: Sequence[str]) -> None:
    """A small result table on stdout (CLI only)."""
    print(title)
    for key in keys:
        if key in metrics:
            value = metrics[key]
            text = f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else str(value)
            print(f"  {key:<32} {text}")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``calodistill train-teacher``."""
    parser.description = (
        "Fit the CaloFlow preprocessing, then train Flow I (layer energies | incident energy) and the MAF "
        "teacher (voxels | incident and layer energies) by maximum likelihood. Writes MODEL_DIR "
        "(preprocessing.json, flow1.pt, teacher.pt, metrics.json, provenance.json, checkpoints/); running it "
        "again on the same MODEL_DIR with the same data and settings resumes an interrupted run, with others "
        "it is refused (--overwrite starts over). Settings: defaults < --config FILE < --set key=value."
    )
    parser.epilog = (
        "Example:\n  calodistill train-teacher --data data/calogan --out models/teacher \\\n"
        "      --set teacher.train.epochs=20 --set teacher.model.hidden_features=256"
    )
    parser.add_argument("--data", type=Path, required=True, metavar="DATASET_DIR", help="dataset written by `calodistill ingest`")
    parser.add_argument("--out", type=Path, required=True, metavar="MODEL_DIR", help="model directory to write")
    add_config_arguments(parser)


def run_cli(args: argparse.Namespace) -> int:
    """Run ``calodistill train-teacher``; print the test metrics."""
    cfg = config_from_args(TeacherTrainConfig, args)
    metrics = train_teacher(args.data, args.out, cfg, device=args.device, overwrite=args.overwrite)
    print_metrics(
        f"teacher written to {args.out}",
        metrics,
        ["test_nll", "test_nll_per_dim", "baseline_nll", "baseline_nll_per_dim", "flow1_test_nll",
         "flow1_baseline_nll", "teacher_epochs", "flow1_epochs", "layer_frac_max_rel_diff",
         "response_data", "response_gen", "response_rel_diff", "train_time_s"],
    )
    return 0
