"""Stage ``train-teacher``: fit the preprocessing, train Flow I and the MAF teacher (Flow II) by maximum likelihood.

:func:`train_teacher` takes paths and a :class:`TeacherTrainConfig` (or a mapping of overrides for
one) and returns metrics. The model directory it writes is a generator directory
(:func:`flows.serialization.save_generator_dir`: ``preprocessing.json``, ``flow1.pt``, ``teacher.pt``)
plus ``provenance.json`` (what it was made from: :mod:`.provenance`), ``train_config.json``,
``metrics.json``, ``history.json`` and ``checkpoints/{flow1,teacher}/`` (resumable: running it again
with the same dataset and settings continues an interrupted run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...flows.config import FlowConfig, PreprocessingConfig, TrainConfig
from ...flows.errors import FlowsError
from ..atomic import atomic_write_json
from ..config import as_config, config_to_dict
from ..errors import CalodistillError
from .provenance import check_model_dir, compared_config, start_model_dir

__all__ = [
    "FlowStageConfig",
    "TeacherTrainConfig",
    "train_teacher",
    "shower_summary",
    "compare_summaries",
    "training_data_record",
]

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]


# ---------------------------------------------------------------------------------------------------
# configuration


@dataclass
class FlowStageConfig:
    """One flow of the teacher stage: its architecture and its training.

    ``model.features`` and ``model.context_features`` are the data's (filled in by
    :meth:`flows.config.FlowConfig.resolve`); ``model.hidden_features`` 0 means D.
    """

    model: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _flow1_defaults() -> FlowStageConfig:
    """CaloFlow's Flow I: 6 spline blocks, 2 hidden layers of 64."""
    return FlowStageConfig(model=FlowConfig(n_blocks=6, hidden_features=64, n_hidden_layers=2))


def _teacher_defaults() -> FlowStageConfig:
    """CaloFlow's Flow II teacher: 8 spline blocks, one hidden layer of D."""
    return FlowStageConfig(model=FlowConfig(n_blocks=8, hidden_features=0, n_hidden_layers=1))


@dataclass
class TeacherTrainConfig:
    """Everything ``train-teacher`` can be told.

    Attributes:
        seed: seeds the preprocessing noise, the models' initialisation and the checks.
        progress: show progress bars.
        max_train: use at most this many training showers (0: all).
        preprocessing: the preprocessing settings.
        flow1: Flow I (layer energies | E_inc); CaloFlow: 6 spline blocks, 2 × 64 hidden.
        teacher: Flow II (voxels | E_inc, layer energies); CaloFlow: 8 spline blocks, hidden = D.
        eval_batch_size: batch size of test log-likelihoods.
        check_samples: showers sampled from Flow I + teacher (D passes per block: keep it small) to compare
            layer-energy fractions and the energy response with the test data; 0 skips the check.
        flow1_check_samples: showers sampled from Flow I alone for the same comparison (cheap; 0: all
            test energies).
        check_batch_size: batch size of those samplings.
    """

    seed: int = 0
    progress: bool = True
    max_train: int = 0
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    flow1: FlowStageConfig = field(default_factory=_flow1_defaults)
    teacher: FlowStageConfig = field(default_factory=_teacher_defaults)
    eval_batch_size: int = 2048
    check_samples: int = 100
    flow1_check_samples: int = 0
    check_batch_size: int = 100


# ---------------------------------------------------------------------------------------------------
# shower summaries (the "what it must show" checks)


def shower_summary(incident_energy: np.ndarray, layer_energies: np.ndarray) -> dict[str, float]:
    """Mean layer-energy fractions ``E_k / ΣE`` and mean total-energy response ``ΣE / E_inc``."""
    e_inc = np.asarray(incident_energy, dtype=np.float64).reshape(-1)
    layers = np.asarray(layer_energies, dtype=np.float64)
    total = layers.sum(axis=1)
    ok = total > 0
    out: dict[str, float] = {}
    fractions = layers[ok] / total[ok, None]
    for k in range(layers.shape[1]):
        out[f"layer_frac_{k}"] = float(fractions[:, k].mean()) if ok.any() else float("nan")
    out["response"] = float((total / e_inc).mean())
    return out


def compare_summaries(reference: dict[str, float], other: dict[str, float], ref_name: str, other_name: str, prefix: str = "") -> dict[str, float]:
    """Both summaries as metrics plus relative differences (``..._rel_diff``; the max over layers too)."""
    out: dict[str, float] = {}
    worst = 0.0
    for key, ref in reference.items():
        val = other[key]
        rel = abs(val - ref) / abs(ref) if ref != 0 else float("inf")
        out[f"{prefix}{key}_{ref_name}"] = ref
        out[f"{prefix}{key}_{other_name}"] = val
        out[f"{prefix}{key}_rel_diff"] = rel
        if key.startswith("layer_frac_"):
            worst = max(worst, rel)
    out[f"{prefix}layer_frac_max_rel_diff"] = worst
    return out


# ---------------------------------------------------------------------------------------------------
# the stage


def _resolve_flow(name: str, model: FlowConfig, features: int, context: int) -> FlowConfig:
    """The flow ``name``'s configuration for the data's sizes."""
    try:
        return model.resolve(features, context)
    except FlowsError as exc:
        raise CalodistillError(f"config: {name}.model.{exc}") from None


def _prepare(pre: Any, showers: Any, seed: int) -> Any:
    """Preprocessed tensors (float32) of a split, with the split's own seeded noise."""
    import torch

    t = pre.transform(showers.incident_energy, showers.voxels.astype(np.float64), rng=np.random.default_rng(seed))
    return {
        "x1": torch.as_tensor(t.flow1_x, dtype=torch.float32),
        "c1": torch.as_tensor(t.flow1_context, dtype=torch.float32),
        "x2": torch.as_tensor(t.flow2_x, dtype=torch.float32),
        "c2": torch.as_tensor(t.flow2_context, dtype=torch.float32),
    }


def load_splits(data_dir: Path, max_train: int = 0) -> tuple[Any, Any, Any, Any]:
    """``(dataset, train, val, test)`` showers of an ingested dataset; empty splits are refused."""
    from ..data.dataset import open_dataset

    ds = open_dataset(data_dir)
    train = ds.load("train", max_rows=max_train or None)
    val = ds.load("val")
    test = ds.load("test")
    for name, split in (("train", train), ("val", val), ("test", test)):
        if len(split) == 0:
            raise CalodistillError(f"{data_dir}: the {name} split is empty")
    return ds, train, val, test


def training_data_record(geometry: str, train: Any) -> dict[str, Any]:
    """Provenance entries of the training split: geometry, particle (when one), incident-energy range (MeV)."""
    energies = np.asarray(train.incident_energy, dtype=np.float64)
    record: dict[str, Any] = {"geometry": geometry, "n_train": len(train),
                              "incident_energy_range": [float(energies.min()), float(energies.max())]}
    particles = {str(p) for p in np.unique(np.asarray(train.particle, dtype=object))}
    if len(particles) == 1 and particles != {"unknown"}:
        record["particle"] = particles.pop()
    return record


def train_teacher(
    data_dir: Path,
    out_dir: Path,
    config: Mapping[str, Any] | TeacherTrainConfig | None = None,
    log_metrics: MetricsCallback | None = None,
    device: str | None = None,
    overwrite: bool = False,
) -> dict[str, float]:
    """Train Flow I and the MAF teacher on an ingested dataset; write a generator directory.

    Steps: load the train/val/test splits; fit the preprocessing on the training showers; train Flow I
    (layer energies | E_inc) and the teacher (voxels | E_inc, layer energies) by maximum likelihood with
    resumable checkpoints under ``out_dir/checkpoints``; score the test split; fit a diagonal Gaussian
    to the same preprocessed training inputs as a baseline; sample showers from Flow I (+ teacher) at
    test energies and compare mean layer-energy fractions and energy response with the test data.

    Args:
        data_dir: a dataset written by ``calodistill ingest``.
        out_dir: the model directory to write (created; an interrupted run there is resumed when it was made
            from the same dataset and settings, else refused: :func:`.provenance.check_model_dir`).
        config: a :class:`TeacherTrainConfig` or a (nested or dotted-key) dict overriding its defaults.
        log_metrics: ``log_metrics(metrics, step)`` after each epoch (``flow1_*`` / ``teacher_*`` keys,
            step = epoch of that flow) and once at the end with the final metrics.
        device: "cpu", "cuda" or None (CUDA when present).
        overwrite: start over in an existing model directory instead of resuming.

    Returns:
        Metrics: ``test_nll`` / ``test_nll_per_dim`` (teacher, nats per shower / per voxel),
        ``baseline_nll`` / ``baseline_nll_per_dim``, ``flow1_test_nll`` / ``flow1_test_nll_per_dim``,
        ``flow1_baseline_nll``, ``flow1_epochs``, ``teacher_epochs``, best epochs, split sizes, the
        sample checks (``layer_frac_k_data`` / ``_gen`` / ``_rel_diff``, ``response_*``,
        ``layer_frac_max_rel_diff``, same with ``flow1_`` prefix) and ``train_time_s``.
    """
    import torch

    from ...flows.device import resolve_device
    from ...flows.models import build_maf
    from ...flows.preprocessing import CaloFlowPreprocessor
    from ...flows.sampling import ShowerGenerator
    from ...flows.serialization import save_generator_dir
    from ...flows.training import DiagonalGaussianBaseline, evaluate_nll, train_flow_mle

    from ..data.dataset import dataset_hash, open_dataset

    cfg = as_config(TeacherTrainConfig, config)
    t0 = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    dev = resolve_device(device)
    # every check before anything is written: the dataset, then what --out holds
    open_dataset(data_dir)
    settings = config_to_dict(cfg)
    record: dict[str, Any] = {"stage": "train-teacher", "dataset_dir": str(data_dir.resolve()),
                              "dataset_digest": dataset_hash(data_dir), "config": compared_config(settings)}
    plan = check_model_dir(out_dir, record, overwrite=overwrite)
    ds, train, val, test = load_splits(data_dir, cfg.max_train)
    geometry = ds.geometry
    record.update(training_data_record(geometry.name, train), geometry=geometry.to_dict())  # the model carries it
    start_model_dir(plan, record, "train_config.json", settings)
    logger.info("train-teacher: %s, %d/%d/%d showers, %d voxels, device %s", geometry.name, len(train), len(val), len(test), geometry.n_voxels, dev)

    pre = CaloFlowPreprocessor(list(geometry.layer_sizes), **cfg.preprocessing.to_dict())
    pre.fit(train.incident_energy, train.voxels.astype(np.float64))
    tr, va, te = (_prepare(pre, s, cfg.seed + i) for i, s in enumerate((train, val, test)))
    n_layers, n_voxels = geometry.n_layers, geometry.n_voxels

    def logger_for(prefix: str) -> Callable[[dict[str, float], int], None]:
        def cb(metrics: dict[str, float], epoch: int) -> None:
            if log_metrics is not None:
                log_metrics({f"{prefix}_{k}": float(v) for k, v in metrics.items()}, epoch)

        return cb

    torch.manual_seed(cfg.seed)
    cfg1 = _resolve_flow("flow1", cfg.flow1.model, n_layers, 1)
    flow1 = build_maf(cfg1)
    res1 = train_flow_mle(
        flow1, tr["x1"], tr["c1"], va["x1"], va["c1"], cfg.flow1.train, out_dir / "checkpoints" / "flow1",
        device=dev, on_epoch_end=logger_for("flow1"), progress=cfg.progress, desc="flow1",
    )
    torch.manual_seed(cfg.seed + 1)
    cfg2 = _resolve_flow("teacher", cfg.teacher.model, n_voxels, 1 + n_layers)
    teacher = build_maf(cfg2)
    res2 = train_flow_mle(
        teacher, tr["x2"], tr["c2"], va["x2"], va["c2"], cfg.teacher.train, out_dir / "checkpoints" / "teacher",
        device=dev, on_epoch_end=logger_for("teacher"), progress=cfg.progress, desc="teacher",
    )
    save_generator_dir(out_dir, pre, flow1.cpu(), cfg1, teacher.cpu(), cfg2, kind="teacher")
    atomic_write_json(out_dir / "history.json", {"flow1": res1.history, "teacher": res2.history})
    flow1.to(dev)
    teacher.to(dev)

    metrics: dict[str, float] = {}
    test_nll = evaluate_nll(teacher, te["x2"], te["c2"], cfg.eval_batch_size, dev)
    flow1_nll = evaluate_nll(flow1, te["x1"], te["c1"], cfg.eval_batch_size, dev)
    base2 = DiagonalGaussianBaseline().fit(tr["x2"]).nll(te["x2"])
    base1 = DiagonalGaussianBaseline().fit(tr["x1"]).nll(te["x1"])
    metrics.update(
        test_nll=test_nll,
        test_nll_per_dim=test_nll / n_voxels,
        baseline_nll=base2,
        baseline_nll_per_dim=base2 / n_voxels,
        flow1_test_nll=flow1_nll,
        flow1_test_nll_per_dim=flow1_nll / n_layers,
        flow1_baseline_nll=base1,
        flow1_baseline_nll_per_dim=base1 / n_layers,
        flow1_epochs=float(res1.epochs_run),
        flow1_best_epoch=float(res1.best_epoch),
        teacher_epochs=float(res2.epochs_run),
        teacher_best_epoch=float(res2.best_epoch),
        epochs=float(res2.epochs_run),
        n_train=float(len(train)),
        n_val=float(len(val)),
        n_test=float(len(test)),
        n_voxels=float(n_voxels),
    )
    logger.info("test NLL: teacher %.2f nats (%.4f / voxel), diagonal Gaussian %.2f; Flow I %.3f (baseline %.3f)",
                test_nll, test_nll / n_voxels, base2, flow1_nll, base1)

    # samples at test energies vs the test data
    data_summary = shower_summary(test.incident_energy, test.layer_energies)
    rng = np.random.default_rng(cfg.seed + 10)
    gen = ShowerGenerator(pre, flow1, teacher, device=dev)
    n1 = len(test) if cfg.flow1_check_samples <= 0 else min(cfg.flow1_check_samples, len(test))
    idx1 = np.sort(rng.choice(len(test), size=n1, replace=False))
    e1 = torch.as_tensor(test.incident_energy[idx1], dtype=torch.float64, device=dev)
    with torch.no_grad():
        u = flow1.sample(context=pre.flow1_context(e1).to(torch.float32), generator=torch.Generator(device=dev).manual_seed(cfg.seed))
        layers1 = pre.layer_energies_from_flow1(u.to(torch.float64), e1).cpu().numpy()
    metrics.update(compare_summaries(data_summary, shower_summary(test.incident_energy[idx1], layers1), "data", "gen", prefix="flow1_"))
    if cfg.check_samples > 0:
        n2 = min(cfg.check_samples, len(test))
        idx2 = np.sort(rng.choice(len(test), size=n2, replace=False))
        t_s = time.perf_counter()
        voxels = gen.sample(test.incident_energy[idx2], batch_size=cfg.check_batch_size, seed=cfg.seed, progress=cfg.progress)
        metrics["teacher_sample_s"] = time.perf_counter() - t_s
        gen_layers = geometry.layer_energies(voxels.astype(np.float64))
        metrics.update(compare_summaries(data_summary, shower_summary(test.incident_energy[idx2], gen_layers), "data", "gen"))
        metrics["check_samples"] = float(n2)
        logger.info("teacher samples (%d): layer fractions within %.2f%%, response %.4f vs data %.4f",
                    n2, 100 * metrics["layer_frac_max_rel_diff"], metrics["response_gen"], metrics["response_data"])
    metrics["train_time_s"] = time.perf_counter() - t0
    atomic_write_json(out_dir / "metrics.json", metrics)
    if log_metrics is not None:
        log_metrics(dict(metrics), int(res2.epochs_run))
    return metrics
