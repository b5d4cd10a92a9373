"""The evaluation's ``report.md``: classifier AUCs beside the published numbers, the largest separation
powers, likelihoods per incident-energy bin and sampling times, as markdown text."""

from __future__ import annotations

import math
from typing import Any

from ..data.geometry import Geometry
from ..metrics.timing import DEFAULT_TIMING_BATCHES
from .leaderboard import published_results

__all__ = ["evaluation_report", "fmt", "fmt_spread"]

_LIKELIHOODS = (
    ("nll_teacher", "teacher NLL"),
    ("nll_teacher_subset", "teacher NLL (student's subset)"),
    ("nll_student_subset", "student exact NLL (subset)"),
    ("kl_student_teacher", "KL(student ‖ teacher), student samples"),
)

_SAME_SUBSET = (
    ("test_nll", "Flow I + Flow II"),
    ("test_nll_flow2", "Flow II alone"),
)


def fmt(v: float | None, digits: int = 3) -> str:
    """``v`` with ``digits`` decimals; an en dash for a missing or non-finite value."""
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def fmt_spread(metrics: dict[str, float], key: str, digits: int = 3) -> str:
    """``metrics[key]``, followed by ``± metrics[key_std]`` when a spread over seeds was measured."""
    std = metrics.get(f"{key}_std")
    return fmt(metrics.get(key), digits) + (f" ± {fmt(std, digits)}" if std is not None and key in metrics else "")


def evaluation_report(metrics: dict[str, float], details: dict[str, Any], geometry: Geometry, labels: list[str]) -> str:
    """The markdown summary of one evaluation.

    Args:
        metrics: the flat metrics of :func:`pipeline.stages.evaluate.evaluate_showers`.
        details: its ``details.json`` content (separation powers, energy-bin edges, per-bin values,
            timing device).
        geometry: the reference's geometry.
        labels: the generated samples, in order.

    Returns:
        The report text.
    """
    return "\n".join([
        *_header(metrics, geometry, labels),
        *_classifier_section(metrics, details, geometry, labels),
        *_separation_section(metrics, details, labels),
        *_likelihood_section(metrics, details),
        *_timing_section(metrics, details),
        *_layout_section(metrics),
        "",
        "Plots: `plots/` (average showers; `observables/`: histograms of every observable, one figure per "
        "kind; NLL and KL per energy bin; training curves).",
        "",
    ])


def _header(metrics: dict[str, float], geo: Geometry, labels: list[str]) -> list[str]:
    m = metrics.get
    return [
        "# Shower evaluation",
        "",
        f"Geometry **{geo.name}** ({geo.n_voxels} voxels, {geo.n_layers} layers); "
        f"{int(m('n_reference', 0))} reference showers; generated: "
        + ", ".join(f"{k} ({int(m(f'n_{k}', 0))})" for k in labels)
        + ".",
    ]


def _classifier_section(metrics: dict[str, float], details: dict[str, Any], geo: Geometry,
                        labels: list[str]) -> list[str]:
    m = metrics.get
    lines = ["", "## Classifier two-sample test (AUC; 0.5 = indistinguishable)", ""]
    if "n_classifier" in metrics:
        lines += [f"Each generated sample enters with {int(m('n_classifier', 0))} showers (the smallest sample's "
                  "size), so the AUCs compare.", ""]
    seeds = details.get("classifier", {}).get("seeds", [])
    if len(seeds) > 1:
        lines += [(f"Mean ± standard deviation over {len(seeds)} classifier seeds "
                   f"({', '.join(str(s) for s in seeds)})."), ""]
    lines += ["| sample | AUC low-level | AUC high-level | JSD low | JSD high |", "|---|---|---|---|---|"]
    for label in [*labels, "baseline"]:
        if f"auc_low_{label}" in metrics or f"auc_high_{label}" in metrics:
            name = "reference half vs half (baseline)" if label == "baseline" else label
            lines.append(f"| {name} | {fmt_spread(metrics, f'auc_low_{label}')} | "
                         f"{fmt_spread(metrics, f'auc_high_{label}')} | {fmt(m(f'jsd_low_{label}'))} | "
                         f"{fmt(m(f'jsd_high_{label}'))} |")
    diffs = [f"{level}-level {fmt_spread(metrics, f'auc_{level}_student_minus_teacher')}" for level in ("low", "high")
             if f"auc_{level}_student_minus_teacher" in metrics]
    if diffs:
        lines += ["", "Student AUC minus teacher AUC (same classifier seeds): " + ", ".join(diffs) + "."]
    caption, published = published_results(geo.name)
    if published:
        lines += ["", f"Published, {caption}:", "",
                  "| submission | AUC low | AUC high | ms/shower GPU @10k | ms/shower CPU @10k |", "|---|---|---|---|---|"]
        for sub, vals in published.items():
            lines.append(f"| {sub} | {fmt(vals.get('auc_low'))} | {fmt(vals.get('auc_high'))} | "
                         f"{fmt(vals.get('time_gpu_10000'), 3)} | {fmt(vals.get('time_cpu_10000'), 2)} |")
    return lines


def _separation_section(metrics: dict[str, float], details: dict[str, Any], labels: list[str]) -> list[str]:
    m = metrics.get
    lines = ["", "## Largest separation powers (0 = identical, 1 = disjoint histograms)", ""]
    seps = details.get("separation_power", {})
    base = seps.get("baseline", {})
    for label in labels:
        top = sorted(seps.get(label, {}).items(), key=lambda kv: -kv[1])[:5]
        lines.append(f"- **{label}** (max {fmt(m(f'sep_max_{label}'), 4)}, mean {fmt(m(f'sep_mean_{label}'), 4)}): "
                     + ", ".join(f"`{k}` {v:.4f}" + (f" (baseline {base[k]:.4f})" if k in base else "") for k, v in top))
    if base:
        lines.append(f"- baseline (reference half vs half): max {fmt(m('sep_max_baseline'), 4)}, "
                     f"mean {fmt(m('sep_mean_baseline'), 4)}")
    return lines


def _likelihood_section(metrics: dict[str, float], details: dict[str, Any]) -> list[str]:
    if not any(k.startswith(("nll_", "kl_")) for k in metrics):
        return []
    lines = ["", "## Likelihoods on the reference (nats per shower)", ""]
    edges = details.get("energy_bin_edges_mev", [])
    for key, text in _LIKELIHOODS:
        if key in metrics:
            per = details.get("per_energy_bin", {}).get(key, [])
            per_text = ", ".join(f"{edges[k]:.0f}–{edges[k + 1]:.0f} MeV: {fmt(v, 2)}" for k, v in enumerate(per)
                                 if v is not None and k + 1 < len(edges))
            lines.append(f"- {text}: **{fmt(metrics[key], 2)}**" + (f" (per energy bin: {per_text})" if per_text else ""))
    if "test_nll_rel_diff" in metrics:
        n = int(metrics.get("test_nll_showers", 0))
        lines += ["", f"Exact NLL of both models on the same {n} reference showers (same preprocessing noise):", "",
                  "| NLL | teacher | student | (student − teacher) / abs(teacher) |", "|---|---|---|---|"]
        for key, text in _SAME_SUBSET:
            if f"{key}_rel_diff" in metrics:
                lines.append(f"| {text} | {fmt(metrics.get(f'{key}_teacher'), 2)} | {fmt(metrics.get(f'{key}_student'), 2)} | "
                             f"{100 * metrics[f'{key}_rel_diff']:+.2f} % |")
    return lines


def _timing_section(metrics: dict[str, float], details: dict[str, Any]) -> list[str]:
    timing = {k: v for k, v in metrics.items() if k.startswith("time_ms_per_shower_")}
    if not timing:
        return []
    lines = ["", f"## Sampling time per shower (ms, {details.get('timing_device', '?')})", "",
             "| model | " + " | ".join(f"batch {b}" for b in DEFAULT_TIMING_BATCHES) + " |",
             "|---|" + "---|" * len(DEFAULT_TIMING_BATCHES)]
    for name in ("teacher", "student"):
        if any(k.startswith(f"time_ms_per_shower_{name}_") for k in timing):
            lines.append(f"| {name} | " + " | ".join(fmt(timing.get(f"time_ms_per_shower_{name}_b{b}"), 3)
                                                     for b in DEFAULT_TIMING_BATCHES) + " |")
    return lines


def _layout_section(metrics: dict[str, float]) -> list[str]:
    layout = [k.removeprefix("calochallenge_layout_ok_") for k in metrics if k.startswith("calochallenge_layout_ok_")]
    if not layout:
        return []
    return ["", "CaloChallenge HDF5 layout (binning XML) checked and valid for: " + ", ".join(layout) + "."]
