"""``calodistill bench``: arguments, description and example; the work is done by
:mod:`calodistill.pipeline.stages.bench`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import CalodistillError
from ..outputs import check_output_file
from ..stages.bench import DEFAULT_GEOMETRY, PRESETS, SECTIONS, run_bench

__all__ = ["configure_parser", "run_cli"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``calodistill bench``."""
    parser.description = (
        "Benchmark, in one process on one device: teacher (MAF, D sequential passes) vs student (IAF, one "
        "pass) sampling time per shower at batch 1, 100, 10000 (CaloChallenge protocol: warm-up, repeats, "
        "median), the student's dense-matmul floor and FLOPs, ingest vs a plain pyarrow write_table, and "
        "training throughput and peak memory. Models are random-initialised at CaloFlow sizes unless "
        "--model-dir is given. A batch that would exceed --budget-s is replaced by the largest that fits, "
        "and the table says so; nothing is extrapolated. Prints a markdown table; --out writes JSON."
    )
    parser.epilog = (
        "Examples:\n"
        "  calodistill bench --geometry calochallenge-1-photons --device cpu --out bench.json\n"
        "  calodistill bench --quick --out /tmp/bench.json\n"
        "  calodistill bench --model-dir runs/student --sections sampling,floor --budget-s 300"
    )
    from ..data.geometry import GEOMETRY_NAMES

    parser.add_argument("--geometry", default=None,
                        metavar="NAME_OR_FILE",
                        help=f"one of {', '.join(GEOMETRY_NAMES)} or a geometry YAML (default {DEFAULT_GEOMETRY}, "
                             "or that of the --model-dir models)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.json", help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, default=None, metavar="FILE.md", help="also write the table")
    parser.add_argument("--budget-s", type=float, default=60.0, metavar="SECONDS",
                        help="most seconds per measurement (default 60)")
    parser.add_argument("--model-dir", action="append", type=Path, default=None, metavar="DIR",
                        help="trained model directory with teacher.pt and/or student.pt (repeatable)")
    parser.add_argument("--quick", action="store_true", help="small batches, short budget: a smoke run")
    parser.add_argument("--batches", default=None, metavar="B1,B2,...", help="batches (default 1,100,10000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per measurement (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--chunk-size", type=int, default=256, help="fast sampler chunk rows (default 256)")
    parser.add_argument("--sections", default=",".join(SECTIONS), metavar="LIST",
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--ingest-n", type=int, default=20_000, help="showers for the ingest benchmark")
    parser.add_argument("--ingest-scheduler", default=None,
                        help="Dask scheduler for ingest (default: a LocalCluster; 'threads': in-process)")
    parser.add_argument("--train-steps", type=int, default=5, help="timed optimiser steps per model")
    parser.add_argument("--seed", type=int, default=0, help="seed of models and inputs")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="sizes and training batches of a named set-up (quickstart: dags/quickstart.yaml's models)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out / --markdown if they exist")


def _parse_batches(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CalodistillError(f"--batches: expected comma-separated integers, got {text!r}") from None


def run_cli(args: argparse.Namespace) -> int:
    """Run ``calodistill bench``: print the markdown table, write JSON (and markdown) if asked."""
    # the outputs are checked before the benchmark runs, not after minutes of measuring
    if args.out is not None:
        check_output_file(args.out, overwrite=args.overwrite, option="--out")
    if args.markdown is not None:
        check_output_file(args.markdown, overwrite=args.overwrite, option="--markdown")
    result = run_bench(
        geometry=args.geometry or (None if args.model_dir else DEFAULT_GEOMETRY), device=args.device, batches=_parse_batches(args.batches),
        budget_s=args.budget_s, repeats=args.repeats, warmup=args.warmup, model_dirs=args.model_dir,
        sections=[s.strip() for s in args.sections.split(",") if s.strip()], ingest_n=args.ingest_n,
        ingest_scheduler=args.ingest_scheduler, train_steps=args.train_steps, chunk_size=args.chunk_size,
        threads=args.threads, quick=args.quick, seed=args.seed, preset=args.preset,
    )
    print(result["markdown"])
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    if args.markdown is not None:
        atomic_write_text(args.markdown, result["markdown"])
        print(f"wrote {args.markdown}")
    return 0
