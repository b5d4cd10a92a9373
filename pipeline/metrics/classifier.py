"""Classifier two-sample test, as in the CaloChallenge 2022 evaluation.

A fully connected network is trained to tell generated showers (label 1) from reference showers
(label 0). If it cannot do better than chance on held-out data (ROC AUC ≈ 0.5), the generated showers
are indistinguishable from the reference at the level of the chosen input:

- low level: ``[log10 E_inc, voxels / E_inc]`` per shower (:func:`low_level_features`);
- high level: the observables of :mod:`pipeline.observables` plus ``log10 E_inc``
  (:func:`high_level_features`).

Both inputs are standardised with the mean and standard deviation of the training part. A balanced
sample (the same number of showers from both classes) is split into train / validation / test parts
(60/20/20 by default, within each class); training stops early when the validation loss has not
improved for ``patience`` epochs, and the AUC is computed on the test part with the best weights.

References:
    Fast Calorimeter Simulation Challenge 2022, evaluation code (CaloChallenge/homepage, code/evaluate.py):
    DNN classifier, 3 hidden layers of 512, Adam with learning rate 2e-4, batch 1000, 50 epochs.
    C. Krause, D. Shih, "CaloFlow", arXiv:2106.05285, section 5 (classifier metric).
    D. Lopez-Paz, M. Oquab, "Revisiting classifier two-sample tests", arXiv:1610.06545.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from ...flows.device import resolve_device
from ..data.showers import Showers
from ..errors import CalodistillError

__all__ = [
    "ClassifierConfig",
    "ClassifierResult",
    "low_level_features",
    "high_level_features",
    "classifier_two_sample_test",
    "roc_auc",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierConfig:
    """Hyperparameters of the classifier test.

    Args:
        hidden: widths of the hidden layers (the CaloChallenge network is ``(512, 512, 512)``, see
            :meth:`calochallenge`; the default is smaller so the test runs in seconds on a CPU).
        dropout: dropout probability after each hidden layer.
        learning_rate: Adam learning rate.
        batch_size: minibatch size.
        max_epochs: upper bound on the number of epochs.
        patience: stop when the validation loss has not improved for this many epochs.
        fractions: train / validation / test fractions of the balanced sample.
        max_per_class: at most this many showers of each class are used (None: all).
        device: torch device ("cpu", "cuda"); None picks CUDA when present.
    """

    hidden: tuple[int, ...] = (128, 128, 128)
    dropout: float = 0.0
    learning_rate: float = 1e-3
    batch_size: int = 500
    max_epochs: int = 50
    patience: int = 5
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    max_per_class: int | None = 50_000
    device: str | None = None

    def __post_init__(self) -> None:
        if not self.hidden or any(int(h) <= 0 for h in self.hidden):
            raise CalodistillError(f"classifier.hidden: positive layer widths expected, got {self.hidden}")
        if len(self.fractions) != 3 or any(f <= 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise CalodistillError(f"classifier.fractions: three positive fractions summing to 1 expected, got {self.fractions}")
        if self.max_epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise CalodistillError("classifier: max_epochs, patience and batch_size must be positive")
        if not 0 <= self.dropout < 1:
            raise CalodistillError(f"classifier.dropout: must be in [0, 1), got {self.dropout}")

    @classmethod
    def calochallenge(cls, device: str | None = None) -> "ClassifierConfig":
        """The CaloChallenge 2022 settings: 3×512, Adam 2e-4, batch 1000, up to 50 epochs, 60/20/20."""
        return cls(hidden=(512, 512, 512), learning_rate=2e-4, batch_size=1000, max_epochs=50, patience=10,
                   max_per_class=None, device=device)

    @classmethod
    def from_dict(cls, values: dict | None, source: str = "classifier") -> "ClassifierConfig":
        """Build from a plain dict (e.g. a DAG parameter block), rejecting unknown keys.

        ``{"preset": "calochallenge"}`` starts from :meth:`calochallenge`; other keys override.
        """
        values = dict(values or {})
        preset = values.pop("preset", "cpu")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CalodistillError(f"{source}: unknown key {unknown[0]!r} (known: preset, {', '.join(sorted(known))})")
        if preset == "calochallenge":
            base = asdict(cls.calochallenge())
        elif preset == "cpu":
            base = asdict(cls())
        else:
            raise CalodistillError(f"{source}.preset: expected 'cpu' or 'calochallenge', got {preset!r}")
        base.update(values)
        base["hidden"] = tuple(int(h) for h in base["hidden"])
        base["fractions"] = tuple(float(f) for f in base["fractions"])
        return cls(**base)


@dataclass
class ClassifierResult:
    """Outcome of one classifier test.

    Attributes:
        auc: ROC AUC on the test part (0.5: indistinguishable; 1: perfectly separated). A classifier
            worse than chance is not folded: values below 0.5 are statistical fluctuations.
        jsd: Jensen-Shannon divergence estimate (in units of ln 2, so within [0, 1]) from the classifier
            output on the test part: ln 2 + ½ E_gen[ln D] + ½ E_ref[ln(1 − D)], clipped at 0.
        accuracy: accuracy at threshold 0.5 on the test part.
        epochs: epochs trained; best_epoch: the epoch whose weights were used.
        n_train, n_val, n_test: showers (both classes together) in each part.
        history: per-epoch ``train_loss`` and ``val_loss``.
    """

    auc: float
    jsd: float
    accuracy: float
    epochs: int
    best_epoch: int
    n_train: int
    n_val: int
    n_test: int
    history: dict[str, list[float]] = field(default_factory=dict)


def low_level_features(showers: Showers) -> np.ndarray:
    """``[log10 E_inc/MeV, voxels / E_inc]`` per shower, ``(N, 1 + n_voxels)`` float32."""
    e_inc = showers.incident_energy
    if np.any(e_inc <= 0):
        raise CalodistillError("classifier: incident energies must be positive")
    return np.concatenate(
        [np.log10(e_inc)[:, None], showers.voxels.astype(np.float64) / e_inc[:, None]], axis=1
    ).astype(np.float32)


#: Observable name prefixes left out of the high-level classifier features (see :func:`high_level_features`).
NOT_CLASSIFIER_FEATURES = ("radius_layer", "width_r_layer")


def high_level_features(showers: Showers, observables: dict[str, np.ndarray] | None = None, threshold: float | None = None) -> np.ndarray:
    """``[log10 E_inc/MeV, observables...]`` per shower, ``(N, 1 + n_observables)`` float32.

    Args:
        showers: the showers.
        observables: precomputed :func:`calodistill.pipeline.metrics.observables.compute_observables` output (computed if None).
        threshold: sparsity threshold in MeV when computing (default of :mod:`pipeline.observables`).
    """
    from .observables import DEFAULT_THRESHOLD_MEV, compute_observables

    if observables is None:
        observables = compute_observables(showers, DEFAULT_THRESHOLD_MEV if threshold is None else threshold)
    e_inc = showers.incident_energy
    if np.any(e_inc <= 0):
        raise CalodistillError("classifier: incident energies must be positive")
    # The CaloChallenge's high-level set: the polar geometries' extra radial observables are plotted and
    # scored by separation power, but kept out of the classifier so its AUCs stay comparable with the
    # published leaderboard.
    keys = [k for k in observables if not k.startswith(NOT_CLASSIFIER_FEATURES)]
    cols = [np.log10(e_inc)] + [np.asarray(observables[k], dtype=np.float64) for k in keys]
    feats = np.stack(cols, axis=1)
    # Layer energies span orders of magnitude: compress them as the CaloChallenge does (log10(E + 1e-8)).
    for j, k in enumerate(keys, start=1):
        if k.startswith("E_layer"):
            feats[:, j] = np.log10(np.clip(feats[:, j], 0.0, None) + 1e-8)
    return feats.astype(np.float32)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney statistic (ties count ½); no sklearn needed."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise CalodistillError("classifier: AUC needs both classes in the test part")
    # average ranks (1-based) with ties sharing the mean of their positions
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _split_indices(n: int, fractions: tuple[float, float, float], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    perm = rng.permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


def classifier_two_sample_test(
    generated: np.ndarray,
    reference: np.ndarray,
    config: ClassifierConfig | None = None,
    seed: int = 0,
) -> ClassifierResult:
    """Train a classifier to separate ``generated`` (label 1) from ``reference`` (label 0) features.

    Args:
        generated: ``(N1, F)`` features of generated showers (see :func:`low_level_features`).
        reference: ``(N0, F)`` features of reference showers.
        config: hyperparameters (default :class:`ClassifierConfig`).
        seed: seeds the subsampling, the split, the initialisation and the shuffling.

    Returns:
        :class:`ClassifierResult` with the test AUC.
    """
    import torch

    config = config or ClassifierConfig()
    generated = np.asarray(generated, dtype=np.float32)
    reference = np.asarray(reference, dtype=np.float32)
    if generated.ndim != 2 or reference.ndim != 2 or generated.shape[1] != reference.shape[1]:
        raise CalodistillError(
            f"classifier: feature arrays must be 2-d with equal widths, got {generated.shape} and {reference.shape}"
        )
    if not (np.isfinite(generated).all() and np.isfinite(reference).all()):
        raise CalodistillError("classifier: features contain NaN or infinite values")
    n = min(len(generated), len(reference))
    if config.max_per_class is not None:
        n = min(n, int(config.max_per_class))
    if n < 10:
        raise CalodistillError(f"classifier: need at least 10 showers per class, got {n}")

    rng = np.random.default_rng(seed)
    gen = generated[rng.choice(len(generated), n, replace=False)]
    ref = reference[rng.choice(len(reference), n, replace=False)]
    parts: list[list[np.ndarray]] = [[], [], []]
    labels: list[list[np.ndarray]] = [[], [], []]
    for x, y in ((gen, 1.0), (ref, 0.0)):
        for k, idx in enumerate(_split_indices(n, config.fractions, rng)):
            parts[k].append(x[idx])
            labels[k].append(np.full(len(idx), y, dtype=np.float32))
    (x_tr, x_va, x_te) = (np.concatenate(p) for p in parts)
    (y_tr, y_va, y_te) = (np.concatenate(lab) for lab in labels)
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    x_tr, x_va, x_te = ((x - mean) / std for x in (x_tr, x_va, x_te))

    device = resolve_device(config.device)
    gen_torch = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    width = x_tr.shape[1]
    for h in config.hidden:
        layers += [torch.nn.Linear(width, int(h)), torch.nn.LeakyReLU(0.2)]
        if config.dropout > 0:
            layers.append(torch.nn.Dropout(config.dropout))
        width = int(h)
    layers.append(torch.nn.Linear(width, 1))
    net = torch.nn.Sequential(*layers).to(device)
    torch.random.set_rng_state(torch_state)
    opt = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def to_t(a: np.ndarray) -> "torch.Tensor":
        return torch.as_tensor(a, dtype=torch.float32, device=device)

    xt, yt = to_t(x_tr), to_t(y_tr)
    xv, yv = to_t(x_va), to_t(y_va)

    def logits(x: "torch.Tensor") -> "torch.Tensor":
        net.eval()
        with torch.no_grad():
            return torch.cat([net(x[i : i + 10_000]).squeeze(1) for i in range(0, len(x), 10_000)])

    best_loss, best_epoch, best_state = math.inf, 0, copy.deepcopy(net.state_dict())
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        net.train()
        perm = torch.randperm(len(xt), generator=gen_torch).to(device)
        total = 0.0
        for i in range(0, len(xt), config.batch_size):
            idx = perm[i : i + config.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xt[idx]).squeeze(1), yt[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        val_loss = float(loss_fn(logits(xv), yv))
        history["train_loss"].append(total / len(xt))
        history["val_loss"].append(val_loss)
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(net.state_dict())
        elif epoch - best_epoch >= config.patience:
            break
    net.load_state_dict(best_state)
    scores = torch.sigmoid(logits(to_t(x_te))).double().cpu().numpy()
    auc = roc_auc(y_te, scores)
    d = np.clip(scores, 1e-7, 1 - 1e-7)
    pos = y_te > 0.5
    jsd = (math.log(2) + 0.5 * np.mean(np.log(d[pos])) + 0.5 * np.mean(np.log(1 - d[~pos]))) / math.log(2)
    accuracy = float(np.mean((scores > 0.5) == pos))
    logger.debug("classifier: AUC %.4f after %d epochs (best %d)", auc, epoch, best_epoch)
    return ClassifierResult(
        auc=auc,
        jsd=float(max(jsd, 0.0)),
        accuracy=accuracy,
        epochs=epoch,
        best_epoch=best_epoch,
        n_train=len(x_tr),
        n_val=len(x_va),
        n_test=len(x_te),
        history=history,
    )
