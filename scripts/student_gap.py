"""Where a student's NLL gap to its teacher comes from: per-block fit at the teacher's states vs its own chain.

    python scripts/student_gap.py TEACHER_DIR STUDENT_DIR DATASET_DIR [--n 300] [--float64]

On the first N test showers (the distill stage's subset and dequantisation noise): the teacher's exact NLL;
the student's exact NLL (its own solve, data side first); the student's "teacher-forced" NLL (every student
block run on the teacher's state on its noise side, the teacher's z as the noise); the base-density and
log-determinant parts of each; each block's log-determinant mismatch under teacher forcing; quantiles of
the per-shower gap. Results: docs/experiments.md (2026-11-29, issue 16).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from calodistill.flows.distillation import student_local_trace
from calodistill.flows.student_density import FastIAFDensity
from calodistill.pipeline.data.bundle import ModelBundle
from calodistill.pipeline.stages.train_teacher import _prepare, load_splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher")
    ap.add_argument("student")
    ap.add_argument("data")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0, help="the distill stage's seed (test noise: seed + 2)")
    ap.add_argument("--float64", action="store_true", help="both models and the showers in float64")
    args = ap.parse_args()
    dtype = torch.float64 if args.float64 else torch.float32
    tb, sb = ModelBundle.open(Path(args.teacher)), ModelBundle.open(Path(args.student))
    teacher, student = tb.flow2.to(dtype).eval(), sb.flow2.to(dtype).eval()
    _, _, _, test = load_splits(Path(args.data))
    te = _prepare(tb.preprocessing, test, args.seed + 2)
    x, c = te["x2"][: args.n].to(dtype), te["c2"][: args.n].to(dtype)
    with torch.no_grad():
        trace = teacher.forward_trace(x, c)
        base_t = teacher.base_log_prob(trace.outputs)
        log_p = base_t + trace.logabsdet
        forced = student_local_trace(student, trace, c)
        z_s, ld_s = FastIAFDensity(student).forward(x, c)
        base_s = student.base_log_prob(z_s)
        log_q = base_s + ld_s
        print(f"{len(x)} test showers, {dtype}")
        print(f"NLL: teacher {-log_p.mean():.3f}, student exact {-log_q.mean():.3f} "
              f"(gap {float((log_p - log_q).mean() / log_p.mean().abs()):.2%}), "
              f"student teacher-forced {-(base_t - forced.logabsdet).mean():.3f}")
        print(f"base term -log N(z): teacher {-base_t.mean():.2f}, student exact {-base_s.mean():.2f}")
        print(f"log-determinant: teacher {trace.logabsdet.mean():.2f}, student exact {ld_s.mean():.2f}, "
              f"teacher-forced {-forced.logabsdet.mean():.2f}")
        blocks = teacher.blocks()
        cores = student.cores()
        for k, (block, core) in enumerate(zip(blocks, cores)):
            ld_t = block._elementwise_forward(trace.states[k], trace.params[k])[1]
            h = trace.states[k + 1]
            if k < len(teacher.permutations()):
                h, _ = teacher.permutations()[k].inverse(h)
            ld_sk = core._elementwise_forward(h, core.params(h, c))[1]
            diff = ld_t + ld_sk
            print(f"  block {k}: teacher log|det| {ld_t.mean():8.2f}, student teacher-forced {-ld_sk.mean():8.2f}, "
                  f"mismatch mean {diff.mean():6.2f} rms {diff.pow(2).mean().sqrt():6.2f}")
        gap = (log_p - log_q).double().numpy()
        print(f"z rms difference {float((z_s - trace.outputs).pow(2).mean().sqrt()):.4f}; per-shower gap quantiles "
              f"10/50/90/99 %: {np.round(np.quantile(gap, [0.1, 0.5, 0.9, 0.99]), 2).tolist()}")


if __name__ == "__main__":
    main()
