"""``calodistill bench``: teacher vs student sampling speed, the matmul floor, ingest and training.

Everything is measured in one process, on one device, for one geometry (CaloChallenge protocol: time
per shower at batch 1, 100 and 10 000; warm-up calls, several repeats, the median):

- **Sampling.** Flow II only (the part the student replaces): the MAF teacher voxel by voxel through
  :class:`flows.teacher_sampling.FastMAFSampler` (the fastest honest teacher: the student's speed-up is
  against it), and for reference through nflows' loop of D full passes per block (``MAF.inverse``); the
  IAF student in one pass, both through ``IAF.inverse`` (the model as trained) and through
  :class:`flows.fast.FastIAFSampler` (precomputed dense weights, lean spline). Every measurement has a time budget
  (:class:`~calodistill.pipeline.metrics.throughput.BudgetedTimer`): when a call at the requested batch
  would not fit (judged from the previous, smaller measurement), the largest batch of the 1-2-5 series
  that fits is timed instead and the table says so. Nothing is extrapolated: every number in the table
  was measured at the batch printed next to it, and speed-ups compare the two models at the same batch.
- **Floor.** The student's dense matrix products alone (the same shapes, precomputed weights, a
  ``torch.mm`` chain into preallocated outputs:
  :func:`~calodistill.pipeline.metrics.throughput.matmul_floor_call`) at the same batch, unchunked and
  chunked as the sampler chunks; the faster one is the floor. FLOPs per shower count the dense shapes
  (masked zeros included), as the hardware executes them.
- **ONNX Runtime** (section ``onnx``). The student exported alone and timed beside
  :class:`flows.fast.FastIAFSampler` in float32, fp16 and int8 weights (:mod:`.bench_onnx`).
- **Ingest.** :func:`calodistill.pipeline.data.ingest_bench.bench_ingest`: the Dask ingest of an HDF5 file
  against one plain ``pyarrow.parquet.write_table`` of the same arrays in one process.
- **Training.** Optimiser steps of the teacher (maximum likelihood, :func:`flows.losses.nll_loss`) and
  of the student (CaloFlow II distillation, :func:`flows.distillation.distillation_step_loss` with
  :class:`flows.config.DistillConfig`'s defaults): showers and steps per second, peak memory
  (:class:`~calodistill.pipeline.metrics.memory.PeakMemory`) and the ratio to the step's dense-matmul
  floor: the matrix products the step executes, forward and backward, recorded
  (:func:`~calodistill.pipeline.metrics.throughput.capture_matmuls`) and timed alone, interleaved with
  the steps.

The tables are rendered by :mod:`calodistill.pipeline.report.bench_table`.

Models are random-initialised at CaloFlow sizes for the geometry (timing does not depend on training)
or loaded from trained model directories. Sizes for CaloChallenge dataset 1 follow the CaloFlow code
(Krause, Pang & Shih, arXiv:2210.14245, github.com/Ian-Pang/caloflow-for-calochallenge): photons
teacher hidden 378, student hidden 736; pions teacher 533, student 500; one hidden layer per MADE,
8 blocks, 8 bins, tail bound 14. Other geometries: teacher hidden = D, student hidden = 2·D.

Long because: one runner for four sections (sampling, floor, ingest, training) that share the models, the
device, the budget and the result layout.

References:
    Krause & Shih, CaloFlow II, arXiv:2110.11377 (timing protocol, table of ms per shower).
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...flows.device import resolve_device
from ...flows.models import IAF, MAF
from ..data.bundle import FLOW2_FILES, ModelBundle
from ..errors import CalodistillError
from ..metrics.memory import PeakMemory
from ..metrics.throughput import (
    BudgetedTimer,
    Timing,
    capture_matmuls,
    matmul_floor_call,
    matmul_replay_call,
)
from ..metrics.timing import time_calls
from ..report.bench_table import render_markdown

logger = logging.getLogger(__name__)

__all__ = ["CALOFLOW_SIZES", "PRESETS", "SECTIONS", "flat_metrics", "load_models_from_dirs", "run_bench"]

DEFAULT_GEOMETRY = "calochallenge-1-photons"
DEFAULT_BATCHES = (1, 100, 10_000)
QUICK_BATCHES = (1, 10, 100)

#: (teacher hidden, student hidden) per geometry, from the CaloFlow dataset-1 code (see module docstring).
CALOFLOW_SIZES: dict[str, tuple[int, int]] = {
    "calochallenge-1-photons": (378, 736),
    "calochallenge-1-pions": (533, 500),
}

SECTIONS = ("sampling", "floor", "ingest", "training", "onnx")

#: Sizes that replace the defaults under ``preset``: "quickstart" is dags/quickstart.yaml's teacher and
#: student (CaloGAN, 4 spline blocks of hidden 64) with its training batches (teacher 256, distillation 32).
PRESETS: dict[str, dict[str, Any]] = {
    "quickstart": {"geometry": "calogan", "teacher_hidden": 64, "student_hidden": 64, "n_blocks": 4,
                   "teacher_train_batch": 256, "student_train_batch": 32},
}


# ---------------------------------------------------------------------------------------- models
def _default_sizes(geometry: str | None, features: int) -> tuple[int, int]:
    if geometry in CALOFLOW_SIZES:
        return CALOFLOW_SIZES[geometry]
    return features, 2 * features


def build_models(features: int, context_features: int, teacher_hidden: int, student_hidden: int,
                 n_blocks: int = 8, n_hidden_layers: int = 1, seed: int = 0) -> tuple[Any, Any]:
    """Random-initialised CaloFlow-style teacher MAF and student IAF (spline, 8 bins, tail bound 14)."""
    from ...flows.config import FlowConfig
    from ...flows.models import build_iaf_like, build_maf

    torch.manual_seed(seed)
    cfg = FlowConfig(features=features, context_features=context_features, n_blocks=n_blocks,
                     hidden_features=teacher_hidden, n_hidden_layers=n_hidden_layers, kind="spline",
                     num_bins=8, tail_bound=14.0, permutation="reverse")
    teacher = build_maf(cfg)
    student = build_iaf_like(teacher, hidden_features=student_hidden)
    return teacher, student


def load_models_from_dirs(model_dirs: Sequence[Path]) -> tuple[MAF | None, IAF | None, list[str]]:
    """The first teacher and student Flow II found in the model directories (and their files' paths).

    A directory may hold only ``teacher.pt`` and/or ``student.pt`` (Flow II is all the benchmark times).
    """
    teacher: MAF | None = None
    student: IAF | None = None
    sources: list[str] = []
    for d in model_dirs:
        d = Path(d)
        if not d.is_dir():
            raise CalodistillError(f"{d}: no such model directory")
        if not any((d / name).is_file() for name in FLOW2_FILES.values()):
            continue
        bundle = ModelBundle.open(d, flow2_only=True, label="--model-dir")
        for kind in ("teacher", "student"):
            if kind not in bundle.kinds or (teacher if kind == "teacher" else student) is not None:
                continue
            flow = bundle.flow2_of(kind)  # a MAF for the teacher, an IAF for the student (checked)
            if isinstance(flow, IAF):
                student = flow
            else:
                teacher = flow
            sources.append(str(bundle.path / FLOW2_FILES[kind]))
    if teacher is None and student is None:
        raise CalodistillError(f"{', '.join(str(d) for d in model_dirs)}: no teacher.pt or student.pt found")
    return teacher, student, sources


def _config_summary(flow: Any) -> dict[str, Any]:
    from ...flows.models import count_parameters

    return {**flow.config.to_dict(), "model": type(flow).__name__, "parameters": count_parameters(flow)}


# ---------------------------------------------------------------------------------------- sections
def _sampling_section(teacher: Any, student: Any, device: torch.device, batches: Sequence[int],
                      budget_s: float, repeats: int, warmup: int, chunk_size: int | None,
                      with_floor: bool, seed: int) -> dict[str, Any]:
    from ...flows.fast import FastIAFSampler
    from ...flows.teacher_sampling import FastMAFSampler

    teacher = teacher.to(device).eval()
    student = student.to(device).eval()
    teacher_fast = FastMAFSampler(teacher)
    sampler = FastIAFSampler(student, chunk_size=chunk_size)
    dense = FastIAFSampler(student, chunk_size=chunk_size, groups=1)  # the dense shapes, for the floor
    d = student.config.features
    c = student.config.context_features
    dtype = next(student.parameters()).dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)
    zmax = max(batches)
    z_all = torch.randn(zmax, d, generator=gen, dtype=dtype).to(device)
    c_all = torch.randn(zmax, c, generator=gen, dtype=dtype).to(device) if c else None

    def ctx(b: int) -> Tensor | None:
        return None if c_all is None else c_all[:b]

    def teacher_call(b: int) -> Callable[[], Any]:
        return lambda: teacher_fast.sample(z_all[:b], ctx(b))

    def teacher_dpass_call(b: int) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return teacher.inverse(z_all[:b], ctx(b))
        return call

    def student_call(b: int) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return student.inverse(z_all[:b], ctx(b))
        return call

    def fast_call(b: int) -> Callable[[], Any]:
        return lambda: sampler.sample(z_all[:b], ctx(b))

    timers = {
        "teacher": BudgetedTimer("teacher (MAF, incremental)", teacher_call, device, budget_s, repeats, min(warmup, 1)),
        "teacher_dpass": BudgetedTimer("teacher (MAF, nflows D passes)", teacher_dpass_call, device, budget_s,
                                       repeats, min(warmup, 1)),
        "student_iaf": BudgetedTimer("student (IAF.inverse)", student_call, device, budget_s, repeats, warmup),
        "student_fast": BudgetedTimer("student (FastIAFSampler)", fast_call, device, budget_s, repeats, warmup),
    }
    flops = dense.flops_per_sample()
    flops_exec = sampler.flops_per_sample()
    rows: list[dict[str, Any]] = []
    for b in sorted(set(batches)):
        row: dict[str, Any] = {"batch": b}
        for key, timer in timers.items():
            t, note = timer.measure(b)
            row[key] = {**t.to_dict(), "note": note}
        # like-for-like: the student also at the teacher's batch when the teacher ran smaller
        tb = row["teacher"]["batch"]
        same = row["student_fast"] if row["student_fast"]["batch"] == tb else None
        if same is None:
            t, note = timers["student_fast"].measure(tb)
            same = {**t.to_dict(), "note": note}
        row["student_fast_at_teacher_batch"] = same
        # the incremental teacher against nflows' D passes, at the batch the D passes were timed
        db = row["teacher_dpass"]["batch"]
        fast_teacher = row["teacher"] if tb == db else {**timers["teacher"].measure(db)[0].to_dict(), "note": ""}
        row["teacher_speedup_vs_dpass"] = (row["teacher_dpass"]["ms_per_shower"] / fast_teacher["ms_per_shower"]
                                           if fast_teacher["batch"] == db else None)
        row["speedup_fast"] = row["teacher"]["ms_per_shower"] / same["ms_per_shower"] if same["batch"] == tb else None
        same_iaf = row["student_iaf"] if row["student_iaf"]["batch"] == tb else None
        row["speedup_iaf"] = (row["teacher"]["ms_per_shower"] / same_iaf["ms_per_shower"]
                              if same_iaf is not None else None)
        fb = row["student_fast"]["batch"]
        row["student_gflops"] = flops_exec * fb / row["student_fast"]["median_s"] / 1e9
        if with_floor:
            fast = row["student_fast"]  # same repeats and warm-up as the sampler (within its budget)
            best: dict[str, Any] | None = None
            for chunk in dict.fromkeys([None, chunk_size if chunk_size and chunk_size < fb else None]):
                t = Timing(fb, time_calls(matmul_floor_call(dense, fb, chunk, device), device,
                                          fast["repeats"], fast["warmup"]), fast["warmup"])
                cand = {**t.to_dict(), "chunk": chunk, "gflops": flops * fb / t.median_s / 1e9}
                if best is None or cand["median_s"] < best["median_s"]:
                    best = cand
            assert best is not None
            row["floor"] = best
            row["student_over_floor"] = row["student_fast"]["median_s"] / best["median_s"]
            chunk = chunk_size if chunk_size and chunk_size < fb else None
            t = Timing(fb, time_calls(matmul_floor_call(sampler, fb, chunk, device), device,
                                      fast["repeats"], fast["warmup"]), fast["warmup"])
            row["own_matmuls"] = {**t.to_dict(), "chunk": chunk, "gflops": flops_exec * fb / t.median_s / 1e9}
            row["student_over_own_matmuls"] = row["student_fast"]["median_s"] / t.median_s
        rows.append(row)
        logger.info("bench batch %d: teacher %.4g ms (batch %d), student fast %.4g ms", b,
                    row["teacher"]["ms_per_shower"], tb, row["student_fast"]["ms_per_shower"])
    return {
        "flops_per_shower": flops,
        "flops_per_shower_executed": flops_exec,
        "output_groups": sampler.groups if sampler.structured else 1,
        "matmul_shapes_per_shower": [list(s[1:]) for s in dense.matmul_shapes(1)],
        "chunk_size": chunk_size,
        "spline": _spline_description(sampler),
        "teacher_sampler": ("flows.teacher_sampling.FastMAFSampler (voxel by voxel, first layer updated incrementally, "
                            + ("compiled spline)" if teacher_fast.native else "torch spline)")),
        "rows": rows,
    }


def _spline_description(sampler: Any) -> str:
    """Which spline inverse the fast sampler runs: the compiled one (and whether vectorised) or torch's."""
    from ...flows import native

    if sampler.kind != "spline":
        return "affine (torch)"
    if sampler.native:
        vec = native.vectorised() and sampler.dtype == torch.float32
        return f"compiled (flows.native, {'AVX2' if vec else 'scalar'} {str(sampler.dtype).replace('torch.', '')})"
    reason = native.unavailable_reason() if sampler.device.type == "cpu" else "not on CPU"
    return f"torch ops (flows.fast.rqs_inverse; compiled spline not used: {reason or 'not supported'})"


def _training_section(teacher: Any, student: Any, device: torch.device, steps: int,
                      teacher_batch: int, student_batch: int, seed: int) -> dict[str, Any]:
    from ...flows.config import DistillConfig, TrainConfig
    from ...flows.losses import nll_loss
    from ...flows.optim import make_adam

    out: dict[str, Any] = {}
    d = teacher.config.features
    c = teacher.config.context_features
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def data(b: int) -> tuple[Tensor, Tensor | None]:
        x = torch.randn(b, d, generator=gen).to(device)
        ctx = torch.randn(b, c, generator=gen).to(device) if c else None
        return x, ctx

    def run(name: str, model: Any, loss_fn: Callable[[Tensor, Tensor | None], Tensor], batch: int) -> None:
        model.train()
        opt = make_adam(model, TrainConfig(lr=1e-4))  # the optimiser training uses (fused where it can)
        x, ctx = data(batch)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(x, ctx)
            loss.backward()
            opt.step()

        step()  # warm-up (allocates the optimiser state)
        calls = capture_matmuls(step)  # the products one step executes, forward and backward
        floor = matmul_replay_call(calls, device, next(model.parameters()).dtype)
        floor()
        with PeakMemory(device) as mem:
            seconds, floor_seconds = [], []
            for _ in range(steps):  # step and floor interleaved: the same machine conditions
                seconds += time_calls(step, device, 1, 0)
                floor_seconds += time_calls(floor, device, 1, 0)
        med, fmed = statistics.median(seconds), statistics.median(floor_seconds)
        gflop = sum(c.flops for c in calls) / 1e9
        out[name] = {"batch": batch, "steps": steps, "median_step_s": med, "showers_per_s": batch / med,
                     "steps_per_s": 1.0 / med, "matmuls_per_step": len(calls), "matmul_gflop_per_step": gflop,
                     "matmul_floor_s": fmed, "step_over_floor": med / fmed, "floor_gflops": gflop / fmed,
                     "peak_memory_mb": mem.peak_mb, "memory_method": mem.method}
        logger.info("bench training %s: %.4g showers/s, %.3g x its matmul floor, peak %.4g MB", name, batch / med,
                    med / fmed, mem.peak_mb)

    for flow in (teacher, student):  # drop inference-mode weight caches before copying
        flow.set_weight_cache(True)
    t = copy.deepcopy(teacher).to(device)
    run("teacher", t, lambda x, ctx: nll_loss(t, x, ctx), teacher_batch)
    try:
        from ...flows.distillation import distillation_step_loss
    except ImportError as exc:  # the training helper's module
        out["student"] = {"error": f"flows.distillation unavailable: {exc}"}
        return out
    frozen = copy.deepcopy(teacher).to(device).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    s = copy.deepcopy(student).to(device)
    dc = DistillConfig()  # the defaults, which the quickstart uses

    def distill_loss(x: Tensor, ctx: Tensor | None) -> Tensor:
        return distillation_step_loss(frozen, s, x, ctx, dc.beta, dc.fully_guided, dc.reduction, dc.params_weight,
                                      dc.x_pass, dc.noise_weight, dc.kl_weight)[0]

    run("student", s, distill_loss, student_batch)
    out["student"]["loss"] = (f"CaloFlow II distillation ({dc.x_pass} x-pass + z-pass, "
                              f"{'fully guided' if dc.fully_guided else 'end points'}, noise weight {dc.noise_weight:g}), "
                              "teacher frozen")
    out["teacher"]["loss"] = "maximum likelihood (nll_loss)"
    return out


def _ingest_section(geometry: str, n: int, scheduler: str | None) -> dict[str, Any]:
    from ..data.ingest_bench import bench_ingest

    return {"source": "calodistill.pipeline.data.ingest_bench.bench_ingest",
            **bench_ingest(n=n, geometry=geometry, scheduler=scheduler)}


# ---------------------------------------------------------------------------------------- device
def device_info(device: torch.device) -> dict[str, Any]:
    """CPU model (from /proc/cpuinfo), cores, threads, load, torch version, and the GPU's name."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "device": str(device), "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return info


# ---------------------------------------------------------------------------------------- main
def run_bench(geometry: str | None = DEFAULT_GEOMETRY, device: str | None = None,
              batches: Sequence[int] | None = None, budget_s: float = 60.0, repeats: int = 5,
              warmup: int = 2, model_dirs: Sequence[str | os.PathLike[str]] | None = None,
              teacher_hidden: int | None = None, student_hidden: int | None = None, n_blocks: int = 8,
              features: int | None = None, context_features: int | None = None,
              sections: Sequence[str] = SECTIONS, ingest_n: int = 20_000, ingest_geometry: str | None = None,
              ingest_scheduler: str | None = None, train_steps: int = 5, teacher_train_batch: int = 200,
              student_train_batch: int = 175, chunk_size: int | None = 256, threads: int | None = None,
              quick: bool = False, seed: int = 0, preset: str | None = None) -> dict[str, Any]:
    """Run the benchmark and return its results (JSON-able), with ``markdown`` and flat ``metrics``.

    Args:
        geometry: geometry name (sizes and ingest); None for a geometry-free run with ``features``.
        device: "cpu" or "cuda" (CUDA when available if None).
        batches: batches to time (default 1, 100, 10 000; ``quick``: 1, 10, 100).
        budget_s: most seconds one measurement (warm-up + repeats) may take.
        repeats, warmup: timed and untimed calls per measurement (the teacher warms up once at most).
        model_dirs: trained model directories (``teacher.pt`` / ``student.pt``); a model not found is
            built random-initialised at the default size.
        teacher_hidden, student_hidden, n_blocks: sizes of random-initialised models (defaults:
            :data:`CALOFLOW_SIZES`, else D and 2·D; 8 blocks).
        features, context_features: D and the context size without a geometry (context defaults to
            1 + layers with a geometry).
        sections: any of "sampling", "floor", "ingest", "training", "onnx" (the student exported and run
            by ONNX Runtime beside torch: :mod:`.bench_onnx`).
        ingest_n, ingest_geometry, ingest_scheduler: showers, geometry and Dask scheduler of the ingest
            benchmark (``None`` scheduler: a LocalCluster; "threads": in-process).
        train_steps, teacher_train_batch, student_train_batch: optimiser steps timed and their batches
            (CaloFlow: 200 teacher, 175 student).
        chunk_size: rows per chunk of the fast student sampler.
        threads: torch intra-op threads for the run (None: leave as is).
        quick: small batches, 2 repeats, 1 warm-up, short budget, small ingest and few steps.
        seed: seed of models and inputs.
        preset: a name in :data:`PRESETS` ("quickstart"): its geometry, sizes and training batches replace
            those arguments (hidden sizes given explicitly still win).
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise CalodistillError(f"sections: unknown {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    if preset is not None:
        if preset not in PRESETS:
            raise CalodistillError(f"preset: unknown {preset!r} (known: {', '.join(PRESETS)})")
        p = PRESETS[preset]
        geometry, n_blocks = p["geometry"], p["n_blocks"]
        teacher_hidden, student_hidden = teacher_hidden or p["teacher_hidden"], student_hidden or p["student_hidden"]
        teacher_train_batch, student_train_batch = p["teacher_train_batch"], p["student_train_batch"]
    if quick:
        batches = batches or QUICK_BATCHES
        repeats, warmup = min(repeats, 2), min(warmup, 1)
        budget_s = min(budget_s, 10.0)
        ingest_n = min(ingest_n, 2000)
        train_steps = min(train_steps, 2)
    batches = list(batches or DEFAULT_BATCHES)
    if not batches or any(int(b) != b or b < 1 for b in batches):
        raise CalodistillError(f"batches: must be positive integers, got {batches}")
    if budget_s <= 0 or repeats < 1 or warmup < 0:
        raise CalodistillError("budget_s, repeats, warmup: must be > 0, >= 1, >= 0")
    dev = resolve_device(device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise CalodistillError(f"threads: must be positive, got {threads}")
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    try:
        geo = None
        if geometry is not None:
            from ..data.geometry import get_geometry

            try:
                geo = get_geometry(geometry)
            except (KeyError, ValueError) as exc:
                raise CalodistillError(f"geometry: {exc}") from None
        teacher = student = None
        sources: list[str] = []
        if model_dirs:
            teacher, student, sources = load_models_from_dirs([Path(p) for p in model_dirs])
        ref = teacher if teacher is not None else student
        if ref is not None:
            d, c = ref.config.features, ref.config.context_features
        elif geo is not None:
            d, c = geo.n_voxels, (context_features if context_features is not None else 1 + geo.n_layers)
        elif features is not None:
            d, c = features, context_features or 0
        else:
            raise CalodistillError("geometry: give a geometry name, model directories or features")
        if geo is None and ref is not None:  # name the geometry of trained models when one fits
            from ..data.geometry import infer_geometry

            try:
                geo = infer_geometry(d, "models")
                geometry = geo.name
            except CalodistillError:
                pass
        if geo is not None and d != geo.n_voxels:
            raise CalodistillError(f"geometry: {geo.name} has {geo.n_voxels} voxels but the models have {d} features")
        th, sh = _default_sizes(geometry, d)
        th, sh = teacher_hidden or th, student_hidden or sh
        if teacher is None or student is None:
            rnd_teacher, rnd_student = build_models(d, c, th, sh, n_blocks=(ref.config.n_blocks if ref else n_blocks),
                                                    seed=seed)
            if teacher is None:
                teacher = rnd_teacher
            if student is None:
                from ...flows.models import build_iaf_like

                student = build_iaf_like(teacher, hidden_features=sh)
        teacher = teacher.float()
        student = student.float()
        for flow in (teacher, student):  # start without cached masked weights (also makes copies safe)
            flow.set_weight_cache(True)
        result: dict[str, Any] = {
            "geometry": geometry, "features": d, "context_features": c,
            "models": "trained: " + ", ".join(sources) if sources else "random-initialised (timing does not depend on training)",
            "model_sources": sources,
            "teacher": _config_summary(teacher), "student": _config_summary(student),
            "dtype": "float32", "budget_s": budget_s, "repeats": repeats, "warmup": warmup, "quick": quick,
            "device_info": device_info(dev),
        }
        if "sampling" in sections or "floor" in sections:
            result["sampling"] = _sampling_section(teacher, student, dev, batches, budget_s, repeats, warmup,
                                                   chunk_size, "floor" in sections, seed)
        if "onnx" in sections:
            from .bench_onnx import onnx_section

            result["onnx"] = onnx_section(student, dev, batches, budget_s, repeats, warmup, chunk_size, seed)
        if "training" in sections:
            result["training"] = _training_section(teacher, student, dev, train_steps, teacher_train_batch,
                                                   student_train_batch, seed)
        if "ingest" in sections:
            ig = ingest_geometry or (geometry if geometry is not None else "calogan")
            result["ingest"] = _ingest_section(ig, ingest_n, ingest_scheduler)
        result["device_info"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        result["wall_s"] = time.perf_counter() - t_start
        result["metrics"] = flat_metrics(result)
        result["markdown"] = render_markdown(result)
        return result
    finally:
        torch.set_num_threads(old_threads)


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flat ``name → float`` view of the results (for MLflow)."""
    m: dict[str, float] = {}
    samp = result.get("sampling")
    if samp:
        m["flops_per_shower"] = float(samp["flops_per_shower"])
        for row in samp["rows"]:
            b = row["batch"]
            m[f"teacher_ms_per_shower_b{row['teacher']['batch']}"] = row["teacher"]["ms_per_shower"]
            if "teacher_dpass" in row:
                m[f"teacher_dpass_ms_per_shower_b{row['teacher_dpass']['batch']}"] = row["teacher_dpass"]["ms_per_shower"]
            m[f"student_fast_ms_per_shower_b{row['student_fast']['batch']}"] = row["student_fast"]["ms_per_shower"]
            m[f"student_iaf_ms_per_shower_b{row['student_iaf']['batch']}"] = row["student_iaf"]["ms_per_shower"]
            if row.get("speedup_fast") is not None:
                m[f"speedup_fast_b{row['teacher']['batch']}"] = row["speedup_fast"]
            if "floor" in row:
                m[f"floor_ms_per_shower_b{row['floor']['batch']}"] = row["floor"]["ms_per_shower"]
                m[f"student_over_floor_b{b}"] = row["student_over_floor"]
    tr = result.get("training") or {}
    for name in ("teacher", "student"):
        if name in tr and "showers_per_s" in tr[name]:
            m[f"train_{name}_showers_per_s"] = tr[name]["showers_per_s"]
            m[f"train_{name}_steps_per_s"] = tr[name]["steps_per_s"]
            m[f"train_{name}_over_matmul_floor"] = tr[name]["step_over_floor"]
            m[f"train_{name}_peak_mb"] = tr[name]["peak_memory_mb"]
    ig = result.get("ingest")
    if ig:
        for k in ("ingest_showers_per_s", "ingest_mb_per_s", "baseline_showers_per_s", "baseline_mb_per_s", "ratio"):
            if k in ig:
                m[f"ingest_{k}" if not k.startswith("ingest") else k] = float(ig[k])
    if result.get("onnx"):
        from .bench_onnx import onnx_metrics

        m.update(onnx_metrics(result["onnx"]))
    return m
