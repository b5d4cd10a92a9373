"""Generate showers with Flow I + a Flow II model (the student, one pass per shower) into a file.

``calodistill generate --model PATH_OR_MODEL_URI -n N --energies SPEC --out FILE.{h5,parquet}``

- ``--model``: a model directory (``preprocessing.json``, ``flow1.pt``, ``student.pt`` or ``teacher.pt``),
  an MLflow pyfunc model directory logged by the pipeline, or an MLflow model URI
  (``models:/calodistill-quickstart-student@champion``, ``runs:/RUN_ID/student``, ``models:/m-...``),
  resolved against ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``.
- ``--energies`` (incident energies; a bare number is MeV, units MeV/GeV/TeV accepted):
  a fixed value ``50GeV``; a list ``1GeV,10GeV,100GeV`` (equal shares); ``uniform:1GeV:100GeV``;
  ``loguniform:1GeV:1TeV``; ``ladder`` (CaloChallenge dataset 1: 256 MeV × 2^k, k = 0..14, up to 4 TeV,
  equal shares).
- Output by extension: ``.h5``/``.hdf5`` → the geometry's native HDF5 layout (CaloGAN for ``calogan``,
  CaloChallenge ``incident_energies``/``showers`` otherwise), ``.parquet`` → one Parquet file.

The model is opened once (:class:`~calodistill.pipeline.data.bundle.ModelBundle`). Sampling runs batched on
CUDA when present. When N exceeds ``--shard-size`` the work is split into shards, each written atomically
as a partition file (on the Dask cluster at ``--scheduler`` if given, where each task re-opens the model
from its path; in this process otherwise, with the open model; finished partitions are reused when the
same command is run again with the same model, seed, batch size and device; another set-up starts the
shards over), then joined into the final file, written atomically. Everything is checked before anything
is written: invalid energies, energies outside the model's training range (unless
``--allow-extrapolation``), an unknown model, an existing output (unless ``--overwrite``) or an
unwritable one give a one-line error and no file.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...flows.device import resolve_device
from ..data.bundle import ModelBundle
from ..atomic import atomic_write_json
from ..errors import CalodistillError
from ..outputs import check_output_file, removing_created_parents

__all__ = [
    "ENERGY_RANGE_TOLERANCE",
    "EnergySpec",
    "LADDER_MEV",
    "check_energy_range",
    "generate_showers_file",
    "parse_energy",
    "parse_energy_spec",
    "write_sample_artifact",
]

logger = logging.getLogger(__name__)

_UNITS = {"mev": 1.0, "gev": 1e3, "tev": 1e6}
_ENERGY_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
#: CaloChallenge dataset 1 incident energies: 256 MeV × 2^k, k = 0..14 (256 MeV ... 4.19 TeV).
LADDER_MEV: tuple[float, ...] = tuple(256.0 * 2.0**k for k in range(15))
_OUTPUT_SUFFIXES = {".h5", ".hdf5", ".parquet"}
#: Requested energies may lie this fraction of the training range's width beyond either edge (the edges
#: are the extremes of a sample: a range of 1-100 GeV is recorded as, say, 1.6-99.6 GeV), but never below
#: half the lowest training energy.
ENERGY_RANGE_TOLERANCE = 0.1

def parse_energy(text: str, where: str = "--energies") -> float:
    """``"50GeV"`` → 50000.0 (MeV); a bare number is MeV. Positive and finite, else CalodistillError."""
    m = _ENERGY_RE.match(str(text))
    if not m:
        raise CalodistillError(f"{where}: {text!r} is not an energy (e.g. 50GeV, 256MeV, 1TeV, 50000)")
    unit = m.group(2).lower() or "mev"
    if unit not in _UNITS:
        raise CalodistillError(f"{where}: unknown unit {m.group(2)!r} in {text!r} (use MeV, GeV or TeV)")
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise CalodistillError(f"{where}: energy must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class EnergySpec:
    """Incident energies to generate at.

    Attributes:
        kind: ``fixed``, ``list``, ``uniform``, ``loguniform`` or ``ladder``.
        values: the energies of ``fixed``/``list``/``ladder`` (MeV).
        low: lower edge of a range (MeV).
        high: upper edge of a range (MeV).
    """

    kind: str
    values: tuple[float, ...] = ()
    low: float = 0.0
    high: float = 0.0

    @property
    def bounds(self) -> tuple[float, float]:
        """The lowest and highest energy this spec can give (MeV)."""
        if self.values:
            return min(self.values), max(self.values)
        return self.low, self.high

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` incident energies (MeV, float64); discrete kinds give equal shares in random order."""
        rng = np.random.default_rng(seed)
        if self.kind in ("fixed", "list", "ladder"):
            vals = np.asarray(self.values, dtype=np.float64)
            out = vals[np.arange(n) % len(vals)]
            return out if len(vals) == 1 else rng.permutation(out)
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high, size=n)
        if self.kind == "loguniform":
            return np.exp(rng.uniform(math.log(self.low), math.log(self.high), size=n))
        raise CalodistillError(f"energies: unknown kind {self.kind!r}")  # pragma: no cover


def parse_energy_spec(spec: str) -> EnergySpec:
    """Parse an ``--energies`` value (see the module docstring). Raises CalodistillError naming the problem."""
    text = str(spec).strip()
    if not text:
        raise CalodistillError("--energies: empty")
    lower = text.lower()
    if lower == "ladder":
        return EnergySpec("ladder", values=LADDER_MEV)
    if ":" in text:
        kind, _, rest = text.partition(":")
        kind = kind.strip().lower()
        if kind not in ("uniform", "loguniform", "log-uniform"):
            raise CalodistillError(f"--energies: unknown range kind {kind!r} in {text!r} (use uniform:LOW:HIGH, "
                                   "loguniform:LOW:HIGH)")
        parts = rest.split(":")
        if len(parts) != 2:
            raise CalodistillError(f"--energies: {text!r}: expected {kind}:LOW:HIGH")
        low, high = (parse_energy(p, "--energies") for p in parts)
        if not low < high:
            raise CalodistillError(f"--energies: {text!r}: LOW must be below HIGH")
        return EnergySpec("loguniform" if kind != "uniform" else "uniform", low=low, high=high)
    if "," in text:
        values = tuple(parse_energy(p, "--energies") for p in text.split(",") if p.strip())
        if not values:
            raise CalodistillError(f"--energies: {text!r}: empty list")
        return EnergySpec("list", values=values)
    return EnergySpec("fixed", values=(parse_energy(text, "--energies"),))


# ------------------------------------------------------------------------------------------- sampling


def _sample(bundle: ModelBundle, energies: np.ndarray, batch_size: int, device: str, seed: int) -> np.ndarray:
    import torch

    gen = bundle.generator(device)
    torch.manual_seed(seed)
    return gen.sample(energies, batch_size=batch_size, seed=seed)


def _generate_shard(model: ModelBundle | str, kind: str, energies: np.ndarray, batch_size: int, device: str,
                    seed: int, part: str, geometry: str, particle: str | None, first_event: int) -> dict[str, Any]:
    """Sample one shard and write it atomically to ``part`` (a Dask task or a local call).

    Local calls share the driver's open :class:`ModelBundle`; a Dask task gets the model directory's path
    and opens it again in the worker (a bundle is not shipped between processes).
    """
    from ..data.formats import write_showers
    from ..data.geometry import get_geometry
    from ..data.showers import Showers

    bundle = model if isinstance(model, ModelBundle) else ModelBundle.open(model, kind=kind)
    t0 = time.perf_counter()
    voxels = _sample(bundle, energies, batch_size, device, seed)
    seconds = time.perf_counter() - t0
    showers = Showers(get_geometry(geometry), energies, voxels, particle=particle,
                      event_id=np.arange(first_event, first_event + len(energies), dtype=np.int64))
    write_showers(showers, part)
    return {"part": part, "n": len(energies), "sample_s": seconds}


def _check_output(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise CalodistillError(f"--out {out}: is a directory, not a file (give a file name ending in .h5, "
                               ".hdf5 or .parquet)")
    if out.suffix.lower() not in _OUTPUT_SUFFIXES:
        raise CalodistillError(f"--out {out}: unknown output type {out.suffix!r} (use .h5, .hdf5 or .parquet)")
    check_output_file(out, overwrite=overwrite)


def _format_energy(mev: float) -> str:
    if mev < 1e3:
        return f"{mev:.4g} MeV"
    return f"{mev / 1e3:.4g} GeV" if mev < 1e6 else f"{mev / 1e6:.4g} TeV"


def check_energy_range(spec: EnergySpec, text: str, energy_range: tuple[float, float] | None,
                       allow_extrapolation: bool = False) -> None:
    """Refuse energies outside the model's training range, widened by :data:`ENERGY_RANGE_TOLERANCE`.

    Args:
        spec: the parsed ``--energies``.
        text: the ``--energies`` text, for the message.
        energy_range: the training split's incident-energy range (MeV), None when the model does not record it.
        allow_extrapolation: only warn (``--allow-extrapolation``).
    """
    if energy_range is None:
        logger.debug("the model records no training energy range: --energies %s not checked", text)
        return
    low, high = spec.bounds
    lo, hi = energy_range
    margin = ENERGY_RANGE_TOLERANCE * (hi - lo)
    accept_lo, accept_hi = max(lo - margin, lo / 2), hi + margin
    if low >= accept_lo and high <= accept_hi:
        return
    asked = _format_energy(low) if low == high else f"{_format_energy(low)} to {_format_energy(high)}"
    msg = (f"--energies {text}: {asked} is outside the model's training range {_format_energy(lo)} to "
           f"{_format_energy(hi)} (accepted: {_format_energy(accept_lo)} to {_format_energy(accept_hi)})")
    if not allow_extrapolation:
        raise CalodistillError(f"{msg}; the showers would be extrapolated, pass --allow-extrapolation to "
                               "generate them anyway")
    logger.warning("%s: extrapolating (--allow-extrapolation)", msg)


def generate_showers_file(
    model: str,
    n: int,
    energies: str,
    out: Path,
    batch_size: int = 10_000,
    device: str | None = None,
    scheduler: str | None = None,
    seed: int = 0,
    shard_size: int = 100_000,
    parts_dir: Path | None = None,
    progress: bool = True,
    tracking_uri: str | None = None,
    overwrite: bool = False,
    allow_extrapolation: bool = False,
    engine: str = "torch",
    onnx: str | Path | None = None,
) -> dict[str, Any]:
    """Generate ``n`` showers at incident energies drawn from ``energies`` into ``out``.

    Args:
        model: model directory, pyfunc model directory or MLflow model URI (see the module docstring).
        n: number of showers.
        energies: energy spec (``50GeV``, ``1GeV,10GeV``, ``uniform:1GeV:100GeV``, ``loguniform:...``, ``ladder``).
        out: output file (``.h5``/``.hdf5``/``.parquet``), written atomically.
        batch_size: showers per sampling batch.
        device: torch device (default: CUDA when present).
        scheduler: Dask scheduler address to shard on (None: shards run in this process).
        seed: seed of the energies and of the sampling (shard ``i`` uses ``seed + i``).
        shard_size: showers per shard/partition when ``n`` is larger.
        parts_dir: where partitions go (default: ``.<out name>.parts`` beside ``out``, removed at the end).
        progress: show a progress bar over shards.
        tracking_uri: MLflow tracking URI for ``models:/`` URIs.
        overwrite: replace an existing ``out`` (else refused).
        allow_extrapolation: generate at energies outside the model's training range, with a warning
            (else refused: :func:`check_energy_range`).
        engine: ``torch``, or ``onnx``: sample through ONNX Runtime on the noise the torch path draws on the
            CPU for the same seed (:class:`~calodistill.pipeline.stages.export.OnnxEngine`; a student only,
            in this process).
        onnx: with ``engine="onnx"``, a sampler written by ``calodistill export`` from this model (None:
            export one for this call).

    Returns:
        ``{"out", "n", "geometry", "model_kind", "sample_seconds", "sample_ms_per_shower", "write_seconds",
        "n_shards", "n_sampled", "device", "engine"}``: ``sample_ms_per_shower`` is the sampling time of the
        ``n_sampled`` showers sampled in this call (shards reused from an interrupted call are not timed;
        NaN when every shard was reused).

    Raises:
        CalodistillError: invalid ``n``/energies/batch size, unknown model, an existing or unwritable output,
            energies outside the training range; nothing is written.
    """

    t_start = time.perf_counter()
    out = Path(out)
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or n <= 0:
        raise CalodistillError(f"-n: expected a positive number of showers, got {n!r}")
    if batch_size <= 0 or shard_size <= 0:
        raise CalodistillError(f"--batch-size/--shard-size: must be positive, got {batch_size}/{shard_size}")
    spec = parse_energy_spec(energies)
    if engine not in ("torch", "onnx"):
        raise CalodistillError(f"--engine: unknown {engine!r} (use torch or onnx)")
    if engine != "onnx" and onnx is not None:
        raise CalodistillError("--onnx: only with --engine onnx")
    if engine == "onnx" and scheduler:
        raise CalodistillError("--engine onnx: samples in this process; leave out --scheduler")
    _check_output(out, overwrite)
    with removing_created_parents(out), tempfile.TemporaryDirectory(prefix="calodistill-gen-") as tmp:
        bundle = ModelBundle.open(model, tracking_uri=tracking_uri, cache_dir=Path(tmp))
        check_energy_range(spec, energies, bundle.energy_range, allow_extrapolation)
        kind = bundle.kind
        geometry = bundle.geometry
        particle = bundle.particle
        dev = str(resolve_device(device))
        bundle.generator("cpu" if scheduler else dev)  # loads and checks the flows before anything is written
        if engine == "onnx":  # the torch path's showers on the CPU, through ONNX Runtime
            from .export import OnnxEngine

            bundle = OnnxEngine(bundle, onnx, Path(tmp))  # type: ignore[assignment]
        e_inc = spec.sample(int(n), seed=seed)
        n_shards = max(1, math.ceil(n / shard_size))
        out.parent.mkdir(parents=True, exist_ok=True)

        n_sampled = int(n)
        if n_shards == 1:
            t0 = time.perf_counter()
            voxels = _sample(bundle, e_inc, batch_size, dev, seed)
            sample_s = time.perf_counter() - t0
            from ..data.formats import write_showers
            from ..data.showers import Showers

            t1 = time.perf_counter()
            write_showers(Showers(geometry, e_inc, voxels, particle=particle), out)
            write_s = time.perf_counter() - t1
        else:
            # everything a shard's showers depend on: a resumed call with another set-up starts over
            manifest = {"model": str(model), "model_hash": bundle.digest, "n": int(n), "energies": energies,
                        "seed": seed, "shard_size": shard_size, "batch_size": batch_size, "device": dev,
                        "scheduler": bool(scheduler), **({"engine": engine} if engine != "torch" else {})}
            sample_s, write_s, n_sampled = _generate_sharded(
                bundle, e_inc, out, batch_size, dev, scheduler, seed, shard_size, parts_dir, progress,
                geometry, particle, manifest=manifest,
            )
    ms = 1000.0 * sample_s / n_sampled if n_sampled else float("nan")
    logger.info("generated %d showers with the %s in %.1f s (%.4f ms/shower sampling, timed on %d) -> %s",
                n, kind, time.perf_counter() - t_start, ms, n_sampled, out)
    return {"out": str(out), "n": int(n), "geometry": geometry.name, "model_kind": kind,
            "sample_seconds": sample_s, "sample_ms_per_shower": ms, "write_seconds": write_s,
            "n_shards": n_shards, "n_sampled": n_sampled, "device": dev, "engine": engine}


def _generate_sharded(bundle: ModelBundle, e_inc: np.ndarray, out: Path, batch_size: int, device: str,
                      scheduler: str | None, seed: int, shard_size: int, parts_dir: Path | None, progress: bool,
                      geometry: str, particle: str | None, manifest: dict[str, Any]) -> tuple[float, float, int]:
    """Sample the shards not yet written into the parts directory, then join them into ``out``.

    Returns:
        ``(sampling seconds, writing seconds, showers sampled in this call)``.
    """
    from ..data.formats import read_showers, write_showers
    from ..data.showers import Showers

    own_parts = parts_dir is None
    parts = Path(parts_dir) if parts_dir is not None else out.parent / f".{out.name}.parts"
    created = not parts.exists()
    parts.mkdir(parents=True, exist_ok=True)
    try:
        sample_s, n_sampled = _sample_shards(bundle, e_inc, out, parts, batch_size, device, scheduler, seed,
                                             shard_size, progress, geometry, particle, manifest)
    except BaseException:
        if created and not any(parts.glob("part-*")):  # nothing to resume from: leave nothing behind
            shutil.rmtree(parts, ignore_errors=True)
        raise
    n_shards = math.ceil(len(e_inc) / shard_size)
    suffix = out.suffix
    t1 = time.perf_counter()
    pieces = [read_showers(parts / f"part-{i:05d}{suffix}", geometry=geometry) for i in range(n_shards)]
    write_showers(Showers.concatenate(pieces), out)
    write_s = time.perf_counter() - t1
    if own_parts:
        shutil.rmtree(parts, ignore_errors=True)
    return sample_s, write_s, n_sampled


def _sample_shards(bundle: ModelBundle, e_inc: np.ndarray, out: Path, parts: Path, batch_size: int, device: str,
                   scheduler: str | None, seed: int, shard_size: int, progress: bool, geometry: str,
                   particle: str | None, manifest: dict[str, Any]) -> tuple[float, int]:
    """Write the shards missing from ``parts``; returns (sampling seconds, showers sampled)."""
    from tqdm.auto import tqdm

    manifest_path = parts / "manifest.json"
    try:
        old = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        old = None
    if old != manifest:
        if isinstance(old, dict):
            changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            logger.info("%s: partitions of another set-up (%s differ); starting over", parts, ", ".join(changed))
        for p in parts.iterdir():
            if p.is_file():
                p.unlink()
        atomic_write_json(manifest_path, manifest)
    n = len(e_inc)
    suffix = out.suffix
    jobs = []
    for i, start in enumerate(range(0, n, shard_size)):
        part = parts / f"part-{i:05d}{suffix}"
        if part.is_file():
            continue  # written atomically by an earlier, interrupted call
        jobs.append((e_inc[start:start + shard_size], batch_size, device, seed + i, str(part),
                     geometry, particle, start))
    client = None
    if scheduler and jobs:  # connect first: an unreachable scheduler is the only line the user sees
        from distributed import Client

        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise CalodistillError(f"--scheduler {scheduler}: cannot connect ({' '.join(str(exc).split())})") from None
    n_shards = math.ceil(n / shard_size)
    logger.info("%d shards of %d showers (%d already written) in %s", n_shards, shard_size,
                n_shards - len(jobs), parts)
    sample_s = 0.0
    n_sampled = sum(len(job[0]) for job in jobs)
    with tqdm(total=n_shards, initial=n_shards - len(jobs), unit="shard", desc=f"generate {out.name}",
              disable=None if progress else True) as bar:
        if client is not None:
            from distributed import as_completed

            with client:
                futures = [client.submit(_generate_shard, str(bundle.path), bundle.kind, *job, pure=False)
                           for job in jobs]
                for fut in as_completed(futures):
                    sample_s += fut.result()["sample_s"]
                    bar.update(1)
        else:
            for job in jobs:
                sample_s += _generate_shard(bundle, bundle.kind, *job)["sample_s"]
                bar.update(1)
    return sample_s, n_sampled


def write_sample_artifact(src: Path, dst: Path, n: int = 100) -> Path:
    """Copy the first ``n`` showers of a generated file to ``dst`` (same format), for MLflow artifacts."""
    from ..data.formats import read_showers, write_showers

    showers = read_showers(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return write_showers(showers.subset(np.arange(min(n, len(showers)))), dst)


# ----------------------------------------------------------------------------------------------- CLI


