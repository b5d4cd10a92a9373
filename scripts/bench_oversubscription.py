"""Concurrent distillation loops (quickstart size, batch 32): steps/s of each process per scenario.

Scenarios (``PROCESSESxTHREADS`` plus an optional OpenMP setting) run one after the other; the processes of
a scenario build their models, then start stepping at the same moment for ``--seconds``.

    python scripts/bench_oversubscription.py --seconds 10 1x2 1x2passive 1x1 2x2 2x1 2x2passive
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time

SCENARIOS: dict[str, list[tuple[int, dict[str, str]]]] = {
    "1x1": [(1, {})], "1x2": [(2, {})], "2x1": [(1, {})] * 2, "2x2": [(2, {})] * 2,
    "1x2passive": [(2, {"OMP_WAIT_POLICY": "PASSIVE"})], "2x2passive": [(2, {"OMP_WAIT_POLICY": "PASSIVE"})] * 2,
    "1x2spin1k": [(2, {"GOMP_SPINCOUNT": "1000"})], "1x2spin10k": [(2, {"GOMP_SPINCOUNT": "10000"})],
    "1x2spin100k": [(2, {"GOMP_SPINCOUNT": "100000"})],
    "2x2spin1k": [(2, {"GOMP_SPINCOUNT": "1000"})] * 2, "2x2spin10k": [(2, {"GOMP_SPINCOUNT": "10000"})] * 2,
    "2x2spin100k": [(2, {"GOMP_SPINCOUNT": "100000"})] * 2,
}


def worker(threads: int, seconds: float, start: float) -> None:
    import torch

    torch.set_num_threads(threads)
    from calodistill.flows.config import FlowConfig
    from calodistill.flows.distillation import (
        distillation_step_loss,
        init_student_from_teacher,
    )
    from calodistill.flows.models import build_iaf_like, build_maf

    torch.manual_seed(0)
    teacher = build_maf(FlowConfig(features=504, context_features=4, n_blocks=4, hidden_features=64, kind="spline",
                                   num_bins=8, tail_bound=14.0))
    student = build_iaf_like(teacher)
    init_student_from_teacher(teacher, student)
    frozen = copy.deepcopy(teacher).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    x, c = torch.randn(32, 504), torch.randn(32, 4)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad()
        distillation_step_loss(frozen, student, x, c, beta=0.5, fully_guided=True, x_pass="local",
                               noise_weight=4.0)[0].backward()
        opt.step()

    step()
    step()
    while time.time() < start:
        time.sleep(0.01)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    print(f"{n / (time.perf_counter() - t0):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", default=["1x2", "1x2passive", "1x1"])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--worker", nargs=3, type=float, metavar=("THREADS", "SECONDS", "START"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(int(args.worker[0]), args.worker[1], args.worker[2])
        return
    for name in args.scenarios:
        start = time.time() + 6  # after every process has built its models
        procs = []
        for threads, extra in SCENARIOS[name]:
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
            env.update(extra)
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(threads), str(args.seconds), str(start)],
                                          stdout=subprocess.PIPE, text=True, env=env))
        rates = [float(p.communicate()[0].strip()) for p in procs]
        print(f"{name:11s} steps/s per process: {', '.join(f'{r:.2f}' for r in rates)}; load {os.getloadavg()[0]:.1f}",
              flush=True)


if __name__ == "__main__":
    main()
