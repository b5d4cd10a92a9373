"""Stage ``export``: the student as one ONNX graph for simulators, checked against the torch sampler.

``calodistill export --model MODEL --out student.onnx [--precision fp32|fp16|int8|int8-dynamic] [--opset N]
[--teacher-log-prob teacher_log_prob.onnx]``: :func:`export_onnx` opens the model
(:class:`~calodistill.pipeline.data.bundle.ModelBundle`), writes the sampler
(:func:`calodistill.flows.export.export_sampler`: ``incident_energy`` (N, 1) MeV and ``noise``
(N, L + D) in, ``showers`` (N, D) MeV out) with the model's geometry, particle, energy range, voxel
order and versions as metadata properties, and compares ONNX Runtime with the torch sampler on the
same noise before anything is published. A float32 graph must match or nothing is written: each
shower's summed |difference| within :data:`PARITY_RTOL` of its energy, the median voxel within
:data:`PARITY_MEDIAN_RTOL`, the zeros the same (up to :data:`PARITY_ZERO_FRACTION` of the voxels); the
largest single-voxel difference is reported, not gated: on a trained model a few tiny voxels in steep
parts of the splines differ by up to a few per cent between any two float32 evaluations (torch's own two
samplers too). Reduced precisions (:func:`calodistill.flows.onnx_precision.convert_precision`) are
compared the same way and their differences reported (their cost, not a refusal). Bad input is one line
and writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from ...flows.errors import FlowsError
from ...flows.onnx_precision import PRECISIONS
from ...flows.sampling import ShowerGenerator
from ..data.bundle import ModelBundle
from ..errors import CalodistillError
from ..outputs import check_output_file, removing_created_parents

__all__ = [
    "LOG_PROB_ATOL",
    "LOG_PROB_RTOL",
    "ONNX_SUFFIX",
    "PARITY_FLOOR_MEV",
    "PARITY_MEDIAN_RTOL",
    "PARITY_RTOL",
    "PARITY_ZERO_FRACTION",
    "compare_showers",
    "export_metadata",
    "export_onnx",
    "parity_energies",
    "voxel_order",
]

logger = logging.getLogger(__name__)

ONNX_SUFFIX = ".onnx"
#: A float32 graph: every shower's energy-weighted difference from torch, Σ|Δ| / Σ E, is within this.
PARITY_RTOL = 1e-4
#: ... and the median voxel (at or above the threshold) agrees within this, relative.
PARITY_MEDIAN_RTOL = 1e-5
#: ... and at most this fraction of the voxels is zero in one and not the other (rounding at the cut).
PARITY_ZERO_FRACTION = 1e-4
#: Models without a voxel threshold are compared on voxels of at least this many MeV (1 keV).
PARITY_FLOOR_MEV = 1e-3
#: The teacher's log-likelihood: |ONNX − torch| ≤ LOG_PROB_ATOL + LOG_PROB_RTOL·|torch| (a sum over D terms).
LOG_PROB_RTOL, LOG_PROB_ATOL = 1e-4, 1e-2
_DEFAULT_ENERGIES = (1e3, 1e5)  # MeV, for models that record no training range


# ----------------------------------------------------------------------------------------- checks
def _check_target(path: str | os.PathLike[str], option: str, overwrite: bool) -> Path:
    path = Path(path)
    if path.suffix.lower() != ONNX_SUFFIX:
        raise CalodistillError(f"{option} {path}: unknown format {path.suffix or '(no extension)'!r} (the export "
                               f"writes ONNX: give a file name ending in {ONNX_SUFFIX})")
    return check_output_file(path, overwrite=overwrite, option=option)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# --------------------------------------------------------------------------------------- metadata
def voxel_order(bundle: ModelBundle) -> str:
    """The voxel order of the model's showers, in words (the layout of the exported ``showers``)."""
    geo = bundle.geometry
    kinds = {layer.kind for layer in geo.layers}
    within = []
    if "cartesian" in kinds:
        within.append("row (y) then column (x) for Cartesian layers")
    if "polar" in kinds:
        within.append("angular bin then radial bin for polar layers")
    return (f"layer by layer ({', '.join(str(n) for n in geo.layer_sizes)} voxels), each layer in C order: "
            f"{'; '.join(within)}; the dataset's order")


def _version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def export_metadata(bundle: ModelBundle, model: str) -> dict[str, str]:
    """Metadata properties of an exported model: what it simulates and where it came from.

    Args:
        bundle: the opened model.
        model: how the model was named (directory or URI), recorded as ``source_model``.
    """
    from ..data.geometry import GEOMETRY_NAMES

    geo = bundle.geometry
    rng = bundle.energy_range
    props = {
        "geometry": geo.name,
        "particle": bundle.particle or "",
        "incident_energy_range_mev": json.dumps(list(rng)) if rng is not None else "unknown",
        "voxel_order": voxel_order(bundle),
        "source_model": str(model),
        "model_digest": bundle.weights_digest,
        "onnx_version": _version("onnx"),
        "onnxruntime_version": _version("onnxruntime"),
    }
    if geo.name not in GEOMETRY_NAMES:  # a custom geometry travels whole
        props["geometry_json"] = json.dumps(geo.to_dict())
    return props


# ----------------------------------------------------------------------------------------- parity
def parity_energies(bundle: ModelBundle, n: int, seed: int) -> np.ndarray:
    """``n`` incident energies (MeV), log-uniform over the model's training range (1–100 GeV if unknown)."""
    low, high = bundle.energy_range or _DEFAULT_ENERGIES
    rng = np.random.default_rng(seed)
    return np.exp(rng.uniform(math.log(low), math.log(high), n))


def compare_showers(got: np.ndarray, want: np.ndarray, threshold: float) -> dict[str, float]:
    """How far ``got`` is from ``want`` (both (N, D) MeV): per voxel, per shower, and in the zeros.

    Returns:
        ``max_rel_diff``, ``median_rel_diff`` and ``p99_rel_diff`` over voxels at or above ``threshold``
        in ``want`` that are non-zero in both (NaN when there are none); ``max_shower_rel_diff``, the
        largest ``Σ|got − want| / Σ want`` of a shower (its energy-weighted difference);
        ``zero_mismatches`` (voxels zero in one and not the other) and ``zero_mismatch_fraction`` (of all
        voxels); ``compared`` and ``finite``.
    """
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise CalodistillError(f"parity: shapes differ ({got.shape} vs {want.shape})")
    finite = bool(np.isfinite(got).all())
    both = (want >= threshold) & (want > 0) & (got > 0)
    rel = np.abs(got[both] - want[both]) / want[both]
    totals = want.sum(axis=1)
    per_shower = np.abs(got - want).sum(axis=1)[totals > 0] / totals[totals > 0]
    mismatch = int(((got == 0) != (want == 0)).sum())
    nan = float("nan")
    return {
        "max_rel_diff": float(rel.max()) if rel.size else nan,
        "median_rel_diff": float(np.median(rel)) if rel.size else nan,
        "p99_rel_diff": float(np.quantile(rel, 0.99)) if rel.size else nan,
        "max_shower_rel_diff": float(per_shower.max()) if per_shower.size else nan,
        "zero_mismatches": mismatch,
        "zero_mismatch_fraction": mismatch / max(got.size, 1),
        "compared": int(rel.size),
        "finite": finite,
    }


def _sampler_parity(generator: ShowerGenerator, path: Path, energies: np.ndarray,
                    seed: int) -> tuple[dict[str, float], np.ndarray]:
    """ONNX Runtime against the torch sampler on :func:`~calodistill.flows.export.draw_noise`'s noise."""
    from ...flows.export import OnnxSampler, draw_noise, sample_from_noise

    noise = draw_noise(generator, len(energies), seed=seed)
    want = sample_from_noise(generator, energies, noise)
    got = OnnxSampler(path, providers=["CPUExecutionProvider"]).sample(energies, noise)
    return compare_showers(got, want, generator.preprocessor.voxel_threshold or PARITY_FLOOR_MEV), want


def _fp32_failure(report: dict[str, float]) -> str | None:
    """Why a float32 graph fails its parity check (None: it passes; see the module docstring)."""
    if not report["finite"]:
        return "non-finite voxel energies"
    if not report["max_shower_rel_diff"] <= PARITY_RTOL:
        return (f"a shower differs by {report['max_shower_rel_diff']:.3g} of its energy (tolerance "
                f"{PARITY_RTOL:g})")
    if not report["median_rel_diff"] <= PARITY_MEDIAN_RTOL:
        return f"the median voxel differs by {report['median_rel_diff']:.3g} (tolerance {PARITY_MEDIAN_RTOL:g})"
    if report["zero_mismatch_fraction"] > PARITY_ZERO_FRACTION:
        return (f"{report['zero_mismatches']} voxels are zero in one and not in the other (more than "
                f"{PARITY_ZERO_FRACTION:g} of the voxels)")
    return None


def _log_prob_parity(generator: ShowerGenerator, path: Path, showers: np.ndarray,
                     energies: np.ndarray) -> dict[str, float]:
    from ...flows.export import onnx_session

    want = generator.log_prob(energies, showers, add_noise=False)["total"]
    session: Any = onnx_session(path, ["CPUExecutionProvider"])
    got = session.run(["log_prob"], {"showers": showers.astype(np.float32),
                                     "incident_energy": energies.astype(np.float32)[:, None]})[0]
    diff = np.abs(got.astype(np.float64) - want)
    bad = ~(diff <= LOG_PROB_ATOL + LOG_PROB_RTOL * np.abs(want))
    return {"max_abs_diff": float(diff.max()) if diff.size else float("nan"), "failures": int(bad.sum()),
            "finite": bool(np.isfinite(got).all())}


# ------------------------------------------------------------------------------------------ export
def _teacher_generator(bundle: ModelBundle, teacher: str | None, tracking_uri: str | None,
                       cache_dir: Path) -> tuple[ShowerGenerator, ModelBundle, str]:
    """The teacher for ``--teacher-log-prob`` (its generator, bundle and name): ``teacher`` if given, else
    one in the model's directory, else the teacher directory its provenance records."""
    if teacher is None and "teacher" in bundle.kinds:
        gen = ShowerGenerator(bundle.preprocessing, bundle.flow1, bundle.flow2_of("teacher"), device="cpu")
        return gen, bundle, str(bundle.path)
    if teacher is None:
        recorded = next((r.get("teacher_dir") for r in (bundle.records.get("provenance.json"),
                                                         bundle.records.get("distill_config.json"))
                         if isinstance(r, dict) and isinstance(r.get("teacher_dir"), str)), None)
        if recorded is None or not Path(recorded).is_dir():
            raise CalodistillError(f"--teacher-log-prob: {bundle.path} holds no teacher.pt and records no teacher "
                                   "directory that exists here; pass --teacher DIR_OR_URI")
        teacher = recorded
    tb = ModelBundle.open(teacher, tracking_uri=tracking_uri, cache_dir=cache_dir, kind="teacher", label="--teacher")
    return tb.generator("cpu"), tb, str(teacher)


def _publish(staged: Path, target: Path) -> None:
    """Move a checked file into place (a rename on the same file system; a copy then rename elsewhere)."""
    try:
        os.replace(staged, target)
    except OSError:
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        shutil.copyfile(staged, tmp)
        os.replace(tmp, target)


def export_onnx(model: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                precision: str = "fp32", opset: int = 18, teacher_log_prob: str | os.PathLike[str] | None = None,
                teacher: str | None = None, overwrite: bool = False, parity_n: int = 64, seed: int = 0,
                groups: int = 16, tracking_uri: str | None = None) -> dict[str, Any]:
    """Export the student sampler (and optionally the teacher's log-likelihood) as ONNX, checked.

    Args:
        model: the student: a model directory, a logged pyfunc directory or an MLflow model URI. With
            only ``teacher_log_prob``, a teacher directory is accepted too.
        out: the sampler's ``.onnx`` file (None: only ``teacher_log_prob``).
        precision: ``fp32``, ``fp16``, ``int8`` or ``int8-dynamic`` (the student's matrix weights; see
            :mod:`calodistill.flows.onnx_precision`).
        opset: ONNX opset (≥ 18: torch's exporter writes no lower).
        teacher_log_prob: also write the teacher's log-likelihood graph here.
        teacher: the teacher for ``teacher_log_prob`` (default: the model directory's own ``teacher.pt``,
            else the teacher directory recorded in its provenance).
        overwrite: replace existing outputs (else refused).
        parity_n: showers of the parity check.
        seed: seed of the parity check's energies and noise.
        groups: output-layer groups of the student's MADEs (1: dense).
        tracking_uri: MLflow tracking URI for ``models:/`` URIs.

    Returns:
        ``out``, ``size_bytes``, ``precision``, ``opset``, ``n_nodes``, ``export_seconds``,
        ``parity_showers`` and ``parity_*`` (the float32 graph against torch: :func:`compare_showers`);
        for reduced precisions also ``fidelity_*`` (the converted graph against torch); with ``teacher_log_prob``,
        ``teacher_log_prob``, ``teacher_log_prob_size_bytes`` and ``teacher_log_prob_max_abs_diff``;
        ``metadata`` (the properties written).

    Raises:
        CalodistillError: bad options, a teacher to export as a sampler, an existing (without
            ``overwrite``) or unwritable output, an unreadable model, a failed parity check; nothing is
            written then.
    """
    t0 = time.perf_counter()
    if precision not in PRECISIONS:
        raise CalodistillError(f"--precision: unknown {precision!r} (use {', '.join(PRECISIONS)})")
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < 18:
        raise CalodistillError(f"--opset: must be an integer >= 18 (torch's exporter writes no lower), got {opset!r}")
    if out is None and teacher_log_prob is None:
        raise CalodistillError("--out: give the file to write (or --teacher-log-prob for the teacher's likelihood)")
    if parity_n < 1:
        raise CalodistillError(f"--parity-showers: must be positive, got {parity_n}")
    out_path = _check_target(out, "--out", overwrite) if out is not None else None
    lp_path = _check_target(teacher_log_prob, "--teacher-log-prob", overwrite) if teacher_log_prob is not None else None
    if out_path is not None and lp_path is not None and out_path.resolve() == lp_path.resolve():
        raise CalodistillError(f"--teacher-log-prob {lp_path}: the same file as --out")
    targets = [p for p in (out_path, lp_path) if p is not None]
    result: dict[str, Any] = {"out": str(out_path) if out_path else None, "precision": precision, "opset": opset}
    with tempfile.TemporaryDirectory(prefix="calodistill-export-") as cache:
        bundle = ModelBundle.open(model, tracking_uri=tracking_uri, cache_dir=Path(cache))
        if out_path is not None and bundle.kind != "student":
            raise CalodistillError(f"--model {model}: holds a teacher (MAF), which samples in D sequential passes per "
                                   "block and does not export as a sampler; export the student (the teacher's "
                                   "likelihood exports with --teacher-log-prob)")
        generator = bundle.generator("cpu")  # loads every flow: a corrupt file fails here, before any write
        props = export_metadata(bundle, str(model))
        teacher_gen = None
        if lp_path is not None:
            teacher_gen, teacher_bundle, teacher_src = (
                _teacher_generator(bundle, teacher, tracking_uri, Path(cache)) if bundle.kind == "student"
                else (generator, bundle, str(model)))
            props_lp = {**props, "source_model": teacher_src, "model_digest": teacher_bundle.weights_digest}
        with _staging(targets) as staged:
            try:
                if out_path is not None:
                    result.update(_export_sampler_checked(generator, bundle, staged[out_path], props, precision,
                                                          opset, groups, parity_n, seed))
                if lp_path is not None and teacher_gen is not None:
                    result.update(_export_log_prob_checked(teacher_gen, bundle, generator, staged[lp_path], props_lp,
                                                           opset, parity_n, seed))
            except FlowsError as exc:
                raise CalodistillError(_one_line(exc)) from None
            for target in targets:
                _publish(staged[target], target)
    if out_path is not None:
        result["size_bytes"] = out_path.stat().st_size
    if lp_path is not None:
        result["teacher_log_prob"] = str(lp_path)
        result["teacher_log_prob_size_bytes"] = lp_path.stat().st_size
    result["metadata"] = props
    result["export_seconds"] = time.perf_counter() - t0
    logger.debug("export: %s", ", ".join(f"{k}={v}" for k, v in result.items() if k != "metadata"))
    return result


@contextlib.contextmanager
def _staging(targets: list[Path]) -> Iterator[dict[Path, Path]]:
    """A temporary path beside each target (same file system), removed on exit; a target's missing parent
    folders are created, and removed again on a failure."""
    with contextlib.ExitStack() as stack:
        staged: dict[Path, Path] = {}
        for target in targets:
            stack.enter_context(removing_created_parents(target))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent))
            staged[target] = Path(tmp) / target.name
        yield staged


def _export_sampler_checked(generator: ShowerGenerator, bundle: ModelBundle, staged: Path, props: dict[str, str],
                            precision: str, opset: int, groups: int, parity_n: int, seed: int) -> dict[str, Any]:
    import onnx

    from ...flows.export import export_sampler
    from ...flows.onnx_precision import convert_precision

    fp32 = staged.with_name(f"fp32-{staged.name}") if precision != "fp32" else staged
    t0 = time.perf_counter()
    export_sampler(generator, fp32, metadata={**props, "precision": "fp32"}, opset=opset, groups=groups)
    out: dict[str, Any] = {"graph_seconds": time.perf_counter() - t0}
    energies = parity_energies(bundle, parity_n, seed)
    report, _ = _sampler_parity(generator, fp32, energies, seed)
    out.update({"parity_showers": parity_n,
                **{f"parity_{k}": v for k, v in report.items()}})
    failure = _fp32_failure(report)
    if failure is not None:
        raise CalodistillError(f"--out: parity check failed on {parity_n} showers: ONNX Runtime and the torch "
                               f"sampler disagree ({failure}); nothing written")
    logger.info("parity (fp32, %d showers): shower energy-weighted difference up to %.3g, voxels: median %.3g, "
                "max %.3g; %d zero mismatches", parity_n, report["max_shower_rel_diff"], report["median_rel_diff"],
                report["max_rel_diff"], report["zero_mismatches"])
    if precision != "fp32":
        convert_precision(fp32, staged, precision)
        fp32.unlink()
        report, _ = _sampler_parity(generator, staged, energies, seed)
        if not report["finite"]:
            raise CalodistillError(f"--precision {precision}: the converted graph gives non-finite energies; "
                                   "nothing written")
        out.update({f"fidelity_{k}": v for k, v in report.items()})
        logger.info("%s against torch: median rel diff %.3g, max %.3g, %d zero mismatches", precision,
                    report["median_rel_diff"], report["max_rel_diff"], report["zero_mismatches"])
    out["n_nodes"] = len(onnx.load(str(staged), load_external_data=False).graph.node)
    return out


def _export_log_prob_checked(teacher: ShowerGenerator, bundle: ModelBundle, generator: ShowerGenerator, staged: Path,
                             props: dict[str, str], opset: int, parity_n: int, seed: int) -> dict[str, Any]:
    from ...flows.export import export_teacher_log_prob

    export_teacher_log_prob(teacher, staged, metadata={**props, "precision": "fp32"}, opset=opset)
    n = min(parity_n, 16) if generator.kind == "teacher" else parity_n  # a teacher samples voxel by voxel
    energies = parity_energies(bundle, n, seed)
    showers = generator.sample(energies, seed=seed)
    report = _log_prob_parity(teacher, staged, showers, energies)
    if not report["finite"] or report["failures"]:
        raise CalodistillError(f"--teacher-log-prob: parity check failed on {n} showers: ONNX Runtime and torch "
                               f"log-likelihoods differ by up to {report['max_abs_diff']:.3g}; nothing written")
    return {"teacher_log_prob_max_abs_diff": report["max_abs_diff"], "teacher_log_prob_parity_showers": n}


# ------------------------------------------------------------------------------ generate --engine onnx
class _OnnxGenerator:
    """``sample(energies, batch_size, seed)`` as :meth:`ShowerGenerator.sample`, through ONNX Runtime on the
    noise the torch sampler draws for the same seed (on the CPU)."""

    def __init__(self, generator: ShowerGenerator, sampler: Any) -> None:
        self.torch_generator = generator
        self.sampler = sampler

    def sample(self, energies: np.ndarray, batch_size: int = 10_000, seed: int | None = 0) -> np.ndarray:
        from ...flows.export import iter_noise

        energies = np.asarray(energies, dtype=np.float64).reshape(-1)
        out = np.zeros((energies.size, self.sampler.n_voxels), dtype=np.float32)
        for rows, noise in iter_noise(self.torch_generator, energies.size, batch_size, 0 if seed is None else seed):
            out[rows] = self.sampler.sample(energies[rows], noise)
        return out


class OnnxEngine:
    """A :class:`ModelBundle` whose generator samples through ONNX Runtime (``generate --engine onnx``).

    Everything else (geometry, energy range, digest, ...) is the bundle's. The graph is ``onnx`` (an
    exported sampler of this model: same shapes and, when recorded, the same weights digest) or, if None,
    exported from the model into ``cache_dir`` and checked as :func:`export_onnx` checks it.

    Args:
        bundle: the opened model (a student).
        onnx: an ``.onnx`` file written by ``calodistill export``, or None.
        cache_dir: where a graph exported on the fly goes.
        threads: ONNX Runtime intra-op threads (None: its default).
    """

    def __init__(self, bundle: ModelBundle, onnx: str | os.PathLike[str] | None, cache_dir: Path,
                 threads: int | None = None) -> None:
        from ...flows.export import OnnxSampler

        if bundle.kind != "student":
            raise CalodistillError(f"--engine onnx: {bundle.path} holds a teacher, which does not export as a "
                                   "sampler; use the student or --engine torch")
        generator = bundle.generator("cpu")
        if onnx is None:
            path = Path(cache_dir) / "student.onnx"
            try:
                _export_sampler_checked(generator, bundle, path, export_metadata(bundle, str(bundle.path)), "fp32",
                                        18, 16, 16, 0)
            except FlowsError as exc:
                raise CalodistillError(_one_line(exc)) from None
        else:
            path = Path(onnx)
        try:
            sampler = OnnxSampler(path)
        except FlowsError as exc:
            raise CalodistillError(f"--onnx {_one_line(exc)}") from None
        digest = sampler.metadata.get("model_digest")
        pre = bundle.preprocessing
        if sampler.n_voxels != pre.n_voxels or sampler.noise_features != pre.n_layers + pre.n_voxels:
            raise CalodistillError(f"--onnx {path}: a sampler of {sampler.n_voxels} voxels and "
                                   f"{sampler.noise_features} noise columns, but the model has {pre.n_voxels} voxels "
                                   f"and {pre.n_layers} layers")
        if digest is not None and digest != bundle.weights_digest:
            raise CalodistillError(f"--onnx {path}: exported from another model (weights digest {digest}, --model "
                                   f"{bundle.path} has {bundle.weights_digest})")
        self._bundle = bundle
        self.onnx_path = path
        self.precision = sampler.metadata.get("precision", "fp32")
        self._generator = _OnnxGenerator(generator, sampler)

    def generator(self, device: Any = None) -> _OnnxGenerator:
        """The ONNX Runtime sampler (``device`` is ignored: ONNX Runtime picks its providers)."""
        return self._generator

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bundle, name)
