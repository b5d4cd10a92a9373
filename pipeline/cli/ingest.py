"""``calodistill ingest``: arguments, description and example; the work is done by
:mod:`calodistill.pipeline.data.ingest`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.ingest import ingest_showers
from ..errors import CalodistillError

__all__ = ["configure_parser", "run_cli"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``calodistill ingest``."""
    parser.description = (
        "Ingest shower files (CaloGAN HDF5, CaloChallenge HDF5, ROOT through uproot, CSV, Parquet, other HDF5 "
        "through a column mapping) or synthetic sources into a partitioned Parquet dataset with a deterministic "
        "train/val/test split, on Dask (files and row ranges read in parallel). Every source is validated; on "
        "any error nothing is left behind. The geometry is stored with the dataset: later commands need no flag."
    )
    parser.epilog = (
        "Examples:\n"
        "  calodistill ingest showers.h5 --out data/calogan\n"
        "  calodistill ingest 'synth:calogan?n=100000&seed=1' --out data/synth --overwrite\n"
        "  calodistill ingest a.h5 b.h5 --out data/ds2 --geometry calochallenge-2 --scheduler tcp://HOST:8786\n"
        "  calodistill ingest table.csv --out data/t --columns incident_energy=E,energy_unit=GeV,voxels=cell_*\n"
        "  calodistill ingest 'runs/*.root:h' --out data/mine --geometry geometry.yaml --columns columns.yaml"
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="shower file or glob (file.root or file.root:TREE for ROOT), or synth:GEOMETRY?n=N&seed=S")
    parser.add_argument("--out", required=True, type=Path, metavar="DATASET_DIR", help="dataset directory to create")
    parser.add_argument("--geometry", default=None, metavar="NAME_OR_FILE",
                        help="preset name, geometry YAML or binning XML (default: recorded in or inferred from each source)")
    parser.add_argument(
        "--scheduler", default=None, metavar="ADDR",
        help="Dask scheduler address (tcp://HOST:8786), or 'threads' to run in-process (default: a LocalCluster)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    parser.add_argument("--split-seed", type=int, default=0, metavar="N", help="seed of the train/val/test split")
    parser.add_argument(
        "--split-fractions", default="0.8,0.1,0.1", metavar="TRAIN,VAL,TEST", help="split fractions (default 0.8,0.1,0.1)"
    )
    parser.add_argument("--partition-mb", type=float, default=100.0, metavar="MB", help="uncompressed MB per file")
    parser.add_argument(
        "--columns", default=None, metavar="FILE|KEY=VALUE,...",
        help="column mapping (a YAML file, or key=value pairs): tree, incident_energy, energy_unit, voxels (NAME or "
             "PREFIX*), voxel_unit, voxel_encoding, empty_value, particle, particle_codes, event_id, filter",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``calodistill ingest`` and print a short summary."""
    try:
        fractions = tuple(float(x) for x in str(args.split_fractions).split(","))
    except ValueError:
        raise CalodistillError(f"--split-fractions: expected three numbers, got {args.split_fractions!r}") from None
    summary = ingest_showers(
        args.sources, args.out, geometry=args.geometry, scheduler=args.scheduler, overwrite=args.overwrite,
        split_seed=args.split_seed, split_fractions=fractions, partition_mb=args.partition_mb,  # type: ignore[arg-type]
        progress=not args.no_progress, columns=args.columns,
    )
    c = summary["counts"]
    print(
        f"ingested {summary['n_showers']} showers ({summary['geometry']}) from {len(summary['sources'])} source(s) "
        f"into {summary['out_dir']}\n"
        f"  split: train {c['train']} / val {c['val']} / test {c['test']}  (seed {args.split_seed})\n"
        f"  {summary['n_partitions']} file(s), {summary['bytes'] / 1e6:.1f} MB on disk, "
        f"{summary['seconds']:.1f} s ({summary['showers_per_s']:.0f} showers/s, {summary['mb_per_s']:.1f} MB/s)\n"
        f"  dataset hash {summary['dataset_hash'][:16]}"
    )
    return 0
