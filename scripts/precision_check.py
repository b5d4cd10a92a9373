"""TF32 and bf16 on CUDA: how far the teacher's NLL moves, and what the student's sampling gains.

``python scripts/precision_check.py OUT.json [--model-dir DIR ...]``: the teacher (MAF) log-probability of
showers sampled from it, and the student's (IAF, FastIAFSampler) sampling time per shower at batch 10 000,
in float32, with TF32 matmuls, and under bf16 autocast. A mode is acceptable where the mean NLL moves by
less than 0.1 %. Trained models are used when ``--model-dir`` directories hold ``teacher.pt``/``student.pt``,
else random-initialised CaloFlow-size models for CaloChallenge dataset 1 photons. Writes JSON and prints a
markdown table (scripts/gpu-check.sh runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

MODES = ("fp32", "tf32", "bf16")
TOLERANCE = 1e-3  # relative NLL shift accepted (0.1 %)


@contextlib.contextmanager
def precision(mode: str) -> Iterator[None]:
    """float32 (TF32 off), TF32 matmuls, or bf16 autocast, restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
    try:
        if mode == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def load_models(model_dirs: list[Path]) -> tuple[Any, Any, str]:
    """The teacher and student: trained ones from ``model_dirs`` where found, else CaloFlow-size random ones."""
    from calodistill.pipeline.stages.bench import (
        CALOFLOW_SIZES,
        build_models,
        load_models_from_dirs,
    )

    teacher = student = None
    if model_dirs:
        teacher, student, _ = load_models_from_dirs(model_dirs)
    th, sh = CALOFLOW_SIZES["calochallenge-1-photons"]
    if teacher is None or student is None:
        ref = teacher or student
        d, c = (ref.config.features, ref.config.context_features) if ref is not None else (368, 6)
        rnd_teacher, rnd_student = build_models(d, c, th, sh)
        teacher, student = teacher or rnd_teacher, student or rnd_student
        source = "random-initialised" if ref is None else "partly trained"
    else:
        source = "trained"
    for flow in (teacher, student):
        flow.set_weight_cache(True)
    return teacher.float().cuda().eval(), student.float().cuda().eval(), source


def measure(teacher: Any, student: Any, n_nll: int, batch: int, repeats: int) -> dict[str, Any]:
    from calodistill.flows.fast import FastIAFSampler
    from calodistill.pipeline.metrics.timing import time_calls

    dev = torch.device("cuda")
    d, c = student.config.features, student.config.context_features
    gen = torch.Generator(device="cpu").manual_seed(0)
    ctx_nll = torch.randn(n_nll, c, generator=gen).cuda() if c else None
    z = torch.randn(batch, d, generator=gen).cuda()
    ctx = torch.randn(batch, c, generator=gen).cuda() if c else None
    with torch.inference_mode(), precision("fp32"):
        x = student.inverse(torch.randn(n_nll, d, generator=gen).cuda(), ctx_nll)[0]  # showers to score
    sampler = FastIAFSampler(student, chunk_size=None)
    out: dict[str, Any] = {}
    for mode in MODES:
        try:
            with torch.inference_mode(), precision(mode):
                nll = -teacher.log_prob(x, ctx_nll).double()
                samples = sampler.sample(z, ctx)[0].float()
                seconds = time_calls(lambda: sampler.sample(z, ctx), dev, repeats, 1)
            out[mode] = {"mean_nll": float(nll.mean()), "per_shower_nll": nll.cpu(), "samples": samples,
                         "student_us_per_shower": 1e6 * statistics.median(seconds) / batch}
        except Exception as exc:  # noqa: BLE001 - a mode the kernels do not support is reported, not fatal
            out[mode] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    ref = out["fp32"]
    for mode in MODES:
        row = out[mode]
        if "error" in row or "error" in ref:
            continue
        row["nll_rel_shift"] = abs(row["mean_nll"] - ref["mean_nll"]) / abs(ref["mean_nll"])
        row["max_per_shower_rel_shift"] = float(((row["per_shower_nll"] - ref["per_shower_nll"]).abs()
                                                / ref["per_shower_nll"].abs().clamp_min(1.0)).max())
        row["max_sample_abs_diff"] = float((row["samples"] - ref["samples"]).abs().max())
        row["acceptable"] = row["nll_rel_shift"] < TOLERANCE
    for row in out.values():
        row.pop("per_shower_nll", None)
        row.pop("samples", None)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [(f"Precision on {result['gpu']} ({result['models']} models, NLL of {result['n_nll']} student showers "
              f"scored by the teacher; student sampling at batch {result['batch']}):"), "",
             "| mode | mean NLL | NLL shift | max per-shower shift | student µs/shower | NLL moves < 0.1 % |",
             "|---|---|---|---|---|---|"]
    for mode in MODES:
        r = result["modes"][mode]
        if "error" in r:
            lines.append(f"| {mode} | error: {r['error']} | | | | |")
            continue
        lines.append(f"| {mode} | {r['mean_nll']:.6g} | {r.get('nll_rel_shift', 0):.2e} | "
                     f"{r.get('max_per_shower_rel_shift', 0):.2e} | {r['student_us_per_shower']:.4g} | "
                     f"{'yes' if r.get('acceptable', True) else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="JSON results (a .md beside it)")
    parser.add_argument("--model-dir", action="append", type=Path, default=[], help="trained model directory")
    parser.add_argument("--n-nll", type=int, default=2000, help="showers scored (default 2000)")
    parser.add_argument("--batch", type=int, default=10_000, help="student sampling batch (default 10000)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("precision_check: no CUDA device", file=sys.stderr)
        return 2
    dirs = [p for p in args.model_dir if (p / "teacher.pt").is_file() or (p / "student.pt").is_file()]
    teacher, student, source = load_models(dirs)
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "models": source,
              "n_nll": args.n_nll, "batch": args.batch, "tolerance": TOLERANCE,
              "modes": measure(teacher, student, args.n_nll, args.batch, args.repeats)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
