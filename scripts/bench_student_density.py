"""The student's exact log-density at quickstart size in ONE process: nflows' D-pass ``IAF.log_prob`` against
:class:`flows.student_density.FastIAFDensity` (voxel by voxel), on the same weights and showers.

Each SPEC is ``kind:batch:showers`` with kind ``dpass`` or ``fast``; they run in the order given (interleave
them); showers/s reported with the load average. The model is the quickstart's student (D 504, 4 spline blocks
of hidden 64, 8 bins, context 4), weights perturbed away from the identity initialisation.

    python scripts/bench_student_density.py dpass:20:20 fast:20:20 dpass:250:250 fast:250:250 fast:1000:1000
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from calodistill.flows.config import FlowConfig
    from calodistill.flows.models import build_iaf_like, build_maf
    from calodistill.flows.student_density import FastIAFDensity

    torch.manual_seed(4)
    cfg = FlowConfig(features=504, context_features=4, n_blocks=4, hidden_features=64, n_hidden_layers=1,
                     kind="spline", num_bins=8, tail_bound=14.0, permutation="reverse")
    student = build_iaf_like(build_maf(cfg))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.03 * torch.randn_like(p))
    student.eval()
    n_max = max(int(s.split(":")[2]) for s in args.specs)
    x, c = torch.randn(n_max, 504), torch.randn(n_max, 4)
    density = FastIAFDensity(student)
    with torch.no_grad():  # warm-up: compiled spline, masked-weight caches
        student.log_prob(x[:2], c[:2])
        density.log_prob(x[:2], c[:2])
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    for spec in args.specs:
        kind, batch, n = spec.split(":")
        batch, n = int(batch), int(n)
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, n, batch):
                xb, cb = x[i:i + batch], c[i:i + batch]
                (student.log_prob(xb, cb) if kind == "dpass" else density.log_prob(xb, cb))
        dt = time.perf_counter() - t0
        print(f"{kind:5s} batch {batch:5d} showers {n:5d}: {dt:7.2f} s  {n / dt:8.1f} showers/s  "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
