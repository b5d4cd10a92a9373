"""``calodistill generate``: arguments, description and example; the work is done by
:mod:`calodistill.pipeline.stages.generate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..stages.generate import generate_showers_file

__all__ = ["configure_parser", "run_cli"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``calodistill generate``."""
    parser.description = (
        "Generate showers with Flow I + the student (or a teacher), batched, on CUDA when present.\n"
        "Energies: 50GeV | 1GeV,10GeV | uniform:1GeV:100GeV | loguniform:1GeV:1TeV | ladder (a bare number is MeV)."
    )
    parser.epilog = (
        "Examples:\n"
        "  calodistill generate --model runs/quickstart/distill/model -n 10000 --energies uniform:1GeV:100GeV "
        "--out showers.h5\n"
        "  calodistill generate --model models:/calodistill-quickstart-student@champion -n 1000 "
        "--energies 50GeV --out showers.parquet"
    )
    parser.add_argument("--model", required=True, help="model directory or MLflow model URI (models:/NAME@ALIAS)")
    parser.add_argument("-n", type=int, required=True, help="number of showers")
    parser.add_argument("--energies", default="uniform:1GeV:100GeV", help="incident energies (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="output file: .h5/.hdf5 (native layout) or .parquet")
    parser.add_argument("--batch-size", type=int, default=10_000, help="showers per batch (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address to shard large N across")
    parser.add_argument("--shard-size", type=int, default=100_000, help="showers per partition (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ URIs")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--allow-extrapolation", action="store_true",
                        help="generate at energies outside the model's training range (with a warning)")
    parser.add_argument("--engine", default="torch", choices=("torch", "onnx"),
                        help="torch (default) or onnx: sample through ONNX Runtime on the noise the torch path "
                             "draws on the CPU for the same seed (a student, in this process)")
    parser.add_argument("--onnx", type=Path, default=None, metavar="FILE.onnx",
                        help="with --engine onnx: a sampler written by `calodistill export` from this model "
                             "(default: export one for this run)")
    parser.add_argument("--geometry", default=None, metavar="NAME_OR_FILE",
                        help="refuse a model trained on another geometry (preset name, geometry YAML or binning XML); "
                             "the model carries its own, so this is only a check")


def _check_geometry(model: str, geometry: str, tracking_uri: str | None) -> None:
    import tempfile

    from ..data.bundle import ModelBundle
    from ..data.geometry import get_geometry

    geo = get_geometry(geometry)
    with tempfile.TemporaryDirectory(prefix="calodistill-check-") as tmp:
        ModelBundle.open(model, tracking_uri=tracking_uri, cache_dir=Path(tmp)).check_geometry(geo, f"--geometry {geometry}")


def run_cli(args: argparse.Namespace) -> int:
    """``calodistill generate``."""
    if args.geometry:
        _check_geometry(args.model, args.geometry, args.tracking_uri)
    res = generate_showers_file(args.model, args.n, args.energies, args.out, batch_size=args.batch_size,
                                device=args.device, scheduler=args.scheduler, seed=args.seed,
                                shard_size=args.shard_size, tracking_uri=args.tracking_uri,
                                overwrite=args.overwrite, allow_extrapolation=args.allow_extrapolation,
                                engine=args.engine, onnx=args.onnx)
    where = "onnxruntime" if res.get("engine") == "onnx" else res["device"]
    head = f"wrote {res['n']} showers ({res['geometry']}, {res['model_kind']}, {where}) to {res['out']}"
    reused = res["n"] - res["n_sampled"]
    if not res["n_sampled"]:
        print(f"{head}: every shard reused from an interrupted run, sampling not timed")
    elif reused:
        print(f"{head}: {res['sample_ms_per_shower']:.4f} ms per shower sampling (timed on the {res['n_sampled']} "
              f"sampled now; {reused} reused from an interrupted run)")
    else:
        print(f"{head}: {res['sample_ms_per_shower']:.4f} ms per shower sampling")
    return 0
