"""Stage ``train-teacher``: fit the preprocessing, train Flow I and the MAF teacher (Flow II) by maximum likelihood.

:func:`train_teacher` is the plain stage function (paths and a config in, metrics out); ``configure_parser``
and ``run_cli`` make it the ``calodistill train-teacher`` command. The model directory it writes is a
generator directory (:func:`flows.serialization.save_generator_dir`: ``preprocessing.json``,
``flow1.pt``, ``teacher.pt``) plus ``train_config.json``, ``metrics.json``, ``history.json`` and
``checkpoints/{flow1,teacher}/`` (resumable: running the command again continues an interrupted run).

Configuration: :class:`TeacherTrainConfig` (typed dataclasses with defaults), overridden by a YAML/JSON
file (``--config``), then by ``--set key=value`` (dotted keys, e.g. ``--set teacher.train.epochs=5``).
Unknown keys are rejected with a message naming the key and the file. The same loader
(:func:`build_config`) serves ``calodistill distill``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..atomic import atomic_write_json
from ..errors import CalodistillError

__all__ = [
    "PreprocessingSettings",
    "FlowSettings",
    "StageTrainSettings",
    "TeacherTrainConfig",
    "build_config",
    "load_config_file",
    "parse_set_overrides",
    "train_teacher",
    "shower_summary",
    "compare_summaries",
]

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------
# typed configuration


@dataclass
class PreprocessingSettings:
    """CaloFlow preprocessing (see :class:`flows.preprocessing.CaloFlowPreprocessor`)."""

    alpha: float = 1e-6
    noise_level: float = 1e-3
    voxel_threshold: float = 1e-3


@dataclass
class FlowSettings:
    """Architecture of one MAF (see :class:`flows.models.FlowConfig`); ``hidden_features`` 0 = D."""

    n_blocks: int = 8
    hidden_features: int = 0
    n_hidden_layers: int = 1
    kind: str = "spline"
    num_bins: int = 8
    tail_bound: float = 14.0
    permutation: str = "reverse"
    permutation_seed: int = 0
    dropout: float = 0.0
    activation: str = "relu"


def _train_settings(**kw: Any) -> Any:
    from ...flows.training import TrainConfig

    return field(default_factory=lambda: TrainConfig(**kw))


@dataclass
class StageTrainSettings:
    """One flow of the teacher stage: architecture (``model``) and optimisation (``train``)."""

    model: FlowSettings = field(default_factory=FlowSettings)
    train: Any = _train_settings()  # flows.training.TrainConfig


def _flow1_defaults() -> StageTrainSettings:
    from ...flows.training import TrainConfig

    return StageTrainSettings(
        model=FlowSettings(n_blocks=6, hidden_features=64, n_hidden_layers=2),
        train=TrainConfig(epochs=50, batch_size=256, lr=1e-3, patience=10),
    )


def _teacher_defaults() -> StageTrainSettings:
    from ...flows.training import TrainConfig

    return StageTrainSettings(
        model=FlowSettings(n_blocks=8, hidden_features=0, n_hidden_layers=1),
        train=TrainConfig(epochs=50, batch_size=256, lr=1e-3, patience=10),
    )


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
    preprocessing: PreprocessingSettings = field(default_factory=PreprocessingSettings)
    flow1: StageTrainSettings = field(default_factory=_flow1_defaults)
    teacher: StageTrainSettings = field(default_factory=_teacher_defaults)
    eval_batch_size: int = 2048
    check_samples: int = 100
    flow1_check_samples: int = 0
    check_batch_size: int = 100


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = hints.get(f.name, f.type)
    return out


def _default_instance(cls: type) -> Any:
    return cls()


def _nested_classes(cls: type, instance: Any) -> dict[str, type]:
    """Field name → dataclass type for nested dataclass fields (typed ``Any`` ones resolved from the default)."""
    types = _field_types(cls)
    out = {}
    for name, tp in types.items():
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out[name] = tp
        else:
            value = getattr(instance, name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                out[name] = type(value)
    return out


def _coerce(value: Any, tp: Any, where: str, source: str) -> Any:
    def bad(expected: str) -> CalodistillError:
        return CalodistillError(f"{source}: {where}: expected {expected}, got {value!r}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    return value


def _expand_dotted(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise CalodistillError(f"{source}: keys must be strings, got {key!r}")
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CalodistillError(f"{source}: key '{key}' conflicts with a value set for '{part}'")
        if isinstance(value, Mapping):
            value = _expand_dotted(value, source)
            existing = node.get(parts[-1])
            if isinstance(existing, dict):
                existing.update(value)
                continue
        node[parts[-1]] = value
    return out


def _merge(cls: type, instance: Any, values: dict[str, Any], data: Mapping[str, Any], source: str, prefix: str) -> None:
    types = _field_types(cls)
    nested = _nested_classes(cls, instance)
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in types:
            known = ", ".join(f"{prefix}{k}" for k in types)
            raise CalodistillError(f"{source}: unknown key '{where}' (known: {known})")
        if key in nested:
            if not isinstance(value, Mapping):
                raise CalodistillError(f"{source}: {where}: expected a mapping of settings, got {value!r}")
            _merge(nested[key], getattr(instance, key), values.setdefault(key, {}), value, source, f"{where}.")
        else:
            values[key] = _coerce(value, types[key], where, source)


def _construct(cls: type, instance: Any, values: dict[str, Any]) -> Any:
    from ...flows.errors import FlowsError

    nested = _nested_classes(cls, instance)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in nested:
            kwargs[f.name] = _construct(nested[f.name], getattr(instance, f.name), values.get(f.name, {}))
        elif f.name in values:
            kwargs[f.name] = values[f.name]
        else:
            kwargs[f.name] = getattr(instance, f.name)
    try:
        return cls(**kwargs)
    except FlowsError as exc:
        raise CalodistillError(f"config: {exc}") from None


def load_config_file(path: Path | str) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (``CalodistillError`` naming the file on failure)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise CalodistillError(f"{p}: cannot read config file ({exc.strerror})") from None
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = " ".join(str(exc).split())
        raise CalodistillError(f"{p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'} ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CalodistillError(f"{p}: expected a mapping of settings at the top level")
    return data


def parse_set_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=3", "kind=affine"]`` → ``{"a.b": 3, "kind": "affine"}`` (values parsed as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CalodistillError(f"--set: expected key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key] = value
    return out


def build_config(cls: type[T], *sources: tuple[Mapping[str, Any] | None, str]) -> T:
    """A ``cls`` instance: its defaults overridden by each ``(mapping, source name)`` in turn.

    Mappings may be nested or use dotted keys. Unknown keys and badly typed values raise
    :class:`CalodistillError` naming the key and the source (a file path, ``--set``, ``config``).
    """
    if isinstance(cls, type) and not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    default = _default_instance(cls)
    values: dict[str, Any] = {}
    for data, source in sources:
        if data is None:
            continue
        if dataclasses.is_dataclass(data) and not isinstance(data, type):
            data = dataclasses.asdict(data)
        if not isinstance(data, Mapping):
            raise CalodistillError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        _merge(cls, default, values, _expand_dotted(data, source), source, "")
    return _construct(cls, default, values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able nested dict of a config dataclass."""
    return dataclasses.asdict(config)


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


def _flow_config(settings: FlowSettings, features: int, context: int) -> Any:
    from ...flows.errors import FlowsError
    from ...flows.models import FlowConfig

    d = dataclasses.asdict(settings)
    d["hidden_features"] = d["hidden_features"] or features
    try:
        return FlowConfig(features=features, context_features=context, **d)
    except FlowsError as exc:
        raise CalodistillError(f"config: {exc}") from None


def _resolve_config(cls: type[T], config: Mapping[str, Any] | T | None) -> T:
    if isinstance(config, cls):
        return config
    return build_config(cls, (config, "config"))  # type: ignore[arg-type]


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


def train_teacher(
    data_dir: Path,
    out_dir: Path,
    config: Mapping[str, Any] | TeacherTrainConfig | None = None,
    log_metrics: MetricsCallback | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """Train Flow I and the MAF teacher on an ingested dataset; write a generator directory.

    Steps: load the train/val/test splits; fit the preprocessing on the training showers; train Flow I
    (layer energies | E_inc) and the teacher (voxels | E_inc, layer energies) by maximum likelihood with
    resumable checkpoints under ``out_dir/checkpoints``; score the test split; fit a diagonal Gaussian
    to the same preprocessed training inputs as a baseline; sample showers from Flow I (+ teacher) at
    test energies and compare mean layer-energy fractions and energy response with the test data.

    Args:
        data_dir: a dataset written by ``calodistill ingest``.
        out_dir: the model directory to write (created; an interrupted run there is resumed).
        config: a :class:`TeacherTrainConfig` or a (nested or dotted-key) dict overriding its defaults.
        log_metrics: ``log_metrics(metrics, step)`` after each epoch (``flow1_*`` / ``teacher_*`` keys,
            step = epoch of that flow) and once at the end with the final metrics.
        device: "cpu", "cuda" or None (CUDA when present).

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

    cfg = _resolve_config(TeacherTrainConfig, config)
    t0 = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    dev = resolve_device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "train_config.json", config_to_dict(cfg))

    ds, train, val, test = load_splits(data_dir, cfg.max_train)
    geometry = ds.geometry
    logger.info("train-teacher: %s, %d/%d/%d showers, %d voxels, device %s", geometry.name, len(train), len(val), len(test), geometry.n_voxels, dev)

    pp = cfg.preprocessing
    pre = CaloFlowPreprocessor(list(geometry.layer_sizes), alpha=pp.alpha, noise_level=pp.noise_level, voxel_threshold=pp.voxel_threshold)
    pre.fit(train.incident_energy, train.voxels.astype(np.float64))
    tr, va, te = (_prepare(pre, s, cfg.seed + i) for i, s in enumerate((train, val, test)))
    n_layers, n_voxels = geometry.n_layers, geometry.n_voxels

    def logger_for(prefix: str) -> Callable[[dict[str, float], int], None]:
        def cb(metrics: dict[str, float], epoch: int) -> None:
            if log_metrics is not None:
                log_metrics({f"{prefix}_{k}": float(v) for k, v in metrics.items()}, epoch)

        return cb

    torch.manual_seed(cfg.seed)
    cfg1 = _flow_config(cfg.flow1.model, n_layers, 1)
    flow1 = build_maf(cfg1)
    res1 = train_flow_mle(
        flow1, tr["x1"], tr["c1"], va["x1"], va["c1"], cfg.flow1.train, out_dir / "checkpoints" / "flow1",
        device=dev, on_epoch_end=logger_for("flow1"), progress=cfg.progress, desc="flow1",
    )
    torch.manual_seed(cfg.seed + 1)
    cfg2 = _flow_config(cfg.teacher.model, n_voxels, 1 + n_layers)
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


# ---------------------------------------------------------------------------------------------------
# command line


