"""Synthetic showers: ``synth:GEOMETRY?n=N&seed=S&...`` sources, generated in chunks on Dask.

``GEOMETRY`` is a preset name or the path of a geometry file with a ``material`` section
(:mod:`.geometry_file`), so the demo runs on a user's detector too.

The embedded default data source: GFLASH showers (:mod:`.gflash`) without a download, deterministic for
a seed whatever the partitioning (chunk ``i`` draws from ``SeedSequence([seed, i])``), parallel over
chunks, and readable like a file (:class:`SynthSource`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from ..errors import CalodistillError
from .calorimeter import calorimeter_for
from .geometry import Geometry, get_geometry
from .gflash import PARTICLES, simulate
from .showers import Showers
from .source import Source

__all__ = [
    "LADDER_ENERGIES_MEV",
    "SPECTRA",
    "SynthSource",
    "SynthSpec",
    "bench_synth",
    "generate_chunk",
    "generate_showers",
    "generate_showers_dask",
    "n_chunks",
    "open_synth_source",
    "parse_synth_source",
]

SPECTRA: tuple[str, ...] = ("uniform", "ladder")
#: CaloChallenge dataset-1 energies: 256 MeV × 2^k, k = 0..14 (256 MeV … 4.19 TeV).
LADDER_ENERGIES_MEV: np.ndarray = 256.0 * 2.0 ** np.arange(15)
UNIFORM_RANGE_MEV: tuple[float, float] = (1_000.0, 100_000.0)


@dataclass(frozen=True)
class SynthSpec:
    """What to generate.

    Args:
        geometry: a name from :data:`~.geometry.GEOMETRY_NAMES`, or the path of a geometry file that declares
            a material.
        n: number of showers (> 0).
        seed: base seed; chunk ``i`` draws from ``SeedSequence([seed, i])``.
        particle: ``"e+"``, ``"e-"`` or ``"gamma"``.
        spectrum: ``"uniform"`` (1–100 GeV) or ``"ladder"`` (256 MeV × 2^k, 15 energies).
        chunk_size: showers per chunk (the unit of parallelism and of determinism).
        energy: fixed incident energy in GeV (overrides ``spectrum``), or None.
        impact_spread_mm: σ of the impact point in x and y (Cartesian geometries only).
    """

    geometry: str
    n: int
    seed: int = 0
    particle: str = "e+"
    spectrum: str = "uniform"
    chunk_size: int = 5000
    energy: float | None = None
    impact_spread_mm: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.geometry, str):
            raise CalodistillError(f"synth: geometry must be a name or a path, got {self.geometry!r}")
        try:
            geo = get_geometry(self.geometry)
        except CalodistillError as exc:
            raise CalodistillError(f"synth: {exc}") from None
        calorimeter_for(geo)  # a geometry file without a material fails here, naming the file
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n <= 0:
            raise CalodistillError(f"synth: n must be a positive integer, got {self.n!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise CalodistillError(f"synth: seed must be a non-negative integer, got {self.seed!r}")
        if self.particle not in PARTICLES:
            raise CalodistillError(f"synth: unknown particle {self.particle!r}; known: {', '.join(PARTICLES)}")
        if self.spectrum not in SPECTRA:
            raise CalodistillError(f"synth: unknown spectrum {self.spectrum!r}; known: {', '.join(SPECTRA)}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, (int, np.integer)) or self.chunk_size <= 0:
            raise CalodistillError(f"synth: chunk_size must be a positive integer, got {self.chunk_size!r}")
        if self.energy is not None and not (math.isfinite(self.energy) and self.energy > 0):
            raise CalodistillError(f"synth: energy must be a positive number of GeV, got {self.energy!r}")
        if not (math.isfinite(self.impact_spread_mm) and self.impact_spread_mm >= 0):
            raise CalodistillError(f"synth: impact_spread_mm must be >= 0, got {self.impact_spread_mm!r}")
        if self.impact_spread_mm > 0 and any(l.kind != "cartesian" for l in geo.layers):
            raise CalodistillError(f"synth: impact spread needs Cartesian layers; {geo.name} is polar")


_SPEC_KEYS = {"n": int, "seed": int, "particle": str, "spectrum": str, "chunk_size": int, "energy": float,
              "impact_spread_mm": float}


def parse_synth_source(source: str) -> SynthSpec:
    """Parse ``synth:GEOMETRY?n=N&seed=S&particle=P&spectrum=uniform|ladder[&energy=GEV][&chunk_size=C]``."""
    if not isinstance(source, str) or not source.startswith("synth:"):
        raise CalodistillError(f"{source}: a synthetic source starts with 'synth:'")
    parts = urlsplit(source)
    geometry = parts.path
    if not geometry:
        raise CalodistillError(f"{source}: missing geometry (synth:GEOMETRY?n=N)")
    if parts.fragment:
        raise CalodistillError(f"{source}: unexpected '#' fragment")
    kwargs: dict[str, object] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key not in _SPEC_KEYS:
            raise CalodistillError(f"{source}: unknown parameter {key!r}; known: {', '.join(_SPEC_KEYS)}")
        if key in kwargs:
            raise CalodistillError(f"{source}: parameter {key!r} given twice")
        try:
            kwargs[key] = _SPEC_KEYS[key](value)
        except ValueError:
            raise CalodistillError(f"{source}: parameter {key}={value!r} is not a valid {_SPEC_KEYS[key].__name__}") from None
    if "n" not in kwargs:
        raise CalodistillError(f"{source}: missing n (number of showers)")
    try:
        return SynthSpec(geometry=geometry, **kwargs)  # type: ignore[arg-type]
    except CalodistillError as exc:
        raise CalodistillError(f"{source}: {' '.join(str(exc).removeprefix('synth: ').split())}") from None


def n_chunks(spec: SynthSpec) -> int:
    """Number of chunks ``spec`` is generated in."""
    return -(-spec.n // spec.chunk_size)


def _energies(spec: SynthSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    if spec.energy is not None:
        return np.full(n, spec.energy * 1000.0)
    if spec.spectrum == "ladder":
        return LADDER_ENERGIES_MEV[rng.integers(0, len(LADDER_ENERGIES_MEV), size=n)]
    lo, hi = UNIFORM_RANGE_MEV
    return rng.uniform(lo, hi, size=n)


def generate_chunk(spec: SynthSpec, i: int) -> Showers:
    """Chunk ``i`` of ``spec``: event ids ``i*chunk_size …``, drawn from ``SeedSequence([seed, i])``."""
    total = n_chunks(spec)
    if not 0 <= int(i) < total:
        raise CalodistillError(f"synth: chunk {i} out of range (0..{total - 1})")
    i = int(i)
    start = i * spec.chunk_size
    n = min(spec.chunk_size, spec.n - start)
    rng = np.random.default_rng(np.random.SeedSequence([int(spec.seed), i]))
    geo = get_geometry(spec.geometry)
    energy = _energies(spec, n, rng)
    voxels = simulate(geo, energy, spec.particle, rng, impact_spread_mm=spec.impact_spread_mm)
    return Showers(geo, energy, voxels, np.full(n, spec.particle, dtype=object),
                   np.arange(start, start + n, dtype=np.int64))


def generate_showers(spec: SynthSpec, progress: bool = False) -> Showers:
    """All showers of ``spec``, chunk by chunk (identical to the Dask version)."""
    chunks = range(n_chunks(spec))
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"synth {get_geometry(spec.geometry).name}", unit="chunk", disable=None)
    return Showers.concatenate([generate_chunk(spec, i) for i in chunks])


def generate_showers_dask(spec: SynthSpec, client: object | None = None, scheduler: str = "threads") -> Showers:
    """All showers of ``spec``, the chunks generated in parallel.

    Args:
        spec: what to generate.
        client: a ``distributed.Client``; chunks go out with ``client.map``. Without one, ``dask.delayed``
            runs them on the local ``scheduler`` (``"threads"``, ``"processes"`` or ``"synchronous"``).
        scheduler: the local Dask scheduler when no client is given.

    Returns:
        The same showers as :func:`generate_showers` (each chunk has its own seed).
    """
    idx = list(range(n_chunks(spec)))
    if client is not None:
        futures = client.map(generate_chunk, [spec] * len(idx), idx, pure=True)  # type: ignore[attr-defined]
        parts = client.gather(futures)  # type: ignore[attr-defined]
    else:
        import dask

        tasks = [dask.delayed(generate_chunk, pure=True)(spec, i) for i in idx]
        parts = list(dask.compute(*tasks, scheduler=scheduler))
    return Showers.concatenate(list(parts))


# ------------------------------------------------------------------------------------ as a source


@dataclass
class SynthSource(Source):
    """A ``synth:GEOMETRY?n=N&seed=S&...`` source: rows are cut from chunks of :func:`generate_chunk`.

    Args:
        spec: what the source generates.
        spec_text: the spec's canonical JSON (its identity: the source's ``sha256``).
    """

    spec: SynthSpec | None = None
    spec_text: str = ""

    @property
    def sha256(self) -> str:
        """SHA-256 of the canonical source string (a synthetic source is defined by its parameters)."""
        return hashlib.sha256(self.spec_text.encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """The file description plus the spec's fields."""
        out = super().describe()
        out["spec"] = dataclasses.asdict(self.spec)
        return out

    def _read(self, start: int, stop: int) -> Showers:
        cs = int(self.spec.chunk_size)
        parts = []
        for i in range(start // cs, (stop - 1) // cs + 1 if stop > start else start // cs):
            chunk = generate_chunk(self.spec, i)
            lo = max(start - i * cs, 0)
            hi = min(stop - i * cs, len(chunk))
            parts.append(chunk.subset(slice(lo, hi)))
        if not parts:
            return Showers(self.geometry, np.zeros(0), np.zeros((0, self.geometry.n_voxels), np.float32))
        out = Showers.concatenate(parts) if len(parts) > 1 else parts[0]
        out.event_id = np.arange(start, stop, dtype=np.int64)
        return out


def open_synth_source(text: str, geometry: Geometry | None = None) -> SynthSource:
    """Open ``synth:GEOMETRY?...`` as a :class:`SynthSource`; ``geometry``, if given, must match."""
    spec = parse_synth_source(text)
    geo = get_geometry(spec.geometry)
    if geometry is not None and (geometry.name != geo.name or not geometry.same_cells(geo)):
        raise CalodistillError(f"{text}: synthetic geometry {geo.name} differs from --geometry {geometry.name}")
    if int(spec.n) <= 0:
        raise CalodistillError(f"{text}: n must be positive")
    fields = dataclasses.asdict(spec)
    if geo.origin:  # a geometry file: the source is defined by its content, not by where the file lies
        fields["geometry"] = geo.to_dict()
    canonical = json.dumps(fields, sort_keys=True, default=str)
    return SynthSource(text, geo, int(spec.n), "synth", chunk_rows=int(spec.chunk_size), spec=spec, spec_text=canonical)


def bench_synth(geometry: str = "calogan", n: int = 5000, seed: int = 0, repeats: int = 3) -> dict[str, float]:
    """Showers per second of the generator on one thread of this process (best of ``repeats``).

    Set ``OMP_NUM_THREADS=1`` before starting Python for a per-core number.
    """
    spec = SynthSpec(geometry, n, seed=seed, chunk_size=n)
    generate_chunk(SynthSpec(geometry, 10, seed=seed), 0)  # warm the radial tables
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        generate_chunk(spec, 0)
        best = min(best, time.perf_counter() - t0)
    return {
        "geometry_voxels": float(get_geometry(geometry).n_voxels),
        "n": float(n),
        "seconds": best,
        "showers_per_s": n / best,
    }
