"""Teacher sampling at quickstart size in ONE process: a revision's ``MAF.inverse`` (nflows' D passes), today's
``MAF.inverse`` and ``FastMAFSampler`` (incremental), on the same weights and noise.

Each SPEC is ``kind:batch:calls`` with kind ``rev`` (the revision's D passes), ``dpass`` (today's D passes)
or ``fast``; they run in the order given (interleave them), median seconds per call reported.

    python scripts/bench_teacher_sampling.py fast:10:3 rev:10:1 dpass:10:1 fast:10:3 fast:100:3 fast:1000:3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training_ab import _extract


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="calohead-"))
    _extract(args.rev, tmp)
    sys.path.insert(0, str(tmp))
    import calohead.flows.config as old_config
    import calohead.flows.models as old_models

    from calodistill.flows.config import FlowConfig
    from calodistill.flows.models import build_maf
    from calodistill.flows.teacher_sampling import FastMAFSampler

    torch.manual_seed(0)
    kw = {"features": 504, "context_features": 4, "n_blocks": 4, "hidden_features": 64, "n_hidden_layers": 1,
          "kind": "spline", "num_bins": 8, "tail_bound": 14.0}
    teacher = build_maf(FlowConfig(**kw)).eval()
    old = old_models.build_maf(old_config.FlowConfig(**kw))
    old.load_state_dict(teacher.state_dict())
    old.eval()
    fast = FastMAFSampler(teacher)
    gen = torch.Generator().manual_seed(1)
    z, c = torch.randn(1000, 504, generator=gen), torch.randn(1000, 4, generator=gen)
    fast(z[:2], c[:2])

    def call(kind: str, b: int):
        if kind == "fast":
            return lambda: fast(z[:b], c[:b])
        model = old if kind == "rev" else teacher

        def inverse() -> torch.Tensor:
            with torch.inference_mode():
                return model.inverse(z[:b], c[:b])[0]
        return inverse

    out: dict[tuple[str, int], tuple[float, torch.Tensor]] = {}
    for spec in args.specs:
        kind, batch, calls = spec.split(":")
        b, n = int(batch), int(calls)
        fn = call(kind, b)
        seconds = []
        for _ in range(n):
            t0 = time.perf_counter()
            x = fn()
            seconds.append(time.perf_counter() - t0)
        out[(kind, b)] = (statistics.median(seconds), x)
        print(f"{kind:5s} batch {b:5d}: {statistics.median(seconds) / b * 1e3:9.3f} ms/shower ({n} calls, median)",
              flush=True)
    for (kind, b), (sec, x) in out.items():
        if kind != "fast" and ("fast", b) in out:
            fs, fx = out[("fast", b)]
            print(f"batch {b}: max |fast - {kind}| = {float((fx - x).abs().max()):.2e}; speed-up {sec / fs:.0f}x")
    print("threads", torch.get_num_threads(), "load", os.getloadavg())


if __name__ == "__main__":
    main()
