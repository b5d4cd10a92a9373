"""``calodistill run``: arguments, description and example; the work is done by
:mod:`calodistill.pipeline.orchestration.runner`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..orchestration.runner import RunSummary, run_pipeline

__all__ = ["configure_parser", "run_cli"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``calodistill run``."""
    parser.description = (
        "Run a pipeline DAG (dags/*.yaml) end to end: every stage a Dask task, every stage an MLflow nested run.\n"
        "Completed stages whose inputs and parameters are unchanged are skipped; an interrupted run resumes."
    )
    parser.epilog = (
        "Examples:\n"
        "  calodistill run dags/quickstart.yaml\n"
        "  calodistill run dags/quickstart.yaml --set train_teacher.epochs=2 --set ingest.split_seed=1\n"
        "  calodistill run dags/calochallenge_ds1_photons.yaml --scheduler tcp://gpu-node:8786\n"
        "  calodistill run dags/calochallenge_ds1_photons.yaml --cluster slurm.yaml   (cluster: {jobqueue: ...})\n"
        "Browse the results: mlflow ui --backend-store-uri sqlite:///mlflow.db"
    )
    parser.add_argument("dag", type=Path, help="the pipeline DAG YAML file")
    parser.add_argument("--scheduler", default=None, metavar="ADDR",
                        help="Dask scheduler address (tcp://HOST:8786); default: the DAG's cluster: section")
    parser.add_argument("--cluster", type=Path, default=None, metavar="FILE",
                        help="YAML file with a cluster: section (local, address or jobqueue: SLURM, PBS, LSF, SGE); "
                             "wins over the DAG's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="override a stage parameter (value parsed as YAML); repeatable")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"),
                        help="directory of run directories (default: runs/)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="run this stage even if it is complete; repeatable")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def run_cli(args: argparse.Namespace) -> int:
    """``calodistill run``: run the pipeline, print the summary table; exit 1 if a stage failed.

    SIGTERM is handled like Ctrl-C: the cluster is shut down, the MLflow runs are marked KILLED, and
    the stage that was running stays incomplete (its next run resumes it).
    """
    import signal

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        summary = _run_from_args(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary.format_table())
    return 0 if summary.ok else 1


def _run_from_args(args: argparse.Namespace) -> RunSummary:
    return run_pipeline(args.dag, scheduler=args.scheduler, overrides=tuple(args.overrides),
                        run_root=args.runs_dir, tracking_uri=args.tracking_uri, force=tuple(args.force),
                        track=not args.no_tracking, cluster=args.cluster)
