"""``calodistill export``: arguments, description and example; the work is done by
:mod:`calodistill.pipeline.stages.export`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..stages.export import export_onnx

__all__ = ["configure_parser", "run_cli"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``calodistill export``."""
    parser.description = (
        "Export the student as one ONNX graph for simulators (Geant4, key4hep DDML through ONNX Runtime): "
        "incident_energy (N, 1) MeV and noise (N, layers + voxels) standard normal in, showers (N, voxels) MeV "
        "out, float32, dynamic batch; Flow I, the student and the inverse preprocessing inside; the model's "
        "geometry, particle, energy range, voxel order and versions as metadata. ONNX Runtime is checked against "
        "the torch sampler on the same noise before the file is written (float32: every shower within 1e-4 of "
        "its energy, the median voxel within 1e-5, the same zeros; fp16/int8: their differences are reported)."
    )
    parser.epilog = (
        "Examples:\n"
        "  calodistill export --model runs/quickstart/distill/model --out student.onnx\n"
        "  calodistill export --model models:/calodistill-quickstart-student@champion --out student-int8.onnx "
        "--precision int8\n"
        "  calodistill export --model runs/quickstart/distill/model --out student.onnx "
        "--teacher-log-prob teacher_log_prob.onnx"
    )
    parser.add_argument("--model", required=True,
                        help="student model directory or MLflow model URI (models:/NAME@ALIAS)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.onnx",
                        help="the sampler to write (may be left out with --teacher-log-prob)")
    parser.add_argument("--precision", default="fp32", metavar="{fp32,fp16,int8,int8-dynamic}",
                        help="the student's matrix weights: fp32 (default), fp16 (half the file), int8 (a scale "
                             "per 32 rows, ONNX Runtime's MatMulNBits: fastest at batch 1) or int8-dynamic "
                             "(ONNX Runtime's dynamic quantization: coarser)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, at least 18 (default: %(default)s)")
    parser.add_argument("--teacher-log-prob", type=Path, default=None, metavar="FILE.onnx",
                        help="also export the teacher's log-likelihood: (showers, incident_energy) -> log_prob")
    parser.add_argument("--teacher", default=None, metavar="DIR_OR_URI",
                        help="the teacher for --teacher-log-prob (default: the model directory's, or the one its "
                             "provenance records)")
    parser.add_argument("--parity-showers", type=int, default=64,
                        help="showers of the parity check (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parity check (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ URIs")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _differences(res: dict, prefix: str) -> str:
    return (f"showers differ by up to {res[f'{prefix}_max_shower_rel_diff']:.2g} of their energy; voxels by "
            f"{res[f'{prefix}_median_rel_diff']:.2g} (median), {res[f'{prefix}_max_rel_diff']:.2g} (max) relative; "
            f"{res[f'{prefix}_zero_mismatches']} voxels zero in one only")


def run_cli(args: argparse.Namespace) -> int:
    """``calodistill export``."""
    res = export_onnx(args.model, args.out, precision=args.precision, opset=args.opset,
                      teacher_log_prob=args.teacher_log_prob, teacher=args.teacher, overwrite=args.overwrite,
                      parity_n=args.parity_showers, seed=args.seed, tracking_uri=args.tracking_uri)
    meta = res["metadata"]
    if res.get("out"):
        print(f"wrote {res['out']} ({res['size_bytes'] / 1e6:.1f} MB, {res['precision']}, opset {res['opset']}, "
              f"{res['n_nodes']} nodes; {meta['geometry']}, {meta['particle'] or 'particle not recorded'})")
        print(f"parity with torch on {res['parity_showers']} showers (float32 graph): {_differences(res, 'parity')}")
        if res["precision"] != "fp32":
            print(f"{res['precision']} against torch: {_differences(res, 'fidelity')}")
    if res.get("teacher_log_prob"):
        print(f"wrote {res['teacher_log_prob']} ({res['teacher_log_prob_size_bytes'] / 1e6:.1f} MB): teacher "
              f"log-likelihood, max |ONNX - torch| {res['teacher_log_prob_max_abs_diff']:.2g} on "
              f"{res['teacher_log_prob_parity_showers']} showers")
    return 0
