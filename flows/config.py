"""Hyperparameters as validated dataclasses: one flow, its training, its distillation, the preprocessing.

Torch-free, so that a configuration file can be read and checked before anything heavy is imported.
Every check raises :class:`~flows.errors.FlowsError` with one line ``"FIELD: problem"``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from .errors import FlowsError

__all__ = [
    "ACTIVATION_NAMES",
    "KINDS",
    "PERMUTATIONS",
    "SCHEDULES",
    "STUDENT_FIELDS",
    "DistillConfig",
    "FlowConfig",
    "PreprocessingConfig",
    "TrainConfig",
    "flow1_config",
    "teacher_config",
]

KINDS = ("spline", "affine")
PERMUTATIONS = ("reverse", "random", "none")
ACTIVATION_NAMES = ("relu", "elu", "gelu", "tanh", "silu")  # the keys of flows.transforms.ACTIVATIONS
SCHEDULES = ("onecycle", "cosine", "step", "constant")
STUDENT_FIELDS = ("hidden_features", "n_hidden_layers", "dropout", "activation")
"""The :class:`FlowConfig` fields in which a student may differ from its teacher (``build_iaf_like``)."""


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise FlowsError(f"{name}: must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf, *,
                  open_low: bool = False, open_high: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high or high == math.inf else ']'}"
        raise FlowsError(f"{name}: must be a number in {interval}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FlowsError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise FlowsError(f"{name}: must be true or false, got {value!r}")


@dataclass(frozen=True)
class FlowConfig:
    """Hyperparameters of one flow (MAF or IAF), stored with its weights.

    ``features`` and ``context_features`` are sizes of the data: a configuration written before the
    data is known leaves them unset (None, 0) and :meth:`resolve` fills them in; a flow is built only
    from a configuration whose ``features`` is set.

    Attributes:
        features: D, the number of variables (None: not known yet).
        context_features: size of the condition vector (0 = unconditional).
        n_blocks: number of MADE blocks K.
        hidden_features: width of each MADE hidden layer; 0 (only while ``features`` is unset) means
            ``features``, CaloFlow's teacher width.
        n_hidden_layers: hidden layers per MADE.
        kind: "spline" (rational-quadratic, linear tails) or "affine".
        num_bins: spline bins.
        tail_bound: spline interval [−tail_bound, tail_bound].
        permutation: "reverse", "random" (seeded by ``permutation_seed``) or "none", between blocks.
        permutation_seed: seed of the random permutations.
        dropout: dropout probability in the MADE hidden layers.
        activation: MADE activation ("relu", "elu", "gelu", "tanh", "silu").
    """

    features: int | None = None
    context_features: int = 0
    n_blocks: int = 8
    hidden_features: int = 64
    n_hidden_layers: int = 1
    kind: str = "spline"
    num_bins: int = 8
    tail_bound: float = 14.0
    permutation: str = "reverse"
    permutation_seed: int = 0
    dropout: float = 0.0
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.features is not None:
            _check_int("features", self.features, 1)
        _check_int("context_features", self.context_features, 0)
        _check_int("hidden_features", self.hidden_features, 0 if self.features is None else 1)
        for name in ("n_blocks", "n_hidden_layers", "num_bins"):
            _check_int(name, getattr(self, name), 1)
        _check_int("permutation_seed", self.permutation_seed, 0)
        _check_choice("kind", self.kind, KINDS)
        _check_choice("permutation", self.permutation, PERMUTATIONS)
        _check_choice("activation", self.activation, ACTIVATION_NAMES)
        _check_number("tail_bound", self.tail_bound, open_low=True)
        _check_number("dropout", self.dropout, 0.0, 1.0, open_high=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "flow config") -> FlowConfig:
        """Build from a dict, rejecting unknown keys with a message naming the key and ``source``."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise FlowsError(f"{source}: unknown key '{key}' (known: {', '.join(sorted(known))})")
        return cls(**data)

    def replace(self, **changes: Any) -> FlowConfig:
        """A copy with some fields changed (unknown names rejected)."""
        return FlowConfig.from_dict({**self.to_dict(), **changes}, source="FlowConfig.replace")

    def resolve(self, features: int, context_features: int) -> FlowConfig:
        """This configuration for data of ``features`` variables and ``context_features`` conditions.

        Fills in both sizes, and ``hidden_features`` 0 becomes ``features``. Sizes already set must
        agree with the data (a ``context_features`` of 0 is the default, not a choice, and is replaced).
        """
        if self.features is not None and self.features != features:
            raise FlowsError(f"features: {self.features} in the config, but the data has {features}")
        if self.context_features not in (0, context_features):
            raise FlowsError(f"context_features: {self.context_features} in the config, but the data has "
                             f"{context_features}")
        return self.replace(features=features, context_features=context_features,
                            hidden_features=self.hidden_features or features)


def flow1_config(n_layers: int, **overrides: Any) -> FlowConfig:
    """CaloFlow Flow I: layer energies given E_inc; 6 spline blocks, 2 hidden layers of 64, 8 bins."""
    base = {"features": n_layers, "context_features": 1, "n_blocks": 6, "hidden_features": 64,
            "n_hidden_layers": 2, "kind": "spline", "num_bins": 8, "tail_bound": 14.0, "permutation": "reverse"}
    return FlowConfig.from_dict({**base, **overrides}, source="flow1 config")


def teacher_config(n_voxels: int, n_layers: int, **overrides: Any) -> FlowConfig:
    """CaloFlow Flow II teacher: voxels given (E_inc, layer energies); 8 blocks, hidden = D, 8 bins."""
    base = {"features": n_voxels, "context_features": 1 + n_layers, "n_blocks": 8, "hidden_features": n_voxels,
            "n_hidden_layers": 1, "kind": "spline", "num_bins": 8, "tail_bound": 14.0, "permutation": "reverse"}
    return FlowConfig.from_dict({**base, **overrides}, source="teacher config")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run (:func:`flows.training.fit`).

    Attributes:
        epochs: maximum number of epochs.
        batch_size: examples per optimisation step.
        lr: peak (one-cycle) or initial learning rate of Adam.
        weight_decay: Adam's L2 penalty.
        schedule: "onecycle", "cosine" (to 0 over the run), "step" (× ``step_gamma`` every
            ``step_epochs`` epochs) or "constant".
        step_epochs: epochs between decays of the "step" schedule.
        step_gamma: decay factor of the "step" schedule.
        patience: stop after this many epochs without improvement of the monitored metric (0: never).
        min_delta: an improvement must exceed this.
        grad_clip: clip the global gradient norm to this (0: no clipping).
        seed: seeds the torch/numpy/python RNGs at the start and the batch order of every epoch.
        eval_batch_size: batch size of validation passes.
    """

    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "onecycle"
    step_epochs: int = 10
    step_gamma: float = 0.5
    patience: int = 10
    min_delta: float = 0.0
    grad_clip: float = 5.0
    seed: int = 0
    eval_batch_size: int = 2048

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "step_epochs", "eval_batch_size"):
            _check_int(name, getattr(self, name), 1)
        for name in ("patience", "seed"):
            _check_int(name, getattr(self, name), 0)
        _check_number("lr", self.lr, open_low=True)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_number("step_gamma", self.step_gamma, open_low=True)
        for name in ("weight_decay", "min_delta", "grad_clip"):
            _check_number(name, getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DistillConfig:
    """Distillation-specific settings (:func:`flows.distillation.distill`; optimisation is a :class:`TrainConfig`).

    Why the defaults are what they are, with the measurements: docs/experiments.md.

    Attributes:
        beta: weight of the x-pass in ``(1 − β)·L_z + β·L_x``.
        fully_guided: add the squared errors of every intermediate state and MADE output.
        kl_samples: student samples per KL(student ‖ teacher) estimate (one per validation condition,
            cycled).
        kl_batch_size: samples per pass of the KL estimate.
        kl_seed: seed of the KL estimate's noise (the same every epoch).
        init_from_teacher: start the student's MADEs from the teacher's weights (when the sizes
            match; see :func:`flows.distillation.init_student_from_teacher`).
        x_pass: "chain" (CaloFlow II: the student runs its whole inverse pass from the teacher's z) or
            "local" (teacher forcing: every student block gets the teacher's state on its noise side,
            so each block regresses its own targets independently; see
            :func:`flows.distillation.student_local_trace`). The z-pass always runs the whole chain.
        reduction: "sum" (CaloFlow II as written) or "mean" over each squared-error term's elements.
        params_weight: weight of the MADE-output (spline parameter) terms of the fully guided loss.
        passes_per_epoch: passes over the training set per epoch (more optimiser steps between the
            per-epoch validation, KL estimate and checkpoint).
        noise_weight: weight w of the noise-side x-pass term (local x-pass only): the x-pass loss
            becomes ``guided_x + w·noise_x`` with ``noise_x`` the squared error of every
            teacher-forced student block measured after the teacher block's elementwise map (see
            :func:`flows.distillation.local_noise_side_error`), i.e. the data-side error weighted by
            the teacher's ``∂z/∂x``. 0 turns it off.
        kl_weight: weight of the z-pass's own Monte-Carlo KL(student ‖ teacher) in the loss (0: off;
            Parallel WaveNet's probability density distillation). Both log-densities come with the
            fast passes the z-pass already runs, so the term is nearly free; it is always reported as
            ``kl_z``.
    """

    beta: float = 0.5
    fully_guided: bool = True
    kl_samples: int = 2000
    kl_batch_size: int = 1000
    kl_seed: int = 12345
    init_from_teacher: bool = True
    x_pass: str = "local"
    reduction: str = "sum"
    params_weight: float = 1.0
    passes_per_epoch: int = 1
    noise_weight: float = 4.0
    kl_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_number("beta", self.beta, 0.0, 1.0)
        for name in ("fully_guided", "init_from_teacher"):
            _check_bool(name, getattr(self, name))
        for name in ("kl_samples", "kl_batch_size", "passes_per_epoch"):
            _check_int(name, getattr(self, name), 1)
        _check_int("kl_seed", self.kl_seed, 0)
        _check_choice("x_pass", self.x_pass, ("chain", "local"))
        _check_choice("reduction", self.reduction, ("sum", "mean"))
        for name in ("params_weight", "noise_weight", "kl_weight"):
            _check_number(name, getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PreprocessingConfig:
    """Hyperparameters of :class:`flows.preprocessing.CaloFlowPreprocessor` (CaloFlow, arXiv:2106.05285).

    Attributes:
        alpha: α of the logit, in (0, 0.5).
        noise_level: upper edge of the uniform noise added to each voxel (MeV); 0 disables it.
        voxel_threshold: generated voxels below this (MeV) are set to 0 by the inverse.
    """

    alpha: float = 1e-6
    noise_level: float = 1e-3
    voxel_threshold: float = 1e-3

    def __post_init__(self) -> None:
        _check_number("alpha", self.alpha, 0.0, 0.5, open_low=True, open_high=True)
        _check_number("noise_level", self.noise_level)
        _check_number("voxel_threshold", self.voxel_threshold)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields."""
        return dataclasses.asdict(self)
