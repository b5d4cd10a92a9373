"""The benchmark's results (:func:`calodistill.pipeline.stages.bench.run_bench`) as markdown tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["render_markdown"]


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _cell(t: dict[str, Any], requested: int) -> str:
    s = _fmt(t["ms_per_shower"])
    if t["batch"] != requested:
        s += f" (at batch {t['batch']})†"
    return s


def render_markdown(result: dict[str, Any]) -> str:
    """The results as markdown tables (sampling, ingest, training) with the set-up above them."""
    info = result["device_info"]
    lines = [
        f"Device: {info['device']}" + (f" ({info['gpu']})" if info.get("gpu") else "")
        + f"; CPU: {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']} with "
        f"{info['torch_threads']} threads; load average at start {_load(info.get('load_average'))}, "
        f"at end {_load(info.get('load_average_end'))}.",
        f"Geometry: {result['geometry'] or 'none'} (D = {result['features']}, context {result['context_features']}); "
        f"models: {result['models']}; {result['dtype']}.",
        f"Teacher: MAF, {result['teacher']['n_blocks']} blocks, hidden {result['teacher']['hidden_features']} "
        f"× {result['teacher']['n_hidden_layers']}, {result['teacher']['parameters']:,} parameters. "
        f"Student: IAF, hidden {result['student']['hidden_features']} × {result['student']['n_hidden_layers']}, "
        f"{result['student']['parameters']:,} parameters.",
        f"Protocol: median of up to {result['repeats']} repeats after {result['warmup']} warm-up calls "
        f"(teacher: 1), budget {result['budget_s']:g} s per measurement; ms per shower of Flow II sampling.",
        "",
    ]
    samp = result.get("sampling")
    notes: list[str] = []
    if samp:
        lines += [
            f"FLOPs per shower: {samp['flops_per_shower'] / 1e6:.1f} MFLOP as dense matmuls (the floor's "
            f"shapes); the fast sampler executes {samp['flops_per_shower_executed'] / 1e6:.1f} MFLOP "
            f"(output layer in {samp['output_groups']} groups skipping the MADE mask's zeros); "
            f"chunks of {samp['chunk_size']} rows; spline inverse: {samp.get('spline', 'torch ops')}."
            + (f" Teacher: {samp['teacher_sampler']}; nflows' D-pass loop for reference in the last columns."
               if samp.get("teacher_sampler") else ""),
            "",
            "| batch | teacher ms/shower | student IAF.inverse ms/shower | student fast ms/shower "
            "| speed-up teacher/fast (same batch) | dense matmul floor ms/shower | fast / dense floor "
            "| fast / its own matmuls | fast GFLOP/s (executed) | floor GFLOP/s "
            "| teacher nflows D passes ms/shower | teacher speed-up over D passes |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in samp["rows"]:
            b = row["batch"]
            sp = row.get("speedup_fast")
            sp_s = "—" if sp is None else f"{_fmt(sp)}× (batch {row['teacher']['batch']})"
            fl = row.get("floor")
            lines.append(
                f"| {b:,} | {_cell(row['teacher'], b)} | {_cell(row['student_iaf'], b)} | "
                f"{_cell(row['student_fast'], b)} | {sp_s} | {_fmt(fl['ms_per_shower']) if fl else '—'} | "
                f"{_fmt(row.get('student_over_floor'))} | {_fmt(row.get('student_over_own_matmuls'))} | "
                f"{_fmt(row['student_gflops'])} | "
                f"{_fmt(fl['gflops']) if fl else '—'} | "
                f"{_cell(row['teacher_dpass'], b) if 'teacher_dpass' in row else '—'} | "
                f"{_fmt(row.get('teacher_speedup_vs_dpass'))} |")
            for key in ("teacher", "student_iaf", "student_fast", "teacher_dpass"):
                if key in row and row[key]["note"]:
                    notes.append(f"† {key}: {row[key]['note']}.")
        lines.append("")
        if notes:
            lines += [*dict.fromkeys(notes), "Every figure was measured at the batch shown; none is extrapolated.", ""]
    if result.get("onnx"):
        lines += _onnx_lines(result["onnx"])
    tr = result.get("training")
    if tr:
        lines += ["| training | loss | batch | showers/s | steps/s | matmul floor ms/step | step / matmul floor "
                  "| peak memory MB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name in ("teacher", "student"):
            r = tr.get(name)
            if not r:
                continue
            if "error" in r:
                lines.append(f"| {name} | {r['error']} | — | — | — | — | — | — |")
                continue
            floor_ms = 1e3 * r["matmul_floor_s"] if "matmul_floor_s" in r else None
            lines.append(f"| {name} | {r['loss']} | {r['batch']} | {_fmt(r['showers_per_s'])} | "
                         f"{_fmt(r.get('steps_per_s'))} | {_fmt(floor_ms)} | {_fmt(r.get('step_over_floor'))} | "
                         f"{_fmt(r['peak_memory_mb'])} |")
        method = next((tr[n]["memory_method"] for n in ("teacher", "student") if n in tr and "memory_method" in tr[n]), "")
        lines += ["", f"Peak memory: {method}. Matmul floor: the products one step executes (forward and "
                  "backward, recorded at the dispatcher) timed alone, interleaved with the steps.", ""]
    ig = result.get("ingest")
    if ig:
        lines += [
            "| ingest | showers | showers/s | MB/s |", "|---|---:|---:|---:|",
            f"| calodistill ingest (Dask, {ig.get('n_workers', '?')} workers) | {ig['n']:,} | "
            f"{_fmt(ig['ingest_showers_per_s'])} | {_fmt(ig['ingest_mb_per_s'])} |",
            f"| plain read + pyarrow.parquet.write_table (one process) | {ig['n']:,} | "
            f"{_fmt(ig['baseline_showers_per_s'])} | {_fmt(ig['baseline_mb_per_s'])} |",
            "",
            f"Ingest / plain write_table throughput: {_fmt(ig['ratio'])} (geometry {ig['geometry']}; "
            f"cluster start-up {_fmt(ig.get('cluster_start_s'))} s not counted; MB = uncompressed voxels + energies).",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def _load(v: Sequence[float] | None) -> str:
    return "n/a" if not v else "/".join(f"{x:.1f}" for x in v)


def _onnx_lines(onnx: dict[str, Any]) -> list[str]:
    """The ONNX Runtime table: torch's fast sampler and each exported graph, ratios from the same run."""
    keys = [k for k in onnx["rows"][0] if k.startswith("onnx_") and not k.endswith("_speedup")] if onnx["rows"] else []
    graphs = onnx["graphs"]
    sizes = ", ".join(f"{p} {g['file_mb']:.1f} MB / {g['nodes']:,} nodes" for p, g in graphs.items())
    lines = [
        f"ONNX Runtime {onnx['onnxruntime']} ({', '.join(onnx['providers'])}; {onnx['threads']} intra-op threads, as "
        f"torch): the student's Flow II exported alone (flows.export.export_student_flow, opset 18; {sizes}; export "
        f"{_fmt(onnx['export_seconds'])} s) and timed beside torch's FastIAFSampler, re-timed in the same stretch of "
        "the run with the same protocol and chunks. fp16: the student's matrix weights stored in float16; int8: "
        "int8 weights with a scale per 32 rows (ONNX Runtime's MatMulNBits); int8-dynamic: ONNX Runtime's dynamic "
        "quantization. × = torch time / ONNX Runtime time (> 1: ONNX Runtime faster).",
        "",
        "| batch | torch FastIAFSampler ms/shower | " + " | ".join(f"{_label(k)} ms/shower | ×" for k in keys) + " |",
        "|---:|---:|" + "---:|---:|" * len(keys),
    ]
    notes: list[str] = []
    for row in onnx["rows"]:
        b = row["batch"]
        cells = [f"{_cell(row[k], b)} | {_fmt(row.get(f'{k}_speedup'))}" for k in keys]
        lines.append(f"| {b:,} | {_cell(row['torch_fast'], b)} | " + " | ".join(cells) + " |")
        notes += [f"† {k}: {row[k]['note']}." for k in ("torch_fast", *keys) if row[k]["note"]]
    fid = onnx.get("fidelity", {})
    if fid:
        diffs = "; ".join(f"{_label(k)} max {_fmt(v['max_abs_diff_x'])}, median {_fmt(v['median_abs_diff_x'])}"
                          for k, v in fid.items())
        lines += ["", f"Difference from torch in the preprocessed space (|Δx|, first rows): {diffs}."]
    lines.append("")
    if notes:
        lines += [*dict.fromkeys(notes), ""]
    return lines


def _label(key: str) -> str:
    """``onnx_cpu_int8`` → ``onnxruntime CPU int8``."""
    _, provider, precision = key.split("_", 2)
    return f"onnxruntime {provider.upper()} {precision}"
