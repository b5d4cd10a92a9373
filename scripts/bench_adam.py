"""One Adam step over a quickstart-size student (3.1 M parameters): PyTorch's default, foreach and fused.

    python scripts/bench_adam.py [--threads 1] [--steps 30]

Random gradients, the same parameters for each variant, two rounds interleaved; also the global
gradient-norm clipping every training step does. Results: docs/benchmarks.md ("Fused Adam").
"""

from __future__ import annotations

import argparse
import time

import torch

from calodistill.flows.config import FlowConfig
from calodistill.flows.models import build_iaf_like, build_maf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = FlowConfig(features=504, context_features=4, n_blocks=4, hidden_features=64, kind="spline",
                     num_bins=8, tail_bound=14.0)
    params = list(build_iaf_like(build_maf(cfg)).parameters())
    print(f"{sum(p.numel() for p in params)} parameters in {len(params)} tensors, {args.threads} thread(s)")
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(2):
        for name, kw in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
            opt = torch.optim.Adam(params, lr=1e-4, **kw)
            for _ in range(3):
                opt.step()
            t = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            step_ms = (time.perf_counter() - t) / args.steps * 1e3
            t = time.perf_counter()
            for _ in range(args.steps):
                torch.nn.utils.clip_grad_norm_(params, 5.0)
            clip_ms = (time.perf_counter() - t) / args.steps * 1e3
            print(f"{name:8s} {step_ms:6.2f} ms per step   (clip_grad_norm_ {clip_ms:.2f} ms)")


if __name__ == "__main__":
    main()
