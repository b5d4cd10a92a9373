"""``calodistill evaluate``: arguments, description and example; the work is done by
:mod:`calodistill.pipeline.stages.evaluate`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..atomic import atomic_dir
from ..errors import CalodistillError
from ..metrics.observables import DEFAULT_THRESHOLD_MEV
from ..metrics.timing import DEFAULT_TIMING_BATCHES
from ..outputs import check_output_dir, removing_created_parents
from ..stages.evaluate import evaluate_showers

__all__ = ["configure_parser", "run_cli"]

#: What ``evaluate`` writes into --out: a directory holding only these may be replaced (--overwrite).
EVALUATION_OUTPUTS = frozenset({"metrics.json", "details.json", "report.md", "plots"})


def _is_evaluation_dir(path: Path) -> bool:
    return all(p.name in EVALUATION_OUTPUTS or p.name.startswith(".") for p in path.iterdir())


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``calodistill evaluate``."""
    parser.description = (
        "Compare generated showers with a reference the way the CaloChallenge 2022 did: separation powers of\n"
        "high-level observables, classifier AUCs (low- and high-level) against the reference and a\n"
        "reference-vs-reference baseline, and with --teacher/--student the likelihoods per incident-energy\n"
        "bin, KL(student||teacher) and the sampling time per shower. Writes metrics.json, details.json,\n"
        "plots/ and report.md into --out."
    )
    parser.epilog = (
        "Example:\n"
        "  calodistill evaluate --reference runs/quickstart/dataset --generated runs/quickstart/student.h5 \\\n"
        "      --out runs/quickstart/evaluation --teacher runs/quickstart/teacher --student runs/quickstart/student"
    )
    parser.add_argument("--reference", required=True, help="dataset directory (its test split is used) or a shower file")
    parser.add_argument("--generated", nargs="+", default=[], metavar="FILE",
                        help="generated shower files; the label is the file stem, or give LABEL=FILE")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--teacher", help="teacher model directory (likelihoods, timing)")
    parser.add_argument("--student", help="student model directory (likelihoods, KL, timing)")
    parser.add_argument("--geometry", metavar="NAME_OR_FILE",
                        help="preset name, geometry YAML or binning XML, when the files do not say")
    parser.add_argument("--sample-missing", action=argparse.BooleanOptionalAction, default=True,
                        help="sample teacher/student showers from --teacher/--student when no file of that label "
                        "is given (default: yes)")
    parser.add_argument("--model-samples", type=int, default=10_000, help="showers sampled per model at most")
    parser.add_argument("--classifier-preset", choices=("cpu", "calochallenge"), default="cpu",
                        help="cpu: 3x128 network (default); calochallenge: 3x512, lr 2e-4, batch 1000")
    parser.add_argument("--classifier-epochs", type=int, help="maximum classifier epochs")
    parser.add_argument("--no-classifier", action="store_true", help="skip the classifier tests")
    parser.add_argument("--classifier-all-showers", action="store_true",
                        help="give the classifier every shower of each generated sample (default: the smallest "
                             "sample's size for all, so their AUCs compare)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD_MEV, help="sparsity threshold in MeV")
    parser.add_argument("--max-showers", type=int, default=50_000, help="cap on every sample (seeded subset)")
    parser.add_argument("--energy-bins", type=int, default=5, help="incident-energy bins of the likelihoods")
    parser.add_argument("--timing-batches", type=int, nargs="*", default=list(DEFAULT_TIMING_BATCHES),
                        help="batch sizes of the sampling timing (none: skip)")
    parser.add_argument("--device", help="torch device (default: cuda when present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true", help="skip the figures")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing evaluation in --out")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``calodistill evaluate`` and print the headline numbers."""
    classifier: dict[str, Any] = {"preset": args.classifier_preset}
    if args.classifier_epochs is not None:
        classifier["max_epochs"] = args.classifier_epochs
    if args.max_showers is not None and args.max_showers < 2:
        raise CalodistillError(f"--max-showers: at least 2 expected, got {args.max_showers}")
    for option, value in (("--energy-bins", args.energy_bins), ("--model-samples", args.model_samples)):
        if value < 1:
            raise CalodistillError(f"{option}: at least 1 expected, got {value}")
    if any(b < 1 for b in args.timing_batches or ()):
        raise CalodistillError(f"--timing-batches: positive batch sizes expected, got {args.timing_batches}")
    out = check_output_dir(args.out, overwrite=args.overwrite, replaceable=_is_evaluation_dir,
                           what="an evaluation directory")
    # written beside --out and renamed into place: a failed evaluation leaves nothing, not an empty --out
    with removing_created_parents(out), atomic_dir(out, "evaluate") as tmp:
        metrics = _evaluate(args, classifier, tmp)
    keys = [k for k in metrics if k.startswith(("auc_", "sep_max_", "nll_teacher", "nll_student", "kl_student_teacher"))
            and "_ebin" not in k]
    width = max((len(k) for k in keys), default=10)
    for k in keys:
        print(f"{k:<{width}}  {metrics[k]:.4f}")
    print(f"written: {out / 'metrics.json'}, {out / 'report.md'}, {out / 'plots'}/")
    return 0


def _evaluate(args: argparse.Namespace, classifier: dict[str, Any], out: Path) -> dict[str, float]:
    return evaluate_showers(
        Path(args.reference),
        list(args.generated),
        out,
        teacher_dir=args.teacher,
        student_dir=args.student,
        classifier=classifier,
        run_classifier=not args.no_classifier,
        threshold=args.threshold,
        n_energy_bins=args.energy_bins,
        max_showers=args.max_showers,
        timing_batch_sizes=tuple(args.timing_batches or ()),
        sample_missing=args.sample_missing,
        model_samples=args.model_samples,
        geometry=args.geometry,
        device=args.device,
        seed=args.seed,
        plots=not args.no_plots,
        classifier_equal_sizes=not args.classifier_all_showers,
    )
