"""The evaluation stage: compare generated showers with a reference, as the CaloChallenge 2022 did.

``evaluate_showers`` reads a reference (a calodistill dataset directory, whose ``test`` split is used,
or a shower file) and one or more generated shower files, and writes into ``out_dir``:

- ``metrics.json``: a flat ``{name: float}`` dict (what the pipeline logs to MLflow);
- ``details.json``: the same plus structure (per-observable separation powers, energy-bin edges, inputs);
- ``plots/``: average shower images, one histogram per observable with a ratio panel, NLL/KL per
  incident-energy bin, training curves of the models;
- ``report.md``: a short markdown summary with the published CaloChallenge numbers beside ours.

Metrics (``<label>`` is the generated file's stem, e.g. ``teacher`` for ``teacher.h5``):

- ``auc_low_<label>``, ``auc_high_<label>``: classifier AUC, generated vs reference, low-level input
  (``[log10 E_inc, voxels / E_inc]``) and high-level input (the observables); ``jsd_low_<label>`` ...;
- ``auc_low_baseline``, ``auc_high_baseline`` (and ``auc_baseline`` = the low-level one): one half of
  the reference against the other half — what "indistinguishable" looks like at this sample size;
- ``sep_max_<label>``, ``sep_mean_<label>``, ``sep_<observable>_<label>``: separation powers
  (:mod:`pipeline.observables`), and ``sep_max_baseline``;
- with ``teacher_dir``/``student_dir``: ``nll_teacher`` (mean per shower on the reference),
  ``nll_teacher_subset`` and ``nll_student_subset`` (the student's exact density is slow: a subset),
  ``kl_student_teacher``, each also per incident-energy bin (``..._ebin<k>``), and the sampling time per
  shower ``time_ms_per_shower_<model>_b<batch>`` for batch sizes 1, 100, 10 000;
- ``calochallenge_layout_ok_<label>``: 1 when a generated CaloChallenge HDF5 file has the layout of the
  binning XML (see :func:`check_calochallenge_layout`).

References:
    Fast Calorimeter Simulation Challenge 2022 (CaloChallenge/homepage), evaluation code and final
    results, arXiv:2410.21611. C. Krause, D. Shih, CaloFlow II, arXiv:2110.11377.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...flows.device import resolve_device
from ..data.geometry import Geometry
from ..data.showers import Showers
from ..data.store import PipelineRun, find_pipeline_run
from ..errors import CalodistillError
from ..metrics.classifier import ClassifierConfig
from ..metrics.observables import DEFAULT_THRESHOLD_MEV
from ..metrics.timing import DEFAULT_TIMING_BATCHES, time_per_shower

__all__ = [
    "evaluate_showers",
    "load_reference",
    "generated_labels",
    "check_calochallenge_layout",
    "energy_bin_edges",
    "shower_log_likelihood",
    "model_likelihoods",
    "kl_per_shower",
    "time_per_shower",
    "published_results",
    "PipelineRun",
    "find_pipeline_run",
]

logger = logging.getLogger(__name__)

REFERENCE_LABEL = "reference"

# The CaloChallenge 2022 leaderboard file of each geometry (arXiv:2410.21611, CaloChallenge/homepage).
_RESULTS_FILES = {
    "calochallenge-1-photons": "CaloChallenge_results_ds1_photons.hdf",
    "calochallenge-1-pions": "CaloChallenge_results_ds1_pions.hdf",
    "calochallenge-2": "CaloChallenge_results_ds2.hdf",
    "calochallenge-3": "CaloChallenge_results_ds3.hdf",
}
# Published dataset-1-photons numbers of CaloFlow (arXiv:2410.21611, the leaderboard file above), used when
# that file cannot be read: AUC low / high level, time per shower at batch 10 000 in ms (GPU / CPU).
_CALOFLOW_DS1_PHOTONS = {
    "GEANT4": {"auc_low": 0.49916, "auc_high": 0.49945},
    "CaloFlow teacher": {"auc_low": 0.73298, "auc_high": 0.63586, "time_gpu_10000": 8.130995, "time_cpu_10000": 1911.648107},
    "CaloFlow student": {"auc_low": 0.76064, "auc_high": 0.66658, "time_gpu_10000": 0.261481, "time_cpu_10000": 6.108367},
}


# ----------------------------------------------------------------------------------------------- inputs
def load_reference(path: Path | str, geometry: str | None = None, max_showers: int | None = None, seed: int = 0) -> Showers:
    """The reference showers: the ``test`` split of a dataset directory, or every shower of a file.

    Args:
        path: a calodistill dataset directory or a shower file (HDF5, Parquet, CSV).
        geometry: geometry name for files that do not say.
        max_showers: keep a seeded random subset of at most this many.
        seed: seeds that subset.
    """
    path = Path(path)
    if not path.exists():
        raise CalodistillError(f"{path}: reference does not exist")
    if path.is_dir():
        from ..data.dataset import open_dataset

        showers = open_dataset(path).load("test")
    else:
        from ..data.formats import read_showers

        showers = read_showers(path, geometry)
    if len(showers) == 0:
        raise CalodistillError(f"{path}: no reference showers")
    return _subsample(showers, max_showers, seed)


def _subsample(showers: Showers, max_showers: int | None, seed: int) -> Showers:
    if max_showers is None or len(showers) <= max_showers:
        return showers
    idx = np.sort(np.random.default_rng(seed).choice(len(showers), int(max_showers), replace=False))
    return showers.subset(idx)


def generated_labels(generated: list[Path | str] | dict[str, Path | str]) -> dict[str, Path]:
    """Label → path: the file stem (``teacher.h5`` → ``teacher``), or ``LABEL=PATH`` entries, or a dict."""
    if isinstance(generated, dict):
        items = [(str(k), Path(v)) for k, v in generated.items()]
    else:
        items = []
        for entry in generated:
            text = str(entry)
            if "=" in text and not Path(text).exists():
                label, _, p = text.partition("=")
                items.append((label, Path(p)))
            else:
                items.append((Path(text).stem, Path(text)))
    out: dict[str, Path] = {}
    for label, p in items:
        if not label or not label.replace("-", "_").replace(".", "_").isidentifier():
            raise CalodistillError(f"{p}: label {label!r} must be a simple name (letters, digits, _ - .)")
        if label in (REFERENCE_LABEL, "baseline"):
            raise CalodistillError(f"{p}: label {label!r} is reserved; rename the file or pass LABEL=PATH")
        if label in out:
            raise CalodistillError(f"{p}: label {label!r} given twice (also {out[label]}); pass LABEL=PATH")
        out[label] = p
    if not out:
        raise CalodistillError("generated: at least one generated file is needed")
    return out


def check_calochallenge_layout(path: Path | str, geometry: Geometry | str) -> int:
    """Check that an HDF5 file is a valid input of the CaloChallenge evaluation tooling.

    The layout: datasets ``incident_energies`` (N, 1) and ``showers`` (N, D) of floats in MeV, with D the
    number of voxels of the binning XML (layers × angular bins × radial bins, in that order), finite and
    non-negative energies, positive incident energies.

    Args:
        path: the HDF5 file.
        geometry: a CaloChallenge :class:`Geometry` (from the binning XML), its registry name, or the path
            of a binning XML file.

    Returns:
        The number of showers N.
    """
    import h5py

    from ..data.geometry import geometry_from_xml, get_geometry

    if isinstance(geometry, str):
        geometry = geometry_from_xml(geometry, Path(geometry).stem) if geometry.endswith(".xml") else get_geometry(geometry)
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CalodistillError(f"{path}: not a readable HDF5 file ({exc})") from exc
    with f:
        for key in ("incident_energies", "showers"):
            if key not in f:
                raise CalodistillError(f"{path}: CaloChallenge layout needs dataset {key!r} (found {sorted(f.keys())})")
        e, s = f["incident_energies"], f["showers"]
        if e.ndim != 2 or e.shape[1] != 1:
            raise CalodistillError(f"{path}: incident_energies must have shape (N, 1), got {e.shape}")
        if s.ndim != 2 or s.shape[1] != geometry.n_voxels:
            raise CalodistillError(
                f"{path}: showers must have shape (N, {geometry.n_voxels}) for {geometry.name}, got {s.shape}"
            )
        if s.shape[0] != e.shape[0]:
            raise CalodistillError(f"{path}: {s.shape[0]} showers but {e.shape[0]} incident energies")
        if not (np.issubdtype(e.dtype, np.floating) and np.issubdtype(s.dtype, np.floating)):
            raise CalodistillError(f"{path}: energies must be floating point, got {e.dtype} / {s.dtype}")
        energies = e[:, 0]
        if not np.all(np.isfinite(energies)) or np.any(energies <= 0):
            raise CalodistillError(f"{path}: incident_energies must be finite and positive (MeV)")
        for start in range(0, s.shape[0], 20_000):
            block = s[start : start + 20_000]
            if not np.all(np.isfinite(block)):
                raise CalodistillError(f"{path}: showers hold NaN or infinite values")
            if np.any(block < 0):
                raise CalodistillError(f"{path}: showers hold negative energies")
        return int(s.shape[0])


def _is_hdf5(path: Path) -> bool:
    return path.suffix.lower() in (".h5", ".hdf5")


# ---------------------------------------------------------------------------------------- likelihoods
def energy_bin_edges(incident_energy: np.ndarray, n_bins: int = 5) -> np.ndarray:
    """Incident-energy bin edges (MeV): one bin per energy for a discrete spectrum with at most ``n_bins``
    values (edges at geometric midpoints), else ``n_bins`` logarithmic bins from the minimum to the maximum."""
    e = np.asarray(incident_energy, dtype=np.float64)
    e = e[np.isfinite(e) & (e > 0)]
    if e.size == 0:
        raise CalodistillError("energy bins: no positive incident energies")
    uniq = np.unique(e)
    if len(uniq) == 1:
        return np.array([uniq[0] * 0.99, uniq[0] * 1.01])
    if len(uniq) <= n_bins:
        mids = np.sqrt(uniq[1:] * uniq[:-1])
        return np.concatenate([[uniq[0] * 0.99], mids, [uniq[-1] * 1.01]])
    edges = np.geomspace(uniq[0], uniq[-1], n_bins + 1)
    edges[0] *= 0.999
    edges[-1] *= 1.001
    return edges


def _per_bin(values: np.ndarray, energies: np.ndarray, edges: np.ndarray) -> np.ndarray:
    idx = np.clip(np.searchsorted(edges, energies, side="right") - 1, 0, len(edges) - 2)
    return np.array([values[idx == k].mean() if np.any(idx == k) else np.nan for k in range(len(edges) - 1)])


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def shower_log_likelihood(
    generator: Any, showers: Showers, batch_size: int = 1024, device: str | None = None, seed: int = 0
) -> np.ndarray:
    """Per-shower log-likelihood under a shower generator (Flow I + Flow II), nats.

    Uses :meth:`flows.sampling.ShowerGenerator.log_prob` (its ``"total"``): the density in the flows'
    preprocessed (logit) space. That space is the same for a teacher and its student (they share the
    preprocessing and Flow I), so their values are directly comparable; the preprocessing noise is drawn
    from ``seed``, so both see the same noisy inputs.

    Args:
        generator: a :class:`flows.sampling.ShowerGenerator`.
        showers: the showers to score.
        batch_size: showers per pass (the student's exact density costs D sequential passes per batch).
        device: torch device (moves the generator there).
        seed: seeds the preprocessing noise.

    Returns:
        ``(N,)`` float64 log-likelihoods.
    """
    if device is not None and hasattr(generator, "to"):
        generator.to(device)
    lp = generator.log_prob(showers.incident_energy, showers.voxels, batch_size=batch_size, seed=seed)
    if isinstance(lp, dict):
        lp = lp["total"]
    return _to_numpy(lp).astype(np.float64).reshape(-1)


def _load_generator(model_dir: Path, kind: str, device: Any) -> Any:
    from ...flows.serialization import load_generator

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CalodistillError(f"{model_dir}: {kind} model directory does not exist")
    return load_generator(model_dir, prefer=kind, device=device)


def model_likelihoods(
    reference: Showers,
    teacher: Any | None,
    student: Any | None,
    edges: np.ndarray,
    max_showers: int = 5000,
    student_max_showers: int = 200,
    kl_samples: int = 2000,
    device: str | None = None,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Teacher NLL, student exact NLL (subset) and KL(student ‖ teacher), overall and per energy bin.

    Args:
        reference: held-out showers (the test split).
        teacher: the teacher generator, or None.
        student: the student generator, or None.
        edges: incident-energy bin edges (:func:`energy_bin_edges`).
        max_showers: teacher NLL on at most this many reference showers.
        student_max_showers: the student's exact density (D sequential passes) on at most this many; the
            teacher is scored on the same subset (``nll_teacher_subset``) for a like-for-like comparison.
        kl_samples: student samples for the KL estimate (conditions drawn from the reference).
        device: torch device.
        seed: seeds the subsets and the student's samples.

    Returns:
        ``(metrics, per_bin)``: flat metrics and ``{name: value per bin}`` for the plots.
    """
    rng = np.random.default_rng(seed)
    metrics: dict[str, float] = {}
    per_bin: dict[str, list[float]] = {}

    def pick(n: int) -> Showers:
        return _subsample(reference, n, int(rng.integers(2**31)))

    def record(name: str, values: np.ndarray, energies: np.ndarray) -> None:
        metrics[name] = float(np.mean(values))
        bins = _per_bin(values, energies, edges)
        per_bin[name] = [float(b) for b in bins]
        for k, b in enumerate(bins):
            if np.isfinite(b):
                metrics[f"{name}_ebin{k}"] = float(b)

    if teacher is not None:
        part = pick(max_showers)
        t0 = time.perf_counter()
        record("nll_teacher", -shower_log_likelihood(teacher, part, device=device, seed=seed), part.incident_energy)
        logger.info("teacher NLL on %d showers in %.1f s", len(part), time.perf_counter() - t0)
    if student is not None:
        part = pick(student_max_showers)
        t0 = time.perf_counter()
        record("nll_student_subset", -shower_log_likelihood(student, part, batch_size=256, device=device, seed=seed),
               part.incident_energy)
        logger.info("student exact NLL on %d showers in %.1f s", len(part), time.perf_counter() - t0)
        if teacher is not None:
            record("nll_teacher_subset", -shower_log_likelihood(teacher, part, device=device, seed=seed),
                   part.incident_energy)
    if teacher is not None and student is not None:
        part = pick(kl_samples)
        kl = kl_per_shower(student, teacher, part, resolve_device(device), seed)
        record("kl_student_teacher", kl, part.incident_energy)
    return metrics, per_bin


def kl_per_shower(student: Any, teacher: Any, showers: Showers, device: Any, seed: int, batch_size: int = 1024) -> np.ndarray:
    """log q_S(x|c) − log p_T(x|c) for one Flow II student sample x per reference condition c.

    The single-sample Monte-Carlo terms of KL(q_student ‖ p_teacher) (as :func:`flows.losses.kl_student_teacher`,
    kept per shower so they can be binned in incident energy); their mean is the KL estimate in nats.

    Args:
        student: the student generator (IAF Flow II with ``sample_and_log_prob``).
        teacher: the teacher generator (MAF Flow II).
        showers: the conditions (incident and layer energies) come from these showers.
        device: torch device of both generators.
        seed: seeds the student's samples and the preprocessing noise.
    """
    import torch

    pre = student.preprocessor
    s_flow, t_flow = student.flow2, teacher.flow2
    s_dtype = next(s_flow.parameters()).dtype
    t_dtype = next(t_flow.parameters()).dtype
    gen = torch.Generator(device=device).manual_seed(int(seed))
    out = []
    with torch.no_grad():
        for start in range(0, len(showers), batch_size):
            part = showers.subset(slice(start, start + batch_size))
            _, cond = pre.flow2_inputs(part.incident_energy, part.voxels, rng=np.random.default_rng(seed + start))
            ctx = torch.as_tensor(_to_numpy(cond), device=device)
            x, log_q = s_flow.sample_and_log_prob(ctx.to(s_dtype), generator=gen)
            log_p = t_flow.log_prob(x.to(t_dtype), context=ctx.to(t_dtype))
            out.append((log_q.double() - log_p.double()).cpu().numpy().reshape(-1))
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------ timing

# ------------------------------------------------------------------------------------ published numbers
def _results_dir() -> Path | None:
    env = os.environ.get("CALODISTILL_RESULTS_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "calochallenge-results")
    return next((c for c in candidates if c.is_dir()), None)


def published_results(geometry_name: str) -> tuple[str, dict[str, dict[str, float]]]:
    """Published CaloChallenge 2022 numbers to put beside ours.

    Reads the leaderboard file of the geometry's dataset (``CALODISTILL_RESULTS_DIR`` or
    ``../shared/data/real/calochallenge-results`` beside the checkout; needs pandas + tables). For a
    geometry that is not a CaloChallenge dataset, or when the file cannot be read, the CaloFlow numbers
    on dataset 1 photons (arXiv:2410.21611) are returned for orientation.

    Returns:
        ``(caption, {submission: {auc_low, auc_high, time_gpu_10000, time_cpu_10000}})``.
    """
    name = geometry_name if geometry_name in _RESULTS_FILES else "calochallenge-1-photons"
    caption = f"CaloChallenge 2022, {name.replace('calochallenge-', 'dataset ')} (arXiv:2410.21611)"
    if name != geometry_name:
        caption += f" — a different geometry from {geometry_name}, for orientation only"
    rdir = _results_dir()
    if rdir is not None and (rdir / _RESULTS_FILES[name]).is_file():
        try:
            import pandas as pd

            df = pd.read_hdf(rdir / _RESULTS_FILES[name])
            rows: dict[str, dict[str, float]] = {}
            for _, row in df.iterrows():
                sub = str(row["submission name"])
                if sub not in ("GEANT4", "CaloFlow teacher", "CaloFlow student", "CaloFlow"):
                    continue
                vals = {
                    "auc_low": row.get("binary cls low"),
                    "auc_high": row.get("binary cls high"),
                    "time_gpu_10000": row.get("time GPU 10000"),
                    "time_cpu_10000": row.get("time CPU 10000"),
                }
                rows[sub] = {k: float(v) for k, v in vals.items() if v is not None and np.isfinite(float(v))}
            if rows:
                return caption, rows
        except Exception as exc:  # noqa: BLE001 - an optional table; fall back to the constants below
            logger.info("published results: cannot read %s (%s); using built-in numbers", rdir, exc)
    if name != "calochallenge-1-photons":
        return caption + " (leaderboard file not found)", {}
    return caption, {k: dict(v) for k, v in _CALOFLOW_DS1_PHOTONS.items()}


# ------------------------------------------------------------------------------------ pipeline runs

# ------------------------------------------------------------------------------------------------ history
def _load_history(model_dir: Path) -> Any | None:
    """Per-epoch training metrics of a model directory (``history.json`` or the last checkpoint)."""
    model_dir = Path(model_dir)
    for name in ("history.json", "training_history.json", "train_history.json"):
        p = model_dir / name
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            return data.get("history", data) if isinstance(data, dict) else data
    for p in sorted(model_dir.rglob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("history"), (list, dict)) and data["history"]:
            return data["history"]
    for p in sorted(model_dir.rglob("last.pt")):
        try:
            import torch

            ckpt = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - checkpoints with non-tensor payloads are not loadable safely
            continue
        if isinstance(ckpt, dict) and ckpt.get("history"):
            return ckpt["history"]
    return None


def _split_histories(name: str, history: Any) -> dict[str, Any]:
    """``{"flow1": [...], "teacher": [...]}`` (one history per trained flow) → ``{"teacher_flow1": ..., "teacher": ...}``."""
    if not history:
        return {}
    if isinstance(history, dict) and history and all(isinstance(v, list) and v and isinstance(v[0], dict)
                                                     for v in history.values()):
        return {(name if part == name else f"{name}_{part}"): v for part, v in history.items()}
    return {name: history}


# ------------------------------------------------------------------------------------------------ stage
def _write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _sample_model(generator: Any, reference: Showers, n: int, device: Any, seed: int) -> Showers:
    part = _subsample(reference, n, seed + 17)
    vox = generator.sample(part.incident_energy, batch_size=min(10_000, len(part)), seed=seed, device=str(device))
    return Showers(reference.geometry, part.incident_energy, _to_numpy(vox).astype(np.float32))


def evaluate_showers(
    reference: Path | str | Showers,
    generated: list[Path | str] | dict[str, Path | str],
    out_dir: Path | str,
    teacher_dir: Path | str | None = None,
    student_dir: Path | str | None = None,
    classifier: ClassifierConfig | dict | None = None,
    run_classifier: bool = True,
    threshold: float = DEFAULT_THRESHOLD_MEV,
    bins: int = 50,
    n_energy_bins: int = 5,
    max_showers: int | None = 50_000,
    likelihood_max_showers: int = 5000,
    student_nll_max_showers: int = 200,
    kl_samples: int = 2000,
    timing_batch_sizes: tuple[int, ...] | None = DEFAULT_TIMING_BATCHES,
    timing_max_seconds: float = 60.0,
    sample_missing: bool = True,
    model_samples: int = 10_000,
    geometry: str | None = None,
    device: str | None = None,
    seed: int = 0,
    plots: bool = True,
    observable_plots: bool = True,
    classifier_equal_sizes: bool = True,
) -> dict[str, float]:
    """Evaluate generated showers against a reference; write metrics.json, details.json, plots/, report.md.

    Args:
        reference: a dataset directory (its ``test`` split), a shower file, or :class:`Showers`.
        generated: shower files; labels are the file stems (``teacher.h5`` → ``teacher``), or pass
            ``{label: path}`` / ``"label=path"``.
        out_dir: output folder (created).
        teacher_dir: the trained teacher (enables likelihoods and timing), optional.
        student_dir: the distilled student, optional.
        classifier: :class:`ClassifierConfig` or a dict for :meth:`ClassifierConfig.from_dict`.
        run_classifier: False skips the classifier tests.
        threshold: sparsity threshold (MeV).
        bins: histogram bins of the separation powers.
        n_energy_bins: incident-energy bins of the likelihood metrics.
        max_showers: cap on the reference and on every generated sample (seeded subsets).
        likelihood_max_showers: teacher NLL on at most this many reference showers.
        student_nll_max_showers: student exact NLL on at most this many (D sequential passes each batch).
        kl_samples: student samples of the KL(student ‖ teacher) estimate.
        timing_batch_sizes: batch sizes of the timing; None or () skips it.
        timing_max_seconds: budget of one timing call (larger batches are skipped).
        sample_missing: with a model directory but no generated file of that label (``teacher`` /
            ``student``), sample showers from the model (incident energies of the reference).
        model_samples: at most this many showers sampled per model (MAF sampling is slow on a CPU).
        geometry: geometry name for files that do not say.
        device: torch device for classifiers and models (default CUDA when present).
        seed: seeds every subset, split, network and sample.
        plots: False skips the figures.
        observable_plots: False skips the observable histograms (the slowest figures) but keeps the others.
        classifier_equal_sizes: every generated sample enters the classifier tests with the same number
            of showers (the smallest sample's, a seeded subset; ``n_classifier``): a classifier trained on
            more showers finds more differences, so AUCs of samples of different sizes do not compare
            (on the quickstart, one student scored 0.96 high-level with 2 000 showers and 0.70 with 300).

    Returns:
        The flat metrics dict also written to ``metrics.json``.
    """
    from ..data.formats import read_showers
    from ..metrics.classifier import (
        classifier_two_sample_test,
        high_level_features,
        low_level_features,
    )
    from ..metrics.observables import compute_observables, separation_powers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cls_config = classifier if isinstance(classifier, ClassifierConfig) else ClassifierConfig.from_dict(classifier)
    if device is not None and cls_config.device is None:
        cls_config = ClassifierConfig(**{**cls_config.__dict__, "device": device})
    t_start = time.perf_counter()

    ref = reference if isinstance(reference, Showers) else load_reference(reference, geometry, max_showers, seed)
    geo = ref.geometry
    labels = generated_labels(generated) if generated else {}
    samples: dict[str, Showers] = {}
    metrics: dict[str, float] = {"n_reference": float(len(ref))}
    details: dict[str, Any] = {"geometry": geo.name, "reference": str(reference) if not isinstance(reference, Showers) else "<in memory>",
                               "generated": {k: str(v) for k, v in labels.items()}}
    for label, path in labels.items():
        if not path.is_file():
            raise CalodistillError(f"{path}: generated file does not exist")
        if _is_hdf5(path) and geo.name.startswith("calochallenge"):
            check_calochallenge_layout(path, geo)
            metrics[f"calochallenge_layout_ok_{label}"] = 1.0
        showers = read_showers(path, geo.name)
        if showers.geometry.n_voxels != geo.n_voxels or showers.geometry.name != geo.name:
            raise CalodistillError(f"{path}: geometry {showers.geometry.name} does not match the reference's {geo.name}")
        if len(showers) == 0:
            raise CalodistillError(f"{path}: no showers")
        if not np.all(np.isfinite(showers.voxels)):
            raise CalodistillError(f"{path}: showers hold NaN or infinite values")
        samples[label] = _subsample(showers, max_showers, seed + 1)

    dev = resolve_device(device)
    models: dict[str, Any] = {}
    for name, mdir in (("teacher", teacher_dir), ("student", student_dir)):
        if mdir is not None:
            models[name] = _load_generator(Path(mdir), name, dev)
            for part, history in _split_histories(name, _load_history(Path(mdir))).items():
                details.setdefault("history", {})[part] = history
            if sample_missing and name not in samples:
                t0 = time.perf_counter()
                samples[name] = _sample_model(models[name], ref, min(len(ref), model_samples), dev, seed)
                logger.info("sampled %d %s showers in %.1f s", len(samples[name]), name, time.perf_counter() - t0)
    if not samples:
        raise CalodistillError("generated: nothing to evaluate (no generated files and no models to sample)")
    for label, s in samples.items():
        metrics[f"n_{label}"] = float(len(s))

    # Observables and separation powers (the baseline: one half of the reference against the other).
    obs_ref = compute_observables(ref, threshold)
    obs = {label: compute_observables(s, threshold) for label, s in samples.items()}
    halves = np.random.default_rng(seed).permutation(len(ref))
    half_a, half_b = np.sort(halves[: len(ref) // 2]), np.sort(halves[len(ref) // 2 :])
    seps: dict[str, dict[str, float]] = {}
    for label in obs:
        seps[label] = separation_powers(obs_ref, obs[label], bins)
    if len(ref) >= 4:
        seps["baseline"] = separation_powers({k: v[half_a] for k, v in obs_ref.items()},
                                             {k: v[half_b] for k, v in obs_ref.items()}, bins)
    for label, s in seps.items():
        values = np.array(list(s.values()))
        metrics[f"sep_max_{label}"] = float(values.max())
        metrics[f"sep_mean_{label}"] = float(values.mean())
        if label != "baseline":
            for name, v in s.items():
                metrics[f"sep_{name}_{label}"] = float(v)
    details["separation_power"] = seps

    # Classifier two-sample tests.
    if run_classifier:
        feats_ref = {"low": low_level_features(ref), "high": high_level_features(ref, obs_ref)}
        jobs: list[tuple[str, Any, Any]] = []
        n_cls = min(len(s) for s in samples.values()) if classifier_equal_sizes else None
        for label, s in samples.items():
            feats = {"low": low_level_features(s), "high": high_level_features(s, obs[label])}
            if n_cls is not None and len(s) > n_cls:
                keep = np.sort(np.random.default_rng(seed + 2).choice(len(s), n_cls, replace=False))
                feats = {k: v[keep] for k, v in feats.items()}
            jobs.append((label, feats, feats_ref))
        if n_cls is not None:
            metrics["n_classifier"] = float(n_cls)
        if len(ref) >= 20:
            jobs.append(("baseline", {k: v[half_a] for k, v in feats_ref.items()}, {k: v[half_b] for k, v in feats_ref.items()}))
        details["classifier"] = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cls_config.__dict__.items()}}
        for label, gen_f, ref_f in jobs:
            for level in ("low", "high"):
                if min(len(gen_f[level]), len(ref_f[level])) < 10:
                    logger.warning("classifier %s/%s: fewer than 10 showers per class; skipped", label, level)
                    continue
                t0 = time.perf_counter()
                res = classifier_two_sample_test(gen_f[level], ref_f[level], cls_config, seed=seed)
                metrics[f"auc_{level}_{label}"] = res.auc
                metrics[f"jsd_{level}_{label}"] = res.jsd
                details["classifier"][f"{level}_{label}"] = {
                    "auc": res.auc, "jsd": res.jsd, "accuracy": res.accuracy, "epochs": res.epochs,
                    "best_epoch": res.best_epoch, "n_train": res.n_train, "n_val": res.n_val, "n_test": res.n_test,
                }
                logger.info("classifier %-9s %s-level: AUC %.3f (%d epochs, %.1f s)", label, level, res.auc,
                            res.epochs, time.perf_counter() - t0)
        if "auc_low_baseline" in metrics:
            metrics["auc_baseline"] = metrics["auc_low_baseline"]

    # Likelihoods and timing of the models.
    edges = energy_bin_edges(ref.incident_energy, n_energy_bins)
    details["energy_bin_edges_mev"] = [float(e) for e in edges]
    per_bin: dict[str, list[float]] = {}
    if models:
        lik, per_bin = model_likelihoods(
            ref, models.get("teacher"), models.get("student"), edges, likelihood_max_showers,
            student_nll_max_showers, kl_samples, str(dev), seed,
        )
        metrics.update(lik)
        details["per_energy_bin"] = per_bin
        if timing_batch_sizes:
            details["timing_device"] = str(dev)
            for name, gen in models.items():
                for bs, ms in time_per_shower(gen, ref.incident_energy, tuple(timing_batch_sizes), str(dev),
                                              timing_max_seconds, seed).items():
                    metrics[f"time_ms_per_shower_{name}_b{bs}"] = ms

    # Figures.
    if plots:
        from ..report import plots as P

        pdir = out_dir / "plots"
        images = {REFERENCE_LABEL: ref.voxels, **{k: s.voxels for k, s in samples.items()}}
        P.plot_average_images(geo, images, pdir / "average_showers.png")
        if observable_plots:
            P.plot_observables({REFERENCE_LABEL: obs_ref, **obs}, pdir / "observables",
                               {k: v for k, v in seps.items() if k != "baseline"}, REFERENCE_LABEL)
        nll_curves = {k: v for k, v in per_bin.items() if k.startswith("nll")}
        if nll_curves:
            P.plot_nll_per_energy_bin(edges, nll_curves, pdir / "nll_per_energy_bin.png")
        if "kl_student_teacher" in per_bin:
            P.plot_nll_per_energy_bin(edges, {"KL(student||teacher)": per_bin["kl_student_teacher"]},
                                      pdir / "kl_per_energy_bin.png", ylabel="KL per shower [nats]")
        for name, history in details.get("history", {}).items():
            P.plot_training_curves(history, pdir / f"training_{name}.png", title=name)

    metrics["evaluate_seconds"] = time.perf_counter() - t_start
    metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    details["metrics"] = metrics
    _write_json(out_dir / "details.json", _jsonable(details))
    _write_text(out_dir / "report.md", _report(metrics, details, geo, list(samples)))
    _write_json(out_dir / "metrics.json", metrics)
    logger.info("evaluation written to %s (%.1f s)", out_dir, metrics["evaluate_seconds"])
    return metrics


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    return x


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _report(metrics: dict[str, float], details: dict[str, Any], geo: Geometry, labels: list[str]) -> str:
    m = metrics.get
    lines = [
        "# Shower evaluation",
        "",
        f"Geometry **{geo.name}** ({geo.n_voxels} voxels, {geo.n_layers} layers); "
        f"{int(m('n_reference', 0))} reference showers; generated: "
        + ", ".join(f"{k} ({int(m(f'n_{k}', 0))})" for k in labels)
        + ".",
        "",
        "## Classifier two-sample test (AUC; 0.5 = indistinguishable)",
        "",
    ]
    if "n_classifier" in metrics:
        lines += [f"Each generated sample enters with {int(m('n_classifier', 0))} showers (the smallest sample's "
                  "size), so the AUCs compare.", ""]
    lines += [
        "| sample | AUC low-level | AUC high-level | JSD low | JSD high |",
        "|---|---|---|---|---|",
    ]
    for label in [*labels, "baseline"]:
        if f"auc_low_{label}" in metrics or f"auc_high_{label}" in metrics:
            name = "reference half vs half (baseline)" if label == "baseline" else label
            lines.append(f"| {name} | {_fmt(m(f'auc_low_{label}'))} | {_fmt(m(f'auc_high_{label}'))} | "
                         f"{_fmt(m(f'jsd_low_{label}'))} | {_fmt(m(f'jsd_high_{label}'))} |")
    caption, published = published_results(geo.name)
    if published:
        lines += ["", f"Published, {caption}:", "", "| submission | AUC low | AUC high | ms/shower GPU @10k | ms/shower CPU @10k |",
                  "|---|---|---|---|---|"]
        for sub, vals in published.items():
            lines.append(f"| {sub} | {_fmt(vals.get('auc_low'))} | {_fmt(vals.get('auc_high'))} | "
                         f"{_fmt(vals.get('time_gpu_10000'), 3)} | {_fmt(vals.get('time_cpu_10000'), 2)} |")
    lines += ["", "## Largest separation powers (0 = identical, 1 = disjoint histograms)", ""]
    seps = details.get("separation_power", {})
    base = seps.get("baseline", {})
    for label in labels:
        top = sorted(seps.get(label, {}).items(), key=lambda kv: -kv[1])[:5]
        lines.append(f"- **{label}** (max {_fmt(m(f'sep_max_{label}'), 4)}, mean {_fmt(m(f'sep_mean_{label}'), 4)}): "
                     + ", ".join(f"`{k}` {v:.4f}" + (f" (baseline {base[k]:.4f})" if k in base else "") for k, v in top))
    if base:
        lines.append(f"- baseline (reference half vs half): max {_fmt(m('sep_max_baseline'), 4)}, "
                     f"mean {_fmt(m('sep_mean_baseline'), 4)}")
    if any(k.startswith(("nll_", "kl_")) for k in metrics):
        lines += ["", "## Likelihoods on the reference (nats per shower)", ""]
        for key, text in (("nll_teacher", "teacher NLL"), ("nll_teacher_subset", "teacher NLL (student's subset)"),
                          ("nll_student_subset", "student exact NLL (subset)"),
                          ("kl_student_teacher", "KL(student ‖ teacher), student samples")):
            if key in metrics:
                edges = details.get("energy_bin_edges_mev", [])
                per = details.get("per_energy_bin", {}).get(key, [])
                per_text = ", ".join(f"{edges[k]:.0f}–{edges[k + 1]:.0f} MeV: {_fmt(v, 2)}" for k, v in enumerate(per)
                                     if v is not None and k + 1 < len(edges))
                lines.append(f"- {text}: **{_fmt(metrics[key], 2)}**" + (f" (per energy bin: {per_text})" if per_text else ""))
    timing = {k: v for k, v in metrics.items() if k.startswith("time_ms_per_shower_")}
    if timing:
        lines += ["", f"## Sampling time per shower (ms, {details.get('timing_device', '?')})", "",
                  "| model | " + " | ".join(f"batch {b}" for b in DEFAULT_TIMING_BATCHES) + " |",
                  "|---|" + "---|" * len(DEFAULT_TIMING_BATCHES)]
        for name in ("teacher", "student"):
            if any(k.startswith(f"time_ms_per_shower_{name}_") for k in timing):
                lines.append(f"| {name} | " + " | ".join(_fmt(timing.get(f"time_ms_per_shower_{name}_b{b}"), 3)
                                                         for b in DEFAULT_TIMING_BATCHES) + " |")
    layout = [k.removeprefix("calochallenge_layout_ok_") for k in metrics if k.startswith("calochallenge_layout_ok_")]
    if layout:
        lines += ["", "CaloChallenge HDF5 layout (binning XML) checked and valid for: " + ", ".join(layout) + "."]
    lines += ["", "Plots: `plots/` (average showers; `observables/`: histograms of every observable, one figure per "
              "kind; NLL and KL per energy bin; training curves).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- CLI
