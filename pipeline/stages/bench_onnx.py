"""``calodistill bench``'s ONNX Runtime rows: the student's Flow II exported and timed next to torch.

The student is exported alone (:func:`calodistill.flows.export.export_student_flow`: noise and context in,
the preprocessed shower out, what :class:`flows.fast.FastIAFSampler` computes), in float32 and in the
reduced precisions of :mod:`calodistill.flows.onnx_precision`, and each graph is timed with ONNX Runtime
on the CPU (and the CUDA execution provider when this onnxruntime has it) at the benchmark's batches,
with the same protocol, chunks and thread count as the torch sampler, which is timed again beside them
so that the ratios come from one stretch of the same run (ONNX Runtime's idle threads sleep rather than
spin, so that they do not take the cores from torch's). The fidelity of each graph is its difference
from the torch sampler on the same inputs.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..metrics.throughput import BudgetedTimer

__all__ = ["ONNX_PRECISIONS", "onnx_metrics", "onnx_section"]

logger = logging.getLogger(__name__)

#: The precisions timed (each a graph of :mod:`calodistill.flows.onnx_precision`).
ONNX_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int8-dynamic")
_FIDELITY_ROWS = 256


def _providers() -> list[tuple[str, list[str]]]:
    import onnxruntime as ort

    out = [("cpu", ["CPUExecutionProvider"])]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        out.append(("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    return out


def _chunked(session: Any, z: np.ndarray, c: np.ndarray, batch: int, chunk: int | None) -> Callable[[], Any]:
    """One sampling call of ``batch`` rows, in chunks of ``chunk`` rows as the torch sampler runs them."""
    step = min(batch, chunk) if chunk else batch
    feeds = [{"noise": z[s:min(s + step, batch)], "context": c[s:min(s + step, batch)]} for s in range(0, batch, step)]

    def call() -> Any:
        return [session.run(None, f) for f in feeds]

    return call


def onnx_section(student: Any, device: torch.device, batches: Sequence[int], budget_s: float, repeats: int,
                 warmup: int, chunk_size: int | None, seed: int,
                 precisions: Sequence[str] = ONNX_PRECISIONS) -> dict[str, Any]:
    """Time the exported student next to :class:`flows.fast.FastIAFSampler` (see the module docstring).

    Returns:
        ``rows`` (per batch: ``torch_fast`` and ``onnx_<provider>_<precision>`` timings, ``*_speedup`` =
        torch time / ONNX Runtime time at the same batch), ``graphs`` (nodes and file size per precision),
        ``fidelity`` (max and median |Δx| against torch per precision), ``providers``, ``threads``,
        ``export_seconds``, ``onnxruntime``.
    """
    import onnx

    from ...flows.export import export_student_flow, onnx_session
    from ...flows.fast import FastIAFSampler
    from ...flows.onnx_precision import convert_precision

    student = student.to(device).eval()
    fast = FastIAFSampler(student, chunk_size=chunk_size)
    d, c = student.config.features, student.config.context_features
    gen = torch.Generator(device="cpu").manual_seed(seed)
    zmax = max(batches)
    z = torch.randn(zmax, d, generator=gen, dtype=torch.float32)
    ctx = torch.randn(zmax, c, generator=gen, dtype=torch.float32)
    z_dev, ctx_dev = z.to(device), ctx.to(device)
    z_np, ctx_np = z.numpy(), ctx.numpy()
    threads = torch.get_num_threads()
    result: dict[str, Any] = {"threads": threads, "precisions": list(precisions), "graphs": {}, "fidelity": {},
                              "onnxruntime": importlib_metadata.version("onnxruntime")}
    with tempfile.TemporaryDirectory(prefix="calodistill-bench-onnx-") as tmp:
        t0 = time.perf_counter()
        fp32 = export_student_flow(student, Path(tmp) / "fp32.onnx")  # exports a float32 CPU copy
        result["export_seconds"] = time.perf_counter() - t0
        files = {p: fp32 if p == "fp32" else convert_precision(fp32, Path(tmp) / f"{p}.onnx", p) for p in precisions}
        with torch.inference_mode():
            ref = fast(z_dev[:_FIDELITY_ROWS], ctx_dev[:_FIDELITY_ROWS]).float().cpu().numpy()
        timers = {"torch_fast": BudgetedTimer("student (FastIAFSampler)",
                                              lambda b: (lambda: fast.sample(z_dev[:b], ctx_dev[:b])), device,
                                              budget_s, repeats, warmup)}
        providers = _providers()
        result["providers"] = [label for label, _ in providers]
        for precision, path in files.items():
            result["graphs"][precision] = {"nodes": len(onnx.load(str(path)).graph.node),
                                           "file_mb": path.stat().st_size / 1e6}
            for label, names in providers:
                if label == "cuda" and precision.startswith("int8"):
                    continue  # the int8 products are CPU kernels here: they would not run on the GPU
                session = onnx_session(path, names, threads=threads, spinning=False)  # idle: leave torch the cores
                key = f"onnx_{label}_{precision}"
                x = session.run(None, {"noise": z_np[:_FIDELITY_ROWS], "context": ctx_np[:_FIDELITY_ROWS]})[0]
                diff = np.abs(x - ref)
                result["fidelity"][key] = {"max_abs_diff_x": float(diff.max()),
                                           "median_abs_diff_x": float(np.median(diff))}
                timers[key] = BudgetedTimer(f"student (onnxruntime {label} {precision})",
                                            lambda b, s=session: _chunked(s, z_np, ctx_np, b, chunk_size),
                                            torch.device("cpu"), budget_s, repeats, warmup)
        rows = []
        for b in sorted(set(batches)):
            row: dict[str, Any] = {"batch": b}
            for key, timer in timers.items():
                t, note = timer.measure(b)
                row[key] = {**t.to_dict(), "note": note}
            base = row["torch_fast"]
            for key in timers:
                if key != "torch_fast":
                    row[f"{key}_speedup"] = (base["ms_per_shower"] / row[key]["ms_per_shower"]
                                             if row[key]["batch"] == base["batch"] else None)
            rows.append(row)
            logger.info("bench onnx batch %d: torch %.4g ms, %s", b, base["ms_per_shower"],
                        ", ".join(f"{k} {row[k]['ms_per_shower']:.4g} ms" for k in timers if k != "torch_fast"))
    result["rows"] = rows
    return result


def onnx_metrics(section: dict[str, Any]) -> dict[str, float]:
    """Flat ``name → float`` view of :func:`onnx_section`'s rows (for MLflow)."""
    m: dict[str, float] = {}
    for row in section.get("rows", []):
        for key, value in row.items():
            if isinstance(value, dict) and "ms_per_shower" in value:
                m[f"{key}_ms_per_shower_b{value['batch']}"] = float(value["ms_per_shower"])
            elif key.endswith("_speedup") and value is not None:
                m[f"{key}_b{row['batch']}"] = float(value)
    return m
