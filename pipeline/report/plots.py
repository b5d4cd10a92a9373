"""Evaluation figures, written as PNG files with matplotlib's Agg backend.

matplotlib is imported inside the functions, so importing this module is cheap and never touches a
display. Every function takes explicit data and an output path, and returns the path it wrote.

Figures:
- :func:`plot_average_images`: the mean shower per layer for each sample (reference, teacher, student),
  drawn from the geometry: polar layers on polar axes, Cartesian ones as images with x/y in mm;
- :func:`plot_observable`: the histogram of one observable for every sample with a ratio panel
  (sample / reference) and the separation power in the legend; :func:`plot_observables` draws every
  observable, one figure per kind with all layers side by side;
- :func:`plot_nll_per_energy_bin`: negative log-likelihood per incident-energy bin;
- :func:`plot_training_curves`: per-epoch metrics from a history dict.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..data.geometry import Geometry

__all__ = [
    "plot_average_images",
    "plot_observable",
    "plot_observable_grid",
    "plot_observables",
    "observable_families",
    "plot_nll_per_energy_bin",
    "plot_training_curves",
]

logger = logging.getLogger(__name__)

_COLOURS = ["black", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, dpi: int = 100, bbox: str | None = "tight") -> Path:
    """Save the figure atomically (:func:`pipeline.atomic.atomic_path`; the format from ``path``'s
    extension, PNG when it has none) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi, bbox_inches=bbox)
    finally:
        _pyplot().close(fig)
    return path


def plot_average_images(geometry: Geometry, samples: dict[str, np.ndarray], path: Path) -> Path:
    """Mean energy per cell, one row per sample and one column per layer, on a log colour scale.

    Args:
        geometry: the readout geometry of all samples.
        samples: label → voxels ``(N, n_voxels)`` in MeV (e.g. reference, teacher, student).
        path: the PNG to write.
    """
    plt = _pyplot()
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import NullFormatter

    labels = list(samples)
    means = {k: geometry.split_layers(np.asarray(v, dtype=np.float64).mean(axis=0)) for k, v in samples.items()}
    n_rows, n_cols = len(labels), geometry.n_layers
    fig = plt.figure(figsize=(2.6 * n_cols + 0.6, 2.4 * n_rows + 1.0))
    for j, layer in enumerate(geometry.layers):
        values = np.concatenate([means[k][j].ravel() for k in labels])
        positive = values[values > 0]
        vmax = positive.max() if positive.size else 1.0
        vmin = max(positive.min() if positive.size else 1e-3, vmax * 1e-5)
        norm = LogNorm(vmin=vmin, vmax=vmax)
        column = []
        for i, label in enumerate(labels):
            img = np.clip(means[label][j], vmin, None)
            if layer.kind == "polar":
                ax = fig.add_subplot(n_rows, n_cols, i * n_cols + j + 1, projection="polar")
                # Subdivide the angular bins so full rings (one bin from -π to π) are drawn as rings.
                sub = max(1, int(np.ceil(64 / layer.shape[0])))
                e0 = np.asarray(layer.edges0)
                a = np.concatenate([np.linspace(lo, hi, sub + 1)[:-1] for lo, hi in zip(e0[:-1], e0[1:])] + [e0[-1:]])
                r = np.asarray(layer.edges1)
                mesh = ax.pcolormesh(a, r, np.repeat(img, sub, axis=0).T, norm=norm, cmap="viridis", shading="flat")
                ax.set_yticklabels([])
                ax.set_xticklabels([])
            else:
                ax = fig.add_subplot(n_rows, n_cols, i * n_cols + j + 1)
                e0, e1 = layer.edges0, layer.edges1
                mesh = ax.imshow(img, norm=norm, cmap="viridis", aspect="auto", origin="lower",
                                 extent=(e1[0], e1[-1], e0[0], e0[-1]))
                ax.tick_params(labelsize=6)
                if i == n_rows - 1:  # Cartesian cells: positions in mm (rows along y, columns along x)
                    ax.set_xlabel("x [mm]", fontsize=6, labelpad=1)
                if j == 0:
                    ax.set_ylabel("y [mm]", fontsize=6, labelpad=1)
            column.append(ax)
            if i == 0:
                ax.set_title(f"layer {layer.index}", fontsize=9)
            if j == 0:
                ax.text(-0.3 if layer.kind == "polar" else -0.42, 0.5, label, transform=ax.transAxes, rotation=90, va="center", ha="center", fontsize=9)
        cbar = fig.colorbar(mesh, ax=column, orientation="horizontal", fraction=0.04, pad=0.06)
        cbar.ax.tick_params(labelsize=6)
        cbar.ax.xaxis.set_minor_formatter(NullFormatter())
        cbar.set_label("mean energy [MeV]", fontsize=7)
    return _save(fig, path)


def _draw_observable(
    ax: Any,
    rax: Any,
    name: str,
    samples: dict[str, np.ndarray],
    separation: dict[str, float] | None,
    reference: str,
    bins: int,
    quantile: float,
    xlabel: str | None,
) -> None:
    from ..metrics.observables import (
        normalised_histograms,
        observable_label,
        shared_bin_edges,
    )

    labels = [reference] + [k for k in samples if k != reference]
    edges = shared_bin_edges([samples[k] for k in labels], bins, quantile)
    hists = dict(zip(labels, normalised_histograms([samples[k] for k in labels], edges)))
    ref_h = hists[reference]
    for c, label in zip(_COLOURS * 4, labels):
        text = label
        if separation and label in separation:
            text = f"{label} (S = {separation[label]:.3g})"
        ax.stairs(hists[label], edges, label=text, color=c, linewidth=1.6 if label == reference else 1.2,
                  fill=label == reference, alpha=0.25 if label == reference else 1.0)
        if label != reference:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(ref_h > 0, hists[label] / np.where(ref_h > 0, ref_h, 1.0), np.nan)
            rax.stairs(ratio, edges, color=c, baseline=None)
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    ax.tick_params(labelbottom=False, labelsize=7)
    rax.tick_params(labelsize=7)
    rax.axhline(1.0, color="grey", linewidth=0.8)
    rax.set_ylim(0.5, 1.5)
    rax.set_xlabel(xlabel or observable_label(name), fontsize=8)


def plot_observable(
    name: str,
    samples: dict[str, np.ndarray],
    path: Path,
    separation: dict[str, float] | None = None,
    reference: str | None = None,
    bins: int = 40,
    quantile: float = 0.001,
    xlabel: str | None = None,
) -> Path:
    """Normalised histograms of one observable with a ratio panel below.

    Args:
        name: observable name (title).
        samples: label → values; the first (or ``reference``) is the denominator of the ratio panel.
        path: the PNG to write.
        separation: label → separation power against the reference, shown in the legend.
        reference: label of the reference sample (default: the first).
        bins: number of shared bins.
        quantile: see :func:`pipeline.metrics.observables.shared_bin_edges`.
        xlabel: axis label (default from :func:`pipeline.metrics.observables.observable_label`).
    """
    return plot_observable_grid([name], {k: {name: v} for k, v in samples.items()}, path,
                                {k: {name: v} for k, v in (separation or {}).items()}, reference, bins, quantile,
                                xlabels={name: xlabel} if xlabel else None)


def plot_observable_grid(
    names: list[str],
    samples: dict[str, dict[str, np.ndarray]],
    path: Path,
    separation: dict[str, dict[str, float]] | None = None,
    reference: str | None = None,
    bins: int = 40,
    quantile: float = 0.001,
    ncols: int = 5,
    xlabels: dict[str, str] | None = None,
) -> Path:
    """Several observables in one figure: a grid of histogram panels, each with its ratio panel.

    Args:
        names: observables to draw, in order.
        samples: label → {observable → values}.
        path: the PNG to write.
        separation: label → {observable → separation power}, shown in the legends.
        reference: label of the reference sample (default: the first).
        bins: number of shared bins per observable.
        quantile: see :func:`pipeline.metrics.observables.shared_bin_edges`.
        ncols: panels per row.
        xlabels: observable → axis label (default from :func:`pipeline.metrics.observables.observable_label`).
    """
    plt = _pyplot()
    reference = reference or next(iter(samples))
    ncols = max(1, min(ncols, len(names)))
    nrows = int(np.ceil(len(names) / ncols))
    fig = plt.figure(figsize=(4.2 * ncols, 3.8 * nrows))
    outer = fig.add_gridspec(nrows, ncols, left=0.06 if ncols > 1 else 0.15, right=0.98, top=0.94 if nrows == 1 else 0.97,
                             bottom=0.1 if nrows == 1 else 0.05, wspace=0.25, hspace=0.3)
    for i, name in enumerate(names):
        inner = outer[i // ncols, i % ncols].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
        ax = fig.add_subplot(inner[0])
        rax = fig.add_subplot(inner[1], sharex=ax)
        sep = {label: s[name] for label, s in (separation or {}).items() if name in s}
        _draw_observable(ax, rax, name, {k: v[name] for k, v in samples.items()}, sep, reference, bins, quantile,
                         (xlabels or {}).get(name))
        if i % ncols == 0:
            ax.set_ylabel("fraction of showers", fontsize=8)
            rax.set_ylabel(f"/ {reference}", fontsize=8)
    return _save(fig, path, dpi=80, bbox=None)


def observable_families(names: list[str]) -> dict[str, list[str]]:
    """Group observable names by kind: ``E_layer0, E_layer1`` → ``{"E": [...]}``; others stand alone."""
    families: dict[str, list[str]] = {}
    for name in names:
        kind, sep, _ = name.rpartition("_layer")
        families.setdefault(kind if sep else name, []).append(name)
    return families


def plot_observables(
    samples: dict[str, dict[str, np.ndarray]],
    out_dir: Path,
    separation: dict[str, dict[str, float]] | None = None,
    reference: str | None = None,
) -> list[Path]:
    """One :func:`plot_observable_grid` figure per kind of observable (all layers side by side),
    ``<out_dir>/<kind>.png`` (``E.png``, ``centroid_x.png``, ..., ``Etot_over_Einc.png``).

    Args:
        samples: label → {observable → values}; every sample has the reference's observables.
        out_dir: folder for the PNG files.
        separation: label → {observable → separation power}.
        reference: label of the reference sample (default: the first).
    """
    reference = reference or next(iter(samples))
    paths = []
    for kind, names in observable_families(list(samples[reference])).items():
        paths.append(plot_observable_grid(names, samples, Path(out_dir) / f"{kind}.png", separation, reference))
    return paths


def plot_nll_per_energy_bin(
    edges: np.ndarray, nll: dict[str, np.ndarray], path: Path, ylabel: str = "NLL per shower [nats]"
) -> Path:
    """Mean negative log-likelihood (or KL) per incident-energy bin, one line per model.

    Args:
        edges: incident-energy bin edges in MeV (``n_bins + 1``).
        nll: label → value per bin (NaN for empty bins).
        path: the PNG to write.
        ylabel: y-axis label.
    """
    plt = _pyplot()
    edges = np.asarray(edges, dtype=np.float64)
    centres = np.sqrt(edges[1:] * edges[:-1]) if np.all(edges > 0) else 0.5 * (edges[1:] + edges[:-1])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for c, (label, values) in zip(_COLOURS[1:] * 4, nll.items()):
        ax.plot(centres, np.asarray(values, dtype=np.float64), marker="o", color=c, label=label)
    if np.all(edges > 0) and edges[-1] / edges[0] > 20:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("incident energy [MeV]")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_training_curves(
    history: dict[str, list[float]] | list[dict[str, float]], path: Path, title: str = ""
) -> Path:
    """Per-epoch metrics, one line per key; keys sharing a suffix (``train_nll``/``val_nll``) share a panel.

    Args:
        history: metric name → per-epoch values, or one dict of metrics per epoch (as
            :mod:`flows.training` records it); the ``epoch`` key and non-numeric entries are skipped.
        path: the PNG to write.
        title: figure title.
    """
    plt = _pyplot()
    if isinstance(history, (list, tuple)):
        keys = list(dict.fromkeys(k for row in history for k in row))
        history = {k: [row.get(k, np.nan) for row in history] for k in keys}
    history = {k: v for k, v in history.items() if k != "epoch"}
    groups: dict[str, list[str]] = {}
    for key, values in history.items():
        if not isinstance(values, (list, tuple, np.ndarray)) or len(values) == 0:
            continue
        try:
            np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        stem = key.split("_", 1)[1] if key.split("_", 1)[0] in ("train", "val", "test", "valid") and "_" in key else key
        groups.setdefault(stem, []).append(key)
    n = max(1, len(groups))
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
    for ax, (stem, keys) in zip(axes[0], groups.items()):
        for c, key in zip(_COLOURS[1:] * 4, keys):
            values = np.asarray(history[key], dtype=np.float64)
            ax.plot(np.arange(1, len(values) + 1), values, color=c, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(stem, fontsize=9)
        ax.legend(fontsize=7, frameon=False)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
