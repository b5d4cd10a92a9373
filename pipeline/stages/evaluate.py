"""The evaluation stage: compare generated showers with a reference, as the CaloChallenge 2022 did.

:func:`evaluate_showers` writes ``metrics.json`` (flat, what the pipeline logs to MLflow), ``details.json``
(the same plus structure), ``plots/`` and ``report.md``. The measures themselves live in
:mod:`pipeline.metrics` (observables, classifier test, likelihoods, timing), the figures and the report in
:mod:`pipeline.report`.

References:
    Fast Calorimeter Simulation Challenge 2022 (CaloChallenge/homepage), evaluation code and final
    results, arXiv:2410.21611. C. Krause, D. Shih, CaloFlow II, arXiv:2110.11377.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ...flows.device import resolve_device
from ..atomic import atomic_write_json, atomic_write_text
from ..data.dataset import open_dataset
from ..data.formats import read_showers
from ..data.geometry import Geometry, geometry_from_xml, get_geometry
from ..data.history import load_history, split_histories
from ..data.showers import Showers
from ..data.bundle import ModelBundle
from ..errors import CalodistillError
from ..metrics.classifier import (
    ClassifierConfig,
    classifier_two_sample_test,
    high_level_features,
    low_level_features,
)
from ..metrics.likelihoods import as_numpy, energy_bin_edges, model_likelihoods, seeded_subset
from ..metrics.observables import DEFAULT_THRESHOLD_MEV, compute_observables, separation_powers
from ..metrics.timing import DEFAULT_TIMING_BATCHES, time_per_shower
from ..report import plots as report_plots
from ..report.markdown import evaluation_report

__all__ = [
    "evaluate_showers",
    "load_reference",
    "generated_labels",
    "check_calochallenge_layout",
]

logger = logging.getLogger(__name__)

REFERENCE_LABEL = "reference"

Observables = dict[str, np.ndarray]


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
    showers = open_dataset(path).load("test") if path.is_dir() else read_showers(path, geometry)
    if len(showers) == 0:
        raise CalodistillError(f"{path}: no reference showers")
    return seeded_subset(showers, max_showers, seed)


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


def _read_generated(labels: dict[str, Path], geo: Geometry, max_showers: int | None, seed: int,
                    metrics: dict[str, float]) -> dict[str, Showers]:
    """The generated samples, checked against the reference's geometry (and the CaloChallenge layout)."""
    samples: dict[str, Showers] = {}
    for label, path in labels.items():
        if not path.is_file():
            raise CalodistillError(f"{path}: generated file does not exist")
        if path.suffix.lower() in (".h5", ".hdf5") and geo.name.startswith("calochallenge"):
            check_calochallenge_layout(path, geo)
            metrics[f"calochallenge_layout_ok_{label}"] = 1.0
        showers = read_showers(path, geo)
        if showers.geometry.n_voxels != geo.n_voxels or showers.geometry.name != geo.name:
            raise CalodistillError(f"{path}: geometry {showers.geometry.name} does not match the reference's {geo.name}")
        if len(showers) == 0:
            raise CalodistillError(f"{path}: no showers")
        if not np.all(np.isfinite(showers.voxels)):
            raise CalodistillError(f"{path}: showers hold NaN or infinite values")
        samples[label] = seeded_subset(showers, max_showers, seed + 1)
    return samples


# ----------------------------------------------------------------------------------------------- models
def _load_generator(model_dir: Path, kind: str, device: Any, geometry: Geometry | None = None) -> Any:
    """The shower generator (Flow I + the ``kind`` Flow II) of a model directory; refused when the model
    was trained on another geometry than ``geometry``."""
    bundle = ModelBundle.open(model_dir, kind=kind, label=f"{kind}_dir")
    if geometry is not None:
        bundle.check_geometry(geometry, "the reference")
    return bundle.generator(device)


def _sample_model(generator: Any, reference: Showers, n: int, device: Any, seed: int) -> Showers:
    part = seeded_subset(reference, n, seed + 17)
    vox = generator.sample(part.incident_energy, batch_size=min(10_000, len(part)), seed=seed, device=str(device))
    return Showers(reference.geometry, part.incident_energy, as_numpy(vox).astype(np.float32))


# ------------------------------------------------------------------------------------------- measures
def _separation_metrics(obs_ref: Observables, obs: dict[str, Observables], halves: tuple[np.ndarray, np.ndarray],
                        bins: int, metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """Separation powers of every sample, and of one half of the reference against the other (baseline)."""
    seps = {label: separation_powers(obs_ref, o, bins) for label, o in obs.items()}
    half_a, half_b = halves
    if len(half_a) + len(half_b) >= 4:
        seps["baseline"] = separation_powers({k: v[half_a] for k, v in obs_ref.items()},
                                             {k: v[half_b] for k, v in obs_ref.items()}, bins)
    for label, s in seps.items():
        values = np.array(list(s.values()))
        metrics[f"sep_max_{label}"] = float(values.max())
        metrics[f"sep_mean_{label}"] = float(values.mean())
        if label != "baseline":
            for name, v in s.items():
                metrics[f"sep_{name}_{label}"] = float(v)
    return seps


def _classifier_metrics(ref: Showers, samples: dict[str, Showers], obs_ref: Observables, obs: dict[str, Observables],
                        halves: tuple[np.ndarray, np.ndarray], config: ClassifierConfig, equal_sizes: bool,
                        seeds: list[int], metrics: dict[str, float], subset_seed: int) -> dict[str, Any]:
    """Classifier two-sample tests (low- and high-level) of every sample and of the reference baseline,
    once per classifier seed (the mean under the plain names; with several seeds also ``_std`` and
    ``_seed<s>``)."""
    half_a, half_b = halves
    feats_ref = {"low": low_level_features(ref), "high": high_level_features(ref, obs_ref)}
    jobs: list[tuple[str, Any, Any]] = []
    n_cls = min(len(s) for s in samples.values()) if equal_sizes else None
    for label, s in samples.items():
        feats = {"low": low_level_features(s), "high": high_level_features(s, obs[label])}
        if n_cls is not None and len(s) > n_cls:
            keep = np.sort(np.random.default_rng(subset_seed + 2).choice(len(s), n_cls, replace=False))
            feats = {k: v[keep] for k, v in feats.items()}
        jobs.append((label, feats, feats_ref))
    if n_cls is not None:
        metrics["n_classifier"] = float(n_cls)
    if len(ref) >= 20:
        jobs.append(("baseline", {k: v[half_a] for k, v in feats_ref.items()}, {k: v[half_b] for k, v in feats_ref.items()}))
    details: dict[str, Any] = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
                               "seeds": list(seeds)}
    aucs: dict[str, list[float]] = {}
    for label, gen_f, ref_f in jobs:
        for level in ("low", "high"):
            if min(len(gen_f[level]), len(ref_f[level])) < 10:
                logger.warning("classifier %s/%s: fewer than 10 showers per class; skipped", label, level)
                continue
            t0 = time.perf_counter()
            runs = [classifier_two_sample_test(gen_f[level], ref_f[level], config, seed=s) for s in seeds]
            key = f"{level}_{label}"
            aucs[key] = [r.auc for r in runs]
            _seed_stats(metrics, f"auc_{key}", aucs[key], seeds)
            _seed_stats(metrics, f"jsd_{key}", [r.jsd for r in runs], seeds, per_seed=False)
            first = runs[0]
            details[key] = {
                "auc": metrics[f"auc_{key}"], "auc_std": float(np.std(aucs[key])), "jsd": metrics[f"jsd_{key}"],
                "n_train": first.n_train, "n_val": first.n_val, "n_test": first.n_test,
                "runs": [{"seed": s, "auc": r.auc, "jsd": r.jsd, "accuracy": r.accuracy, "epochs": r.epochs,
                          "best_epoch": r.best_epoch} for s, r in zip(seeds, runs)],
            }
            logger.info("classifier %-9s %s-level: AUC %.3f ± %.3f over %d seed(s) (%.1f s)", label, level,
                        metrics[f"auc_{key}"], float(np.std(aucs[key])), len(seeds), time.perf_counter() - t0)
    for level in ("low", "high"):  # the student's excess over the teacher, per seed (same classifier seeds)
        if f"{level}_student" in aucs and f"{level}_teacher" in aucs:
            diffs = [s - t for s, t in zip(aucs[f"{level}_student"], aucs[f"{level}_teacher"])]
            _seed_stats(metrics, f"auc_{level}_student_minus_teacher", diffs, seeds, per_seed=False)
    if "auc_low_baseline" in metrics:
        metrics["auc_baseline"] = metrics["auc_low_baseline"]
    return details


def _seed_stats(metrics: dict[str, float], name: str, values: list[float], seeds: list[int],
                per_seed: bool = True) -> None:
    """``name`` = the mean over seeds; with several seeds also ``name_std`` (population standard deviation)
    and, with ``per_seed``, ``name_seed<s>``."""
    metrics[name] = float(np.mean(values))
    if len(values) > 1:
        metrics[f"{name}_std"] = float(np.std(values))
        if per_seed:
            for s, v in zip(seeds, values):
                metrics[f"{name}_seed{s}"] = float(v)


def _draw_plots(pdir: Path, ref: Showers, samples: dict[str, Showers], obs_ref: Observables,
                obs: dict[str, Observables], seps: dict[str, dict[str, float]], edges: np.ndarray,
                per_bin: dict[str, list[float]], histories: dict[str, Any], observable_plots: bool) -> None:
    images = {REFERENCE_LABEL: ref.voxels, **{k: s.voxels for k, s in samples.items()}}
    report_plots.plot_average_images(ref.geometry, images, pdir / "average_showers.png")
    if observable_plots:
        report_plots.plot_observables({REFERENCE_LABEL: obs_ref, **obs}, pdir / "observables",
                               {k: v for k, v in seps.items() if k != "baseline"}, REFERENCE_LABEL)
    nll_curves = {k: v for k, v in per_bin.items() if k.startswith("nll")}
    if nll_curves:
        report_plots.plot_nll_per_energy_bin(edges, nll_curves, pdir / "nll_per_energy_bin.png")
    if "kl_student_teacher" in per_bin:
        report_plots.plot_nll_per_energy_bin(edges, {"KL(student||teacher)": per_bin["kl_student_teacher"]},
                                      pdir / "kl_per_energy_bin.png", ylabel="KL per shower [nats]")
    for name, history in histories.items():
        report_plots.plot_training_curves(history, pdir / f"training_{name}.png", title=name)


# ------------------------------------------------------------------------------------------------ stage
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
    student_nll_max_showers: int = 1000,
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
    classifier_seeds: list[int] | tuple[int, ...] | None = None,
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
        student_nll_max_showers: both models' exact NLL on the same this many showers (the student's solved
            voxel by voxel: about 2 000 showers/s at quickstart size on 2 CPU cores).
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
            more showers finds more differences, so AUCs of samples of different sizes do not compare.
        classifier_seeds: run every classifier test once per seed (each seeds the classifier's subsample,
            split, initialisation and shuffling); None runs it once with ``seed``. Several seeds give the
            spread of the AUCs.

    Returns:
        The flat metrics also written to ``metrics.json`` (``<label>`` is a generated sample's label):

        - ``auc_low_<label>``, ``auc_high_<label>``, ``jsd_...``: classifier AUC, generated vs reference, on
          low-level (``[log10 E_inc, voxels / E_inc]``) and high-level input (the observables);
          ``auc_low_baseline``, ``auc_high_baseline`` (``auc_baseline`` = the low-level one): one half of
          the reference against the other, what "indistinguishable" looks like at this sample size;
          with several ``classifier_seeds`` these are means over the seeds, with ``auc_..._std`` (population
          standard deviation), ``auc_..._seed<s>``, ``jsd_..._std``, and with a teacher and a student
          ``auc_low_student_minus_teacher`` (mean per-seed difference) and its ``_std``;
        - ``sep_max_<label>``, ``sep_mean_<label>``, ``sep_<observable>_<label>``, ``sep_max_baseline``:
          separation powers (:mod:`pipeline.metrics.observables`);
        - with ``teacher_dir``/``student_dir``: the likelihoods of
          :func:`pipeline.metrics.likelihoods.model_likelihoods` (with both: ``test_nll_teacher``,
          ``test_nll_student``, ``test_nll_rel_diff`` on the same ``student_nll_max_showers`` showers) and
          ``time_ms_per_shower_<model>_b<batch>``;
        - ``calochallenge_layout_ok_<label>``: 1 when a generated CaloChallenge HDF5 file passed
          :func:`check_calochallenge_layout`;
        - ``evaluate_seconds`` and, of the parts that ran, ``classifier_seconds``, ``likelihood_seconds``,
          ``timing_seconds``, ``plots_seconds``.
    """
    out_dir = Path(out_dir)
    cls_config = classifier if isinstance(classifier, ClassifierConfig) else ClassifierConfig.from_dict(classifier)
    if device is not None and cls_config.device is None:
        cls_config = ClassifierConfig(**{**cls_config.__dict__, "device": device})
    seeds = [seed] if classifier_seeds is None else [int(s) for s in classifier_seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise CalodistillError(f"classifier_seeds: distinct seeds expected, got {list(classifier_seeds or [])}")
    t_start = time.perf_counter()

    ref = reference if isinstance(reference, Showers) else load_reference(reference, geometry, max_showers, seed)
    geo = ref.geometry
    labels = generated_labels(generated) if generated else {}
    metrics: dict[str, float] = {"n_reference": float(len(ref))}
    details: dict[str, Any] = {
        "geometry": geo.name,
        "reference": "<in memory>" if isinstance(reference, Showers) else str(reference),
        "generated": {k: str(v) for k, v in labels.items()},
    }
    samples = _read_generated(labels, geo, max_showers, seed, metrics)

    dev = resolve_device(device)
    models: dict[str, Any] = {}
    for name, mdir in (("teacher", teacher_dir), ("student", student_dir)):
        if mdir is not None:
            models[name] = _load_generator(Path(mdir), name, dev, geo)
            for part, history in split_histories(name, load_history(Path(mdir))).items():
                details.setdefault("history", {})[part] = history
            if sample_missing and name not in samples:
                t0 = time.perf_counter()
                samples[name] = _sample_model(models[name], ref, min(len(ref), model_samples), dev, seed)
                logger.info("sampled %d %s showers in %.1f s", len(samples[name]), name, time.perf_counter() - t0)
    if not samples:
        raise CalodistillError("generated: nothing to evaluate (no generated files and no models to sample)")
    for label, s in samples.items():
        metrics[f"n_{label}"] = float(len(s))

    obs_ref = compute_observables(ref, threshold)
    obs = {label: compute_observables(s, threshold) for label, s in samples.items()}
    order = np.random.default_rng(seed).permutation(len(ref))
    halves = (np.sort(order[: len(ref) // 2]), np.sort(order[len(ref) // 2 :]))
    seps = _separation_metrics(obs_ref, obs, halves, bins, metrics)
    details["separation_power"] = seps
    if run_classifier:
        t0 = time.perf_counter()
        details["classifier"] = _classifier_metrics(ref, samples, obs_ref, obs, halves, cls_config,
                                                    classifier_equal_sizes, seeds, metrics, seed)
        metrics["classifier_seconds"] = time.perf_counter() - t0

    edges = energy_bin_edges(ref.incident_energy, n_energy_bins)
    details["energy_bin_edges_mev"] = [float(e) for e in edges]
    per_bin: dict[str, list[float]] = {}
    if models:
        t0 = time.perf_counter()
        lik, per_bin = model_likelihoods(
            ref, models.get("teacher"), models.get("student"), edges, likelihood_max_showers,
            student_nll_max_showers, kl_samples, str(dev), seed,
        )
        metrics.update(lik)
        metrics["likelihood_seconds"] = time.perf_counter() - t0
        details["per_energy_bin"] = per_bin
        if timing_batch_sizes:
            t0 = time.perf_counter()
            details["timing_device"] = str(dev)
            for name, gen in models.items():
                for bs, ms in time_per_shower(gen, ref.incident_energy, tuple(timing_batch_sizes), str(dev),
                                              timing_max_seconds, seed).items():
                    metrics[f"time_ms_per_shower_{name}_b{bs}"] = ms
            metrics["timing_seconds"] = time.perf_counter() - t0

    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a failed evaluation leaves no empty directory
    if plots:
        t0 = time.perf_counter()
        _draw_plots(out_dir / "plots", ref, samples, obs_ref, obs, seps, edges, per_bin,
                    details.get("history", {}), observable_plots)
        metrics["plots_seconds"] = time.perf_counter() - t0

    metrics["evaluate_seconds"] = time.perf_counter() - t_start
    metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    details["metrics"] = metrics
    atomic_write_json(out_dir / "details.json", _jsonable(details), sort_keys=False, allow_nan=False)
    atomic_write_text(out_dir / "report.md", evaluation_report(metrics, details, geo, list(samples)))
    atomic_write_json(out_dir / "metrics.json", metrics, sort_keys=False, allow_nan=False)
    logger.info("evaluation written to %s (%.1f s)", out_dir, metrics["evaluate_seconds"])
    return metrics


def _jsonable(x: Any) -> Any:
    """Plain JSON values: string keys, lists for tuples, None for non-finite floats, numpy scalars unwrapped."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    return x
