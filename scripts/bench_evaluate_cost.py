"""What the evaluate stage costs at quickstart size, part by part, on untrained quickstart-size models.

Builds a CaloGAN reference (synthetic, ``--reference`` showers), Flow I (6 blocks, hidden 64, 2 layers), a
teacher MAF (4 spline blocks, hidden 64, 8 bins) and its warm-started IAF student, samples ``--teacher-n``
teacher and ``--student-n`` student showers (timed: the generate stages' cost), then runs
:func:`pipeline.stages.evaluate.evaluate_showers` with the given classifier seeds and NLL subset and prints
its ``*_seconds`` metrics. Untrained models give showers a classifier separates easily, so the classifier
trains its full ``--max-epochs``: an upper bound for trained models (which stop early).

    python scripts/bench_evaluate_cost.py --reference 2000 --teacher-n 1000 --student-n 2000 --seeds 0 1 2 \\
        --nll-showers 300
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=int, default=2000)
    ap.add_argument("--teacher-n", type=int, default=1000)
    ap.add_argument("--student-n", type=int, default=2000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nll-showers", type=int, default=300)
    ap.add_argument("--max-epochs", type=int, default=20)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--plots", action="store_true", help="also draw the plots (timed)")
    args = ap.parse_args()

    from calodistill.flows.config import flow1_config, teacher_config
    from calodistill.flows.distillation import init_student_from_teacher
    from calodistill.flows.models import MAF, build_iaf_like
    from calodistill.flows.preprocessing import CaloFlowPreprocessor
    from calodistill.flows.sampling import ShowerGenerator
    from calodistill.flows.serialization import save_generator_dir
    from calodistill.pipeline.data.formats import write_showers
    from calodistill.pipeline.data.showers import Showers
    from calodistill.pipeline.data.synth import SynthSpec, generate_showers
    from calodistill.pipeline.stages.evaluate import evaluate_showers

    tmp = Path(tempfile.mkdtemp(prefix="evalcost-"))
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, work dir {tmp}")
    t0 = time.perf_counter()
    ref = generate_showers(SynthSpec("calogan", args.reference, seed=1))
    train = generate_showers(SynthSpec("calogan", 2000, seed=2))
    geo = ref.geometry
    torch.manual_seed(0)
    pre = CaloFlowPreprocessor(geo.layer_sizes).fit(train.incident_energy, train.voxels)
    f1cfg = flow1_config(geo.n_layers)
    f2cfg = teacher_config(geo.n_voxels, geo.n_layers, n_blocks=4, hidden_features=64)
    flow1, teacher = MAF(f1cfg), MAF(f2cfg)
    student = build_iaf_like(teacher)
    init_student_from_teacher(teacher, student)
    save_generator_dir(tmp / "teacher", pre, flow1, f1cfg, teacher, f2cfg, kind="teacher")
    save_generator_dir(tmp / "student", pre, flow1, f1cfg, student, student.config, kind="student")
    print(f"setup {time.perf_counter() - t0:.1f} s")

    files = {}
    for name, flow2, n in (("teacher", teacher, args.teacher_n), ("student", student, args.student_n)):
        gen = ShowerGenerator(pre, flow1, flow2, device="cpu")
        energies = ref.incident_energy[:n] if n <= len(ref) else train.incident_energy[:n]
        t0 = time.perf_counter()
        vox = gen.sample(energies, batch_size=min(n, 1000), seed=3)
        dt = time.perf_counter() - t0
        print(f"sample {name:7s} {n:5d} showers: {dt:6.1f} s ({n / dt:.0f} showers/s)", flush=True)
        files[name] = write_showers(Showers(geo, energies, vox), tmp / f"{name}.h5")

    metrics = evaluate_showers(
        ref, files, tmp / "eval", teacher_dir=tmp / "teacher", student_dir=tmp / "student",
        classifier={"max_epochs": args.max_epochs, "patience": args.patience}, classifier_seeds=args.seeds,
        max_showers=args.reference, likelihood_max_showers=1200, student_nll_max_showers=args.nll_showers,
        kl_samples=500, timing_batch_sizes=(1, 100), timing_max_seconds=10, sample_missing=False,
        plots=args.plots, device="cpu", seed=0,
    )
    for key in ("n_classifier", "test_nll_showers", "classifier_seconds", "likelihood_seconds", "timing_seconds",
                "plots_seconds", "evaluate_seconds"):
        if key in metrics:
            print(f"{key:20s} {metrics[key]:8.1f}")
    if "student_nll_seconds" in metrics:
        print(f"{'student_nll_seconds':20s} {metrics['student_nll_seconds']:8.2f}")
    epochs = [r["epochs"] for v in __import__("json").loads((tmp / "eval" / "details.json").read_text())
              ["classifier"].values() if isinstance(v, dict) and "runs" in v for r in v["runs"]]
    print(f"classifier runs {len(epochs)}, epochs {epochs}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
