"""``calodistill synth``: arguments, description and example; the work is done by
:mod:`calodistill.pipeline.data.synth`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ..data.formats import write_showers
from ..data.geometry import GEOMETRY_NAMES
from ..data.gflash import PARTICLES
from ..data.synth import SPECTRA, SynthSpec, generate_showers
from ..errors import CalodistillError
from ..outputs import check_output_file

__all__ = ["configure_parser", "run_cli"]

_OUT_SUFFIXES = (".h5", ".hdf5", ".parquet", ".root")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``calodistill synth``."""
    parser.description = (
        "Generate synthetic electromagnetic showers (GFLASH parametrisation: Gamma longitudinal profile with "
        "correlated fluctuations, two-component radial profile, energy spots and sampling fluctuations) on a "
        "calorimeter geometry (a preset, or your geometry YAML with a material section) and write them in the "
        "geometry's native HDF5 layout (.h5/.hdf5), Parquet or ROOT."
    )
    parser.epilog = ("Examples:\n  calodistill synth --geometry calogan -n 10000 --seed 1 --out showers.h5\n"
                     "  calodistill synth --geometry geometry.yaml -n 1000 --particle gamma --out mine.root")
    parser.add_argument("--geometry", default="calogan", metavar="NAME_OR_FILE",
                        help=f"one of {', '.join(GEOMETRY_NAMES)} or a geometry YAML with a material (default calogan)")
    parser.add_argument("-n", type=int, required=True, help="number of showers")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", required=True, help="output file: .h5/.hdf5 (native layout), .parquet or .root")
    parser.add_argument("--particle", default="e+", choices=PARTICLES, help="incident particle (default e+)")
    parser.add_argument("--spectrum", default="uniform", choices=SPECTRA,
                        help="uniform 1-100 GeV, or the CaloChallenge ladder 256 MeV x 2^k (default uniform)")
    parser.add_argument("--energy", type=float, default=None, metavar="GEV", help="fixed incident energy in GeV")
    parser.add_argument("--chunk-size", type=int, default=5000, help="showers per chunk (default 5000)")
    parser.add_argument("--impact-spread", type=float, default=0.0, metavar="MM",
                        help="Gaussian spread of the impact point, mm (Cartesian geometries only; default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``calodistill synth``."""
    out = Path(args.out)
    if out.suffix.lower() not in _OUT_SUFFIXES:
        raise CalodistillError(f"{out}: output extension must be one of {', '.join(_OUT_SUFFIXES)}")
    if out.parent and not out.parent.exists():
        raise CalodistillError(f"{out}: directory {out.parent} does not exist")
    check_output_file(out, overwrite=args.overwrite)
    spec = SynthSpec(args.geometry, args.n, seed=args.seed, particle=args.particle, spectrum=args.spectrum,
                     chunk_size=args.chunk_size, energy=args.energy, impact_spread_mm=args.impact_spread)
    t0 = time.perf_counter()
    showers = generate_showers(spec, progress=True)
    elapsed = time.perf_counter() - t0
    write_showers(showers, out)
    resp = float(showers.voxels.sum(dtype=np.float64) / showers.incident_energy.sum())
    print(f"wrote {len(showers)} {spec.particle} showers on {showers.geometry.name} to {out} "
          f"({len(showers) / max(elapsed, 1e-9):.0f} showers/s; mean response {resp:.3f})")
    return 0
