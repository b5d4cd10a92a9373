"""Likelihood metrics of shower generators: per-shower NLL, KL(student ‖ teacher), per incident-energy bin.

Pure functions: generators (:class:`flows.sampling.ShowerGenerator`) and showers in, numbers out.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from ...flows.device import resolve_device
from ..data.showers import Showers
from ..errors import CalodistillError

__all__ = [
    "energy_bin_edges",
    "per_bin_means",
    "seeded_subset",
    "as_numpy",
    "shower_log_likelihood",
    "shower_log_likelihoods",
    "model_likelihoods",
    "kl_per_shower",
]

logger = logging.getLogger(__name__)


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


def per_bin_means(values: np.ndarray, energies: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mean of ``values`` in each incident-energy bin (NaN for an empty bin); out-of-range energies go to
    the first or last bin."""
    idx = np.clip(np.searchsorted(edges, energies, side="right") - 1, 0, len(edges) - 2)
    return np.array([values[idx == k].mean() if np.any(idx == k) else np.nan for k in range(len(edges) - 1)])


def seeded_subset(showers: Showers, max_showers: int | None, seed: int) -> Showers:
    """At most ``max_showers`` showers, a seeded random subset in the original order (all when fewer)."""
    if max_showers is None or len(showers) <= max_showers:
        return showers
    idx = np.sort(np.random.default_rng(seed).choice(len(showers), int(max_showers), replace=False))
    return showers.subset(idx)


def as_numpy(x: Any) -> np.ndarray:
    """A numpy array from a torch tensor (detached, on the CPU) or anything ``np.asarray`` takes."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def shower_log_likelihoods(
    generator: Any, showers: Showers, batch_size: int = 1024, device: str | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per-shower log-likelihoods under a shower generator, nats: ``{"flow1", "flow2", "total"}``.

    Uses :meth:`flows.sampling.ShowerGenerator.log_prob`: the density in the flows' preprocessed (logit)
    space. That space is the same for a teacher and its student (they share the preprocessing and Flow I),
    so their values are directly comparable; the preprocessing noise is drawn from ``seed``, so both see
    the same noisy inputs. A student's Flow II density is exact (solved voxel by voxel,
    :func:`flows.student_density.exact_log_prob`).

    Args:
        generator: a :class:`flows.sampling.ShowerGenerator`.
        showers: the showers to score.
        batch_size: showers per pass.
        device: torch device (moves the generator there).
        seed: seeds the preprocessing noise.

    Returns:
        ``(N,)`` float64 log-likelihoods per part (``"total"`` only for a generator that returns one array).
    """
    if device is not None and hasattr(generator, "to"):
        generator.to(device)
    lp = generator.log_prob(showers.incident_energy, showers.voxels, batch_size=batch_size, seed=seed)
    parts = lp if isinstance(lp, dict) else {"total": lp}
    return {k: as_numpy(v).astype(np.float64).reshape(-1) for k, v in parts.items()}


def shower_log_likelihood(
    generator: Any, showers: Showers, batch_size: int = 1024, device: str | None = None, seed: int = 0
) -> np.ndarray:
    """Per-shower log-likelihood (Flow I + Flow II) under a shower generator, nats: the ``"total"`` of
    :func:`shower_log_likelihoods` (same arguments)."""
    return shower_log_likelihoods(generator, showers, batch_size, device, seed)["total"]


def _rel_diff(student: float, teacher: float) -> float:
    """(student − teacher) / |teacher|: the student's NLL excess relative to the teacher's."""
    return (student - teacher) / abs(teacher) if teacher else float("nan")


def model_likelihoods(
    reference: Showers,
    teacher: Any | None,
    student: Any | None,
    edges: np.ndarray,
    max_showers: int = 5000,
    student_max_showers: int = 1000,
    kl_samples: int = 2000,
    device: str | None = None,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Teacher NLL, both models' exact NLL on one subset and KL(student ‖ teacher), overall and per energy bin.

    Args:
        reference: held-out showers (the test split).
        teacher: the teacher generator, or None.
        student: the student generator, or None.
        edges: incident-energy bin edges (:func:`energy_bin_edges`).
        max_showers: teacher NLL on at most this many reference showers.
        student_max_showers: the student's exact density on at most this many; the teacher is scored on
            the same subset, with the same preprocessing noise, for a like-for-like comparison.
        kl_samples: student samples for the KL estimate (conditions drawn from the reference).
        device: torch device.
        seed: seeds the subsets and the student's samples.

    Returns:
        ``(metrics, per_bin)``: flat metrics (``nll_teacher``, ``nll_teacher_subset``,
        ``nll_student_subset``, ``kl_student_teacher``, each also as ``<name>_ebin<k>``) and
        ``{name: value per bin}`` for the plots. With both models, the subset's comparison is also logged
        as ``test_nll_teacher``, ``test_nll_student`` (Flow I + Flow II, nats per shower),
        ``test_nll_rel_diff`` = (student − teacher) / |teacher|, ``test_nll_flow2_teacher``,
        ``test_nll_flow2_student`` and ``test_nll_flow2_rel_diff`` (Flow II alone: Flow I is shared, so
        this is where the two differ), and ``test_nll_showers`` (the subset's size).
    """
    rng = np.random.default_rng(seed)
    metrics: dict[str, float] = {}
    per_bin: dict[str, list[float]] = {}

    def pick(n: int) -> Showers:
        return seeded_subset(reference, n, int(rng.integers(2**31)))

    def record(name: str, values: np.ndarray, energies: np.ndarray) -> None:
        metrics[name] = float(np.mean(values))
        bins = per_bin_means(values, energies, edges)
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
        s_lp = shower_log_likelihoods(student, part, batch_size=1000, device=device, seed=seed)
        metrics["student_nll_seconds"] = time.perf_counter() - t0
        record("nll_student_subset", -s_lp["total"], part.incident_energy)
        logger.info("student exact NLL on %d showers in %.1f s", len(part), metrics["student_nll_seconds"])
        if teacher is not None:
            t_lp = shower_log_likelihoods(teacher, part, device=device, seed=seed)
            record("nll_teacher_subset", -t_lp["total"], part.incident_energy)
            metrics["test_nll_showers"] = float(len(part))
            for suffix, key in (("", "total"), ("_flow2", "flow2")):
                if key in s_lp and key in t_lp:
                    s_nll, t_nll = -float(np.mean(s_lp[key])), -float(np.mean(t_lp[key]))
                    metrics[f"test_nll{suffix}_teacher"] = t_nll
                    metrics[f"test_nll{suffix}_student"] = s_nll
                    metrics[f"test_nll{suffix}_rel_diff"] = _rel_diff(s_nll, t_nll)
            logger.info("test NLL on the same %d showers: student %.3f, teacher %.3f (rel. diff %.3g)", len(part),
                        metrics["test_nll_student"], metrics["test_nll_teacher"], metrics["test_nll_rel_diff"])
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
        batch_size: showers per pass.

    Returns:
        ``(N,)`` float64 KL terms, nats.
    """
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
            ctx = torch.as_tensor(as_numpy(cond), device=device)
            x, log_q = s_flow.sample_and_log_prob(ctx.to(s_dtype), generator=gen)
            log_p = t_flow.log_prob(x.to(t_dtype), context=ctx.to(t_dtype))
            out.append((log_q.double() - log_p.double()).cpu().numpy().reshape(-1))
    return np.concatenate(out)
