"""Stage ``distill``: distil the IAF student from a trained MAF teacher (CaloFlow II).

:func:`distill_student` takes paths and a :class:`DistillStageConfig` (or a mapping of overrides for
one) and returns metrics. STUDENT_DIR is a self-contained generator directory (``preprocessing.json``,
``flow1.pt`` copied from the teacher's directory, ``student.pt``) plus ``provenance.json`` (teacher and
dataset digests, settings: :mod:`.provenance`), ``distill_config.json``, ``metrics.json``,
``history.json`` and ``checkpoints/student/`` (resumable with the same teacher, dataset and settings).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...flows.config import STUDENT_FIELDS, DistillConfig, FlowConfig, TrainConfig
from ...flows.errors import FlowsError
from ..atomic import atomic_write_json
from ..config import as_config, config_to_dict
from ..data.bundle import ModelBundle
from ..errors import CalodistillError
from .provenance import check_model_dir, compared_config, start_model_dir
from .train_teacher import (
    MetricsCallback,
    _prepare,
    compare_summaries,
    load_splits,
    shower_summary,
    training_data_record,
)

__all__ = [
    "DistillStageConfig",
    "distill_student",
    "flow2_observables",
    "compare_flow2_observables",
]

logger = logging.getLogger(__name__)


def _student_changes(student: Mapping[str, Any]) -> dict[str, Any]:
    """The student's FlowConfig fields that differ from the teacher's (0 or "": the teacher's)."""
    return {k: v for k, v in student.items() if k == "dropout" or v not in (0, "", None)}


@dataclass
class DistillStageConfig:
    """Everything ``distill`` can be told.

    Attributes:
        seed: seeds the preprocessing noise, the student's initialisation and the checks.
        progress: progress bars.
        max_train: use at most this many training showers (0: all).
        max_val: validate each epoch (loss terms and the KL estimate's conditions) on at most this many
            validation showers (0: all); a fixed subset, the first ones, so that epochs compare.
        student: the :class:`flows.config.FlowConfig` fields in which the student differs from the
            teacher, among ``hidden_features``, ``n_hidden_layers``, ``dropout`` and ``activation``
            (0 or "": the teacher's; ``dropout`` is 0 unless set). Blocks, bins and permutations are
            the teacher's. A student at least as wide as the teacher, with as many hidden layers,
            starts from the teacher's weights (:func:`flows.distillation.init_student_from_teacher`).
        train: optimisation (cosine schedule by default).
        distill: β, fully guided, KL estimate.
        nll_subset: test showers on which the student's and the teacher's exact NLL are computed (the
            student's solved voxel by voxel, :mod:`flows.student_density`); 0: the whole test split.
        nll_batch_size: batch size of that computation.
        eval_batch_size: batch size of one-pass evaluations.
        check_samples: showers sampled by the student (one pass) to compare with the teacher.
        teacher_check_samples: showers sampled by the teacher (D passes per block: keep it small) at the
            first of the same energies; 0 skips the comparison.
    """

    seed: int = 0
    progress: bool = True
    max_train: int = 0
    max_val: int = 0
    student: dict[str, Any] = field(default_factory=lambda: {"dropout": 0.0},
                                    metadata={"keys_of": FlowConfig, "keys": STUDENT_FIELDS})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(schedule="cosine"))
    distill: DistillConfig = field(default_factory=DistillConfig)
    nll_subset: int = 500
    nll_batch_size: int = 250
    eval_batch_size: int = 2048
    check_samples: int = 1000
    teacher_check_samples: int = 100

    def __post_init__(self) -> None:
        for key in self.student:
            if key not in STUDENT_FIELDS:
                raise CalodistillError(f"student.{key}: unknown key (known: {', '.join(STUDENT_FIELDS)})")
        try:  # the values, on a stand-in teacher
            FlowConfig(features=1).replace(**_student_changes(self.student))
        except FlowsError as exc:
            raise CalodistillError(f"student.{exc}") from None


def flow2_observables(geometry: Any, voxels: np.ndarray) -> dict[str, float]:
    """Voxel-level observables that Flow II alone decides (given the layer energies), per layer k.

    ``sparsity_k`` (fraction of non-zero voxels), ``centroid_x_k`` / ``centroid_y_k`` (mean of the
    energy-weighted x / y centroid, mm, over showers with energy in the layer) and ``width_r_k`` (mean
    energy-weighted rms distance from that centroid, mm).
    """
    vox = np.asarray(voxels, dtype=np.float64)
    out: dict[str, float] = {}
    for k, (layer, sl) in enumerate(zip(geometry.layers, geometry.layer_slices)):
        v = vox[:, sl]
        cx, cy = layer.cell_xy()
        e = v.sum(axis=1)
        ok = e > 0
        out[f"sparsity_{k}"] = float((v > 0).mean())
        if not ok.any():
            out[f"centroid_x_{k}"] = out[f"centroid_y_{k}"] = out[f"width_r_{k}"] = float("nan")
            continue
        w = v[ok] / e[ok, None]
        mx, my = w @ cx, w @ cy
        r2 = w @ (cx**2 + cy**2) - mx**2 - my**2
        out[f"centroid_x_{k}"] = float(mx.mean())
        out[f"centroid_y_{k}"] = float(my.mean())
        out[f"width_r_{k}"] = float(np.sqrt(np.clip(r2, 0.0, None)).mean())
    return out


def compare_flow2_observables(geometry: Any, teacher_voxels: np.ndarray, student_voxels: np.ndarray) -> dict[str, float]:
    """Teacher vs student :func:`flow2_observables` on paired showers (same Flow I layer energies).

    Returns each observable for both (``_teacher`` / ``_student``), relative differences of the
    sparsities and widths (``_rel_diff``), absolute differences of the centroids (``_abs_diff_mm``),
    ``voxel_mean_rel_l1`` (Σ|mean student voxel − mean teacher voxel| / Σ mean teacher voxel),
    ``voxel_mean_rel_l1_k`` per layer and ``flow2_max_rel_diff`` (the worst sparsity/width relative
    difference).
    """
    t_obs, s_obs = flow2_observables(geometry, teacher_voxels), flow2_observables(geometry, student_voxels)
    out: dict[str, float] = {}
    worst = 0.0
    for key, t in t_obs.items():
        v = s_obs[key]
        out[f"{key}_teacher"], out[f"{key}_student"] = t, v
        if key.startswith("centroid"):
            out[f"{key}_abs_diff_mm"] = abs(v - t)
        else:
            rel = abs(v - t) / abs(t) if t else float("inf")
            out[f"{key}_rel_diff"] = rel
            worst = max(worst, rel)
    out["flow2_max_rel_diff"] = worst
    t_mean = np.asarray(teacher_voxels, dtype=np.float64).mean(axis=0)
    s_mean = np.asarray(student_voxels, dtype=np.float64).mean(axis=0)
    out["voxel_mean_rel_l1"] = float(np.abs(s_mean - t_mean).sum() / max(t_mean.sum(), 1e-12))
    for k, sl in enumerate(geometry.layer_slices):
        out[f"voxel_mean_rel_l1_{k}"] = float(np.abs(s_mean[sl] - t_mean[sl]).sum() / max(t_mean[sl].sum(), 1e-12))
    return out


def _open_teacher_dir(teacher_dir: Path) -> ModelBundle:
    """The teacher's model directory, opened and checked (its flows are loaded on first use)."""
    from ...flows.serialization import FLOW1_FILE, PREPROCESSING_FILE, TEACHER_FILE

    if not teacher_dir.is_dir():
        raise CalodistillError(f"{teacher_dir}: no such model directory")
    for name in (PREPROCESSING_FILE, FLOW1_FILE, TEACHER_FILE):
        if not (teacher_dir / name).is_file():
            raise CalodistillError(f"{teacher_dir}: missing {name} (not a model directory from `calodistill train-teacher`)")
    return ModelBundle.open(teacher_dir, kind="teacher", label="--teacher")


def distill_student(
    teacher_dir: Path,
    data_dir: Path,
    out_dir: Path,
    config: Mapping[str, Any] | DistillStageConfig | None = None,
    log_metrics: MetricsCallback | None = None,
    device: str | None = None,
    overwrite: bool = False,
) -> dict[str, float]:
    """Distil an IAF student from the teacher in ``teacher_dir`` on the dataset ``data_dir``.

    The teacher's preprocessing and Flow I are reused unchanged (and copied into ``out_dir``); the
    student (same blocks and permutations as the teacher) is trained with the CaloFlow II loss, the
    epoch with the lowest KL(student ‖ teacher) estimate is kept.

    Args:
        teacher_dir: a model directory written by :func:`pipeline.train.train_teacher`.
        data_dir: the dataset the teacher was trained on (train/val/test splits).
        out_dir: the student directory to write (an interrupted run there is resumed when it was made from
            the same teacher, dataset and settings, else refused: :func:`.provenance.check_model_dir`).
        config: a :class:`DistillStageConfig` or a (nested or dotted-key) dict.
        log_metrics: ``log_metrics(metrics, step)`` each epoch (``distill_*`` keys) and at the end.
        device: "cpu", "cuda" or None (CUDA when present).
        overwrite: start over in an existing student directory instead of resuming.

    Returns:
        Metrics: ``test_nll`` (student, exact, on the first ``nll_subset`` test showers) and
        ``teacher_test_nll`` (teacher, the same showers; also as ``teacher_test_nll_subset``),
        ``test_nll_rel_diff`` = (student − teacher) / |teacher| on them, ``teacher_test_nll_all`` (teacher,
        whole test split), ``student_nll_time_s``,
        ``student_sample_nll`` (−log q of its own samples), ``teacher_nll_of_student_samples``,
        ``kl_student_teacher``, ``paired_rms`` / ``paired_max`` (student given the teacher's z vs data),
        ``warm_started`` (1 when the student started from the teacher's weights, also when it is wider
        than the teacher: see :func:`flows.distillation.init_student_from_teacher`),
        ``layer_frac_*`` / ``response_*`` of student vs teacher samples (``_teacher``, ``_student``,
        ``_rel_diff``) and of student samples vs the test data (``data_`` prefix), the Flow II
        observables of :func:`compare_flow2_observables` (``sparsity_k_*``, ``centroid_x_k_*``,
        ``width_r_k_*``, ``voxel_mean_rel_l1``, ``flow2_max_rel_diff``), epochs, timings.
        The student's and the teacher's NLL subset are the same showers with the same dequantisation
        noise; the student and teacher samples compared share the seed and batch size, hence the Flow I
        layer energies (``flow1_layers_max_abs_diff`` = 0) and the Flow II noise, so those differences
        are Flow II's alone.
    """
    import torch

    from ...flows.device import resolve_device
    from ...flows.distillation import (
        distill,
        init_student_from_teacher,
        paired_max_error,
        sample_nll,
        student_nll,
    )
    from ...flows.models import build_iaf_like, count_parameters
    from ...flows.sampling import ShowerGenerator
    from ...flows.serialization import save_generator_dir
    from ...flows.training import evaluate_nll

    from ..data.dataset import dataset_hash, open_dataset

    cfg = as_config(DistillStageConfig, config)
    t0 = time.perf_counter()
    teacher_dir, data_dir, out_dir = Path(teacher_dir), Path(data_dir), Path(out_dir)
    dev = resolve_device(device)
    # every check before anything is written: the teacher, the dataset, then what --out holds
    bundle = _open_teacher_dir(teacher_dir)
    pre, flow1, teacher = bundle.preprocessing, bundle.flow1, bundle.flow2
    open_dataset(data_dir)
    settings = config_to_dict(cfg)
    record: dict[str, Any] = {"stage": "distill", "teacher_dir": str(teacher_dir.resolve()),
                              "teacher_digest": bundle.weights_digest, "dataset_dir": str(data_dir.resolve()),
                              "dataset_digest": dataset_hash(data_dir), "config": compared_config(settings)}
    if out_dir.resolve() == teacher_dir.resolve():
        raise CalodistillError(f"--out {out_dir}: is the --teacher directory; the student needs its own directory")
    plan = check_model_dir(out_dir, record, overwrite=overwrite)
    ds, train, val, test = load_splits(data_dir, cfg.max_train)
    geometry = ds.geometry
    bundle.check_geometry(geometry, f"dataset {data_dir}")
    if list(geometry.layer_sizes) != list(pre.layer_sizes):
        raise CalodistillError(
            f"{data_dir}: geometry {geometry.name} (layers {list(geometry.layer_sizes)}) does not match the teacher's "
            f"preprocessing (layers {list(pre.layer_sizes)})"
        )
    record.update(training_data_record(geometry.name, train), geometry=geometry.to_dict())  # the model carries it
    if bundle.energy_range is not None:  # Flow I is the teacher's: its training range is the model's
        record["incident_energy_range"] = list(bundle.energy_range)
    start_model_dir(plan, record, "distill_config.json", {**settings, "teacher_dir": str(teacher_dir)})
    tr, va, te = (_prepare(pre, s, cfg.seed + i) for i, s in enumerate((train, val, test)))
    n_voxels = geometry.n_voxels

    torch.manual_seed(cfg.seed)
    try:
        student = build_iaf_like(teacher, **_student_changes(cfg.student))
    except FlowsError as exc:
        raise CalodistillError(f"config: student.{exc}") from None
    # the warm start (distill() repeats it; a resumed run then loads its checkpoint over it)
    warm_started = bool(cfg.distill.init_from_teacher) and init_student_from_teacher(teacher, student)
    logger.info("distill: teacher %d parameters, student %d (%s); %d/%d/%d showers, device %s",
                count_parameters(teacher), count_parameters(student),
                "warm-started from the teacher" if warm_started else "random initialisation",
                len(train), len(val), len(test), dev)

    def on_epoch(metrics: dict[str, float], epoch: int) -> None:
        if log_metrics is not None:
            log_metrics({f"distill_{k}": float(v) for k, v in metrics.items()}, epoch)

    n_val = min(cfg.max_val, len(val)) if cfg.max_val > 0 else len(val)
    res = distill(
        teacher, student, tr["x2"], tr["c2"], va["x2"][:n_val], va["c2"][:n_val], cfg.train, cfg.distill,
        out_dir / "checkpoints" / "student", device=dev, on_epoch_end=on_epoch, progress=cfg.progress,
    )
    save_generator_dir(out_dir, pre, flow1, flow1.config, student.cpu(), student.config, kind="student")
    atomic_write_json(out_dir / "history.json", {"student": res.history})
    student.to(dev)
    teacher.to(dev)

    from ...flows.losses import kl_student_teacher

    metrics: dict[str, float] = {}
    n_sub = min(cfg.nll_subset, len(test)) if cfg.nll_subset > 0 else len(test)
    t_nll = time.perf_counter()
    s_nll = student_nll(student, te["x2"], te["c2"], n_sub, cfg.nll_batch_size, dev, progress=cfg.progress)
    metrics["student_nll_time_s"] = time.perf_counter() - t_nll
    teacher_nll_all = evaluate_nll(teacher, te["x2"], te["c2"], cfg.eval_batch_size, dev)
    teacher_nll_sub = evaluate_nll(teacher, te["x2"][:n_sub], te["c2"][:n_sub], cfg.eval_batch_size, dev)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 20)
        kl = kl_student_teacher(student, teacher, te["c2"].to(dev), batch_size=cfg.eval_batch_size)
        own_nll = sample_nll(student, te["c2"], cfg.eval_batch_size, dev)
    max_err, rms = paired_max_error(teacher, student, te["x2"][:n_sub].to(dev), te["c2"][:n_sub].to(dev))
    metrics.update(
        test_nll=s_nll,
        test_nll_per_dim=s_nll / n_voxels,
        teacher_test_nll=teacher_nll_sub,
        teacher_test_nll_per_dim=teacher_nll_sub / n_voxels,
        teacher_test_nll_subset=teacher_nll_sub,
        teacher_test_nll_all=teacher_nll_all,
        test_nll_rel_diff=(s_nll - teacher_nll_sub) / abs(teacher_nll_sub) if teacher_nll_sub else float("nan"),
        nll_subset=float(n_sub),
        student_sample_nll=own_nll,
        kl_student_teacher=kl,
        paired_rms=rms,
        paired_max=max_err,
        epochs=float(res.epochs_run),
        best_epoch=float(res.best_epoch),
        best_val_kl=float(res.best_metric),
        student_parameters=float(count_parameters(student)),
        warm_started=float(warm_started),
        teacher_parameters=float(count_parameters(teacher)),
    )
    logger.info("test NLL (%d showers): student %.3f, teacher %.3f (rel. diff %.3g); KL %.4g nats",
                n_sub, s_nll, teacher_nll_sub, metrics["test_nll_rel_diff"], kl)

    # samples: student (one pass) vs the data, and student vs teacher (D passes) at the same test energies
    # with the same seed and batch size, so both draw the same Flow I layer energies and the same Flow II
    # noise: the student–teacher comparison measures Flow II alone (paired showers)
    rng = np.random.default_rng(cfg.seed + 30)
    data_summary = shower_summary(test.incident_energy, test.layer_energies)
    if cfg.check_samples > 0:
        n = min(cfg.check_samples, len(test))
        idx = rng.choice(len(test), size=n, replace=False)
        energies = test.incident_energy[idx]
        s_gen = ShowerGenerator(pre, flow1, student, device=dev)
        t_s = time.perf_counter()
        s_vox = s_gen.sample(energies, batch_size=cfg.eval_batch_size, seed=cfg.seed)
        metrics["student_sample_ms_per_shower"] = 1e3 * (time.perf_counter() - t_s) / n
        s_sum = shower_summary(energies, geometry.layer_energies(s_vox.astype(np.float64)))
        metrics.update(compare_summaries(data_summary, s_sum, "data", "student", prefix="data_"))
        if cfg.teacher_check_samples > 0:
            m = min(cfg.teacher_check_samples, n)
            t_gen = ShowerGenerator(pre, flow1, teacher, device=dev)
            t_s = time.perf_counter()
            t_vox, t_layers = t_gen.sample_with_layers(energies[:m], batch_size=cfg.eval_batch_size, seed=cfg.seed + 1,
                                                       progress=cfg.progress)
            metrics["teacher_sample_ms_per_shower"] = 1e3 * (time.perf_counter() - t_s) / m
            p_vox, p_layers = s_gen.sample_with_layers(energies[:m], batch_size=cfg.eval_batch_size, seed=cfg.seed + 1)
            metrics["flow1_layers_max_abs_diff"] = float(np.abs(p_layers.astype(np.float64) - t_layers).max())
            t_sum = shower_summary(energies[:m], geometry.layer_energies(t_vox.astype(np.float64)))
            p_sum = shower_summary(energies[:m], geometry.layer_energies(p_vox.astype(np.float64)))
            metrics.update(compare_summaries(t_sum, p_sum, "teacher", "student"))
            metrics.update(compare_flow2_observables(geometry, t_vox, p_vox))
    metrics["distill_time_s"] = time.perf_counter() - t0
    atomic_write_json(out_dir / "metrics.json", metrics)
    if log_metrics is not None:
        log_metrics(dict(metrics), int(res.epochs_run))
    return metrics


