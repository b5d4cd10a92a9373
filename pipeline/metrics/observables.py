"""High-level shower observables and the separation power between two samples of them.

Every observable is one number per shower, computed on any :class:`~pipeline.geometry.Geometry` from the
flat voxel vector (MeV) and the incident energy (MeV); which ones a layer gets follows its kind:

- ``E_layer{i}``: energy deposited in layer ``i`` (MeV), ``i`` being :attr:`Layer.index`;
- ``Etot_over_Einc``: total deposited energy over the incident energy;
- ``centroid_x_layer{i}``, ``centroid_y_layer{i}``: energy-weighted centre of the layer (mm), cell positions
  from :meth:`Layer.cell_xy` (for polar layers these are the CaloChallenge's η/φ-direction centroids);
- ``width_x_layer{i}``, ``width_y_layer{i}``: energy-weighted standard deviation around that centre (mm);
- ``sparsity_layer{i}``: fraction of the layer's cells with an energy above the threshold;
- polar layers only: ``radius_layer{i}`` and ``width_r_layer{i}``, the energy-weighted mean and standard
  deviation of the distance from the shower axis (mm, cell radii: the annulus' area-weighted mean radius).

An empty layer has centroid 0 and width 0 (never NaN), as in the CaloChallenge evaluation code.

The separation power of two histograms ``h1``, ``h2`` normalised to unit sum over a shared binning is

    S = ½ Σ_i (h1_i − h2_i)² / (h1_i + h2_i),

0 for identical and 1 for disjoint distributions.

References:
    M. Paganini, L. de Oliveira, B. Nachman, "CaloGAN", arXiv:1705.02355 (observables).
    C. Krause, D. Shih, "CaloFlow", arXiv:2106.05285 (centroids and widths per layer).
    G. Kasieczka et al., "The LHC Olympics 2020"/ARM, arXiv:2009.03796, eq. 15 (separation power).
    Fast Calorimeter Simulation Challenge 2022, evaluation code (CaloChallenge/homepage, code/HighLevelFeatures.py).
"""

from __future__ import annotations

import logging

import numpy as np

from ..data.geometry import Geometry, Layer
from ..data.showers import Showers
from ..errors import CalodistillError

__all__ = [
    "DEFAULT_THRESHOLD_MEV",
    "compute_observables",
    "observable_names",
    "observable_label",
    "shared_bin_edges",
    "normalised_histograms",
    "separation_power",
    "separation_powers",
]

logger = logging.getLogger(__name__)

#: Cells with an energy strictly above this count as hit for the sparsity (MeV). The CaloChallenge
#: evaluation suggests 15 keV as the read-out cut of its datasets.
DEFAULT_THRESHOLD_MEV: float = 0.015


def observable_names(geometry: Geometry) -> list[str]:
    """Names of the observables :func:`compute_observables` returns for ``geometry``, in order."""
    names = [f"E_layer{layer.index}" for layer in geometry.layers]
    names.append("Etot_over_Einc")
    for kind in ("centroid_x", "centroid_y", "width_x", "width_y", "sparsity"):
        names.extend(f"{kind}_layer{layer.index}" for layer in geometry.layers)
    for kind in ("radius", "width_r"):
        names.extend(f"{kind}_layer{layer.index}" for layer in geometry.layers if layer.kind == "polar")
    return names


def observable_label(name: str) -> str:
    """A human-readable axis label with unit for an observable name."""
    if name == "Etot_over_Einc":
        return r"$E_\mathrm{tot} / E_\mathrm{inc}$"
    kind, _, layer = name.rpartition("_layer")
    units = {"E": "energy [MeV]", "centroid_x": "centroid x [mm]", "centroid_y": "centroid y [mm]",
             "width_x": "width x [mm]", "width_y": "width y [mm]", "sparsity": "fraction of cells hit",
             "radius": "mean radius [mm]", "width_r": "radial width [mm]"}
    return f"layer {layer}: {units.get(kind, kind)}" if layer else name


def compute_observables(
    showers: Showers,
    threshold: float = DEFAULT_THRESHOLD_MEV,
    chunk_size: int = 20000,
) -> dict[str, np.ndarray]:
    """Compute every high-level observable of every shower.

    Args:
        showers: the showers (voxels in MeV on their geometry).
        threshold: energy (MeV) a cell must exceed to count as hit in the sparsity.
        chunk_size: showers processed at once (bounds memory on large inputs).

    Returns:
        ``{name: array (N,) float64}`` in the order of :func:`observable_names`.
    """
    geometry = showers.geometry
    n = len(showers)
    out = {name: np.zeros(n, dtype=np.float64) for name in observable_names(geometry)}
    cells = [layer.cell_xy() for layer in geometry.layers]
    radii = [_cell_radii(layer) if layer.kind == "polar" else None for layer in geometry.layers]
    for start in range(0, n, max(1, chunk_size)):
        stop = min(n, start + max(1, chunk_size))
        vox = showers.voxels[start:stop].astype(np.float64)
        e_inc = showers.incident_energy[start:stop]
        total = np.zeros(stop - start)
        for layer, sl, (x, y), rad in zip(geometry.layers, geometry.layer_slices, cells, radii):
            v = vox[:, sl]
            e = v.sum(axis=1)
            total += e
            i = layer.index
            out[f"E_layer{i}"][start:stop] = e
            # Negative energies (noise in some generators) would make widths imaginary: weight with E ≥ 0.
            w = np.clip(v, 0.0, None)
            wsum = w.sum(axis=1)
            safe = np.where(wsum > 0, wsum, 1.0)
            axes = [("centroid_x", "width_x", x), ("centroid_y", "width_y", y)]
            if rad is not None:
                axes.append(("radius", "width_r", rad))
            for centre, width, pos in axes:
                mean = (w @ pos) / safe
                second = (w @ (pos**2)) / safe
                var = np.clip(second - mean**2, 0.0, None)
                empty = wsum <= 0
                mean[empty] = 0.0
                var[empty] = 0.0
                out[f"{centre}_layer{i}"][start:stop] = mean
                out[f"{width}_layer{i}"][start:stop] = np.sqrt(var)
            out[f"sparsity_layer{i}"][start:stop] = (v > threshold).mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(e_inc > 0, total / np.where(e_inc > 0, e_inc, 1.0), 0.0)
        out["Etot_over_Einc"][start:stop] = ratio
    return out


def _cell_radii(layer: Layer) -> np.ndarray:
    """Area-weighted mean radius (mm) of every cell of a polar layer, in voxel order."""
    r = np.asarray(layer.edges1, dtype=np.float64)
    r0, r1 = r[:-1], r[1:]
    rbar = (2.0 / 3.0) * (r1**3 - r0**3) / (r1**2 - r0**2)
    return np.tile(rbar, layer.shape[0])


def shared_bin_edges(samples: list[np.ndarray], bins: int = 50, quantile: float = 0.0) -> np.ndarray:
    """Common bin edges for several samples of one observable.

    Args:
        samples: 1-d arrays (non-finite entries are ignored).
        bins: number of bins.
        quantile: range from this quantile to ``1 - quantile`` of the pooled samples (entries outside are
            counted in the first/last bin by :func:`normalised_histograms`); 0 spans the full range.

    Returns:
        ``bins + 1`` increasing edges; a degenerate range is widened by ±0.5 around its value.
    """
    pooled = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in samples])
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        return np.linspace(-0.5, 0.5, bins + 1)
    lo, hi = np.quantile(pooled, [quantile, 1.0 - quantile]) if quantile > 0 else (pooled.min(), pooled.max())
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def normalised_histograms(samples: list[np.ndarray], edges: np.ndarray) -> list[np.ndarray]:
    """Histograms on ``edges`` normalised to unit sum; under/overflow go to the first/last bin."""
    out = []
    for s in samples:
        s = np.asarray(s, dtype=np.float64).ravel()
        s = np.clip(s[np.isfinite(s)], edges[0], edges[-1])
        h, _ = np.histogram(s, bins=edges)
        total = h.sum()
        out.append(h / total if total > 0 else h.astype(np.float64))
    return out


def separation_power(
    a: np.ndarray, b: np.ndarray, bins: int | np.ndarray = 50, quantile: float = 0.001
) -> float:
    """Separation power ½·Σ (h1 − h2)² / (h1 + h2) of two samples on a shared binning (arXiv:2009.03796 eq. 15).

    Args:
        a: first sample (1-d).
        b: second sample (1-d).
        bins: number of bins (edges from :func:`shared_bin_edges`) or explicit edges.
        quantile: see :func:`shared_bin_edges`; the default 0.001 keeps a few outliers from squeezing the
            bulk of both samples into one bin.

    Returns:
        A number in [0, 1]: 0 for identical histograms, 1 for disjoint ones.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise CalodistillError("separation power: both samples must be non-empty")
    edges = np.asarray(bins, dtype=np.float64) if np.ndim(bins) else shared_bin_edges([a, b], int(bins), quantile)
    h1, h2 = normalised_histograms([a, b], edges)
    denom = h1 + h2
    mask = denom > 0
    # in [0, 1] mathematically; disjoint histograms sum to 1 + a few ulp in floating point
    return float(np.clip(0.5 * np.sum((h1[mask] - h2[mask]) ** 2 / denom[mask]), 0.0, 1.0))


def separation_powers(
    reference: dict[str, np.ndarray],
    generated: dict[str, np.ndarray],
    bins: int = 50,
    quantile: float = 0.001,
) -> dict[str, float]:
    """Separation power of every observable present in both dicts (same keys as ``reference``)."""
    missing = [k for k in reference if k not in generated]
    if missing:
        raise CalodistillError(f"separation power: generated observables lack {missing[:3]}")
    return {k: separation_power(reference[k], generated[k], bins, quantile) for k in reference}
