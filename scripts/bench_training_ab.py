"""Training steps of a revision's ``flows/`` against the working tree's, in ONE process, interleaved.

Extracts ``flows/`` of ``--rev`` (default HEAD) with ``git archive`` into a temporary package ``calohead``,
builds the same teacher and student in both (same weights), and times a teacher NLL step and a
distillation step (DistillConfig's defaults: local x-pass, noise weight 4, fully guided, β 0.5) round by
round, each next to the step's dense-matmul floor (its own products, recorded at the dispatcher, timed
alone). Prints ms per step, steps/s, speed-ups and step / floor.

    python scripts/bench_training_ab.py --threads 1 --rounds 3 --steps 3            # quickstart size
    python scripts/bench_training_ab.py --threads 1 --rounds 2 --steps 1 --size ds1  # CaloFlow DS1 size
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SIZES = {  # features, context, blocks, teacher hidden, student hidden, distillation batch, teacher batch
    "quickstart": (504, 4, 4, 64, 64, 32, 256),
    "ds1": (368, 6, 8, 378, 736, 175, 200),
}


def _extract(rev: str, into: Path) -> None:
    pkg = into / "calohead"
    pkg.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "flows"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(pkg)], input=archive, check=True)
    (pkg / "__init__.py").write_text("")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", choices=sorted(SIZES), default="quickstart")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="calohead-"))
    _extract(args.rev, tmp)
    sys.path.insert(0, str(tmp))
    from calodistill.pipeline.metrics.throughput import (
        capture_matmuls,
        matmul_replay_call,
    )

    d, c, blocks, th, sh, bd, bt = SIZES[args.size]
    kw = {"features": d, "context_features": c, "n_blocks": blocks, "hidden_features": th, "kind": "spline",
          "num_bins": 8, "tail_bound": 14.0}
    mods = {tag: {m: importlib.import_module(f"{pkg}.flows.{m}") for m in ("config", "models", "distillation", "losses")}
            for tag, pkg in (("old", "calohead"), ("new", "calodistill"))}
    torch.manual_seed(0)
    state = None
    gen = torch.Generator().manual_seed(1)
    xd, cd = torch.randn(bd, d, generator=gen), torch.randn(bd, c, generator=gen)
    xt, ct = torch.randn(bt, d, generator=gen), torch.randn(bt, c, generator=gen)
    steps: dict[str, dict[str, object]] = {}
    for tag in ("new", "old"):
        m = mods[tag]
        teacher = m["models"].build_maf(m["config"].FlowConfig(**kw))
        if state is None:
            state = teacher.state_dict()
        teacher.load_state_dict(state)
        student = m["models"].build_iaf_like(teacher, hidden_features=sh)
        m["distillation"].init_student_from_teacher(teacher, student)
        frozen = copy.deepcopy(teacher).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        s_opt, t_opt = torch.optim.Adam(student.parameters(), 1e-4), torch.optim.Adam(teacher.parameters(), 1e-4)

        def dstep(m=m, s=student, f=frozen, o=s_opt) -> None:
            o.zero_grad()
            m["distillation"].distillation_step_loss(f, s, xd, cd, beta=0.5, fully_guided=True, x_pass="local",
                                                     noise_weight=4.0)[0].backward()
            o.step()

        def tstep(m=m, t=teacher, o=t_opt) -> None:
            o.zero_grad()
            m["losses"].nll_loss(t, xt, ct).backward()
            o.step()

        steps[tag] = {f"distillation step, batch {bd}": dstep, f"teacher NLL step, batch {bt}": tstep}
    res: dict[tuple[str, ...], list[float]] = {}
    floors = {}
    for name in steps["new"]:
        for tag in steps:
            steps[tag][name]()
            calls = capture_matmuls(steps[tag][name])
            floors[(name, tag)] = (matmul_replay_call(calls, torch.device("cpu")), sum(x.flops for x in calls))
        for _ in range(args.rounds):
            for tag in steps:
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    steps[tag][name]()
                    res.setdefault((name, tag), []).append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                floors[(name, tag)][0]()
                res.setdefault((name, tag, "floor"), []).append(time.perf_counter() - t0)
    print(f"size {args.size}, threads {torch.get_num_threads()}, load at end {os.getloadavg()}")
    for name in steps["new"]:
        o, n = (1e3 * statistics.median(res[(name, t)]) for t in ("old", "new"))
        fo, fn = (1e3 * statistics.median(res[(name, t, "floor")]) for t in ("old", "new"))
        print(f"{name}: {args.rev} {o:.1f} ms ({1e3 / o:.2f} steps/s), now {n:.1f} ms ({1e3 / n:.2f} steps/s), "
              f"speed-up {o / n:.2f}x; matmul floor {floors[(name, 'new')][1] / 1e9:.2f} GFLOP, {fo:.1f} / {fn:.1f} ms; "
              f"step/floor {o / fo:.2f} -> {n / fn:.2f}")


if __name__ == "__main__":
    main()
