"""Published CaloChallenge 2022 numbers (arXiv:2410.21611) to put beside ours in the evaluation report.

Read from the leaderboard files (``CALODISTILL_RESULTS_DIR`` or ``../shared/data/real/calochallenge-results``
beside the checkout); the CaloFlow numbers on dataset 1 photons are built in for when no file can be read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

__all__ = ["RESULTS_FILES", "CALOFLOW_DS1_PHOTONS", "results_dir", "published_results"]

logger = logging.getLogger(__name__)

# The CaloChallenge 2022 leaderboard file of each geometry (arXiv:2410.21611, CaloChallenge/homepage).
RESULTS_FILES = {
    "calochallenge-1-photons": "CaloChallenge_results_ds1_photons.hdf",
    "calochallenge-1-pions": "CaloChallenge_results_ds1_pions.hdf",
    "calochallenge-2": "CaloChallenge_results_ds2.hdf",
    "calochallenge-3": "CaloChallenge_results_ds3.hdf",
}
# Published dataset-1-photons numbers of CaloFlow (the leaderboard file above), used when that file cannot
# be read: AUC low / high level, time per shower at batch 10 000 in ms (GPU / CPU).
CALOFLOW_DS1_PHOTONS = {
    "GEANT4": {"auc_low": 0.49916, "auc_high": 0.49945},
    "CaloFlow teacher": {"auc_low": 0.73298, "auc_high": 0.63586, "time_gpu_10000": 8.130995, "time_cpu_10000": 1911.648107},
    "CaloFlow student": {"auc_low": 0.76064, "auc_high": 0.66658, "time_gpu_10000": 0.261481, "time_cpu_10000": 6.108367},
}
_SUBMISSIONS = ("GEANT4", "CaloFlow teacher", "CaloFlow student", "CaloFlow")
_COLUMNS = {"auc_low": "binary cls low", "auc_high": "binary cls high",
            "time_gpu_10000": "time GPU 10000", "time_cpu_10000": "time CPU 10000"}


def results_dir() -> Path | None:
    """The folder of the leaderboard files: ``CALODISTILL_RESULTS_DIR``, else ``../shared/data/real/
    calochallenge-results`` beside the checkout; None when neither exists."""
    env = os.environ.get("CALODISTILL_RESULTS_DIR")
    candidates = [Path(env)] if env else []
    # pipeline/report/leaderboard.py → the checkout is parents[2], the folder beside it parents[3]
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data" / "real" / "calochallenge-results")
    return next((c for c in candidates if c.is_dir()), None)


def published_results(geometry_name: str) -> tuple[str, dict[str, dict[str, float]]]:
    """Published CaloChallenge 2022 numbers of GEANT4 and CaloFlow on the geometry's dataset.

    Reads the leaderboard file (needs pandas + tables). For a geometry that is not a CaloChallenge
    dataset, or when the file cannot be read, the CaloFlow numbers on dataset 1 photons are returned
    for orientation (the caption says so).

    Returns:
        ``(caption, {submission: {auc_low, auc_high, time_gpu_10000, time_cpu_10000}})``.
    """
    name = geometry_name if geometry_name in RESULTS_FILES else "calochallenge-1-photons"
    caption = f"CaloChallenge 2022, {name.replace('calochallenge-', 'dataset ')} (arXiv:2410.21611)"
    if name != geometry_name:
        caption += f" — a different geometry from {geometry_name}, for orientation only"
    rdir = results_dir()
    if rdir is not None and (rdir / RESULTS_FILES[name]).is_file():
        try:
            import pandas as pd

            df = pd.read_hdf(rdir / RESULTS_FILES[name])
            rows: dict[str, dict[str, float]] = {}
            for _, row in df.iterrows():
                sub = str(row["submission name"])
                if sub not in _SUBMISSIONS:
                    continue
                vals = {key: row.get(column) for key, column in _COLUMNS.items()}
                rows[sub] = {k: float(v) for k, v in vals.items() if v is not None and np.isfinite(float(v))}
            if rows:
                return caption, rows
        except Exception as exc:  # noqa: BLE001 - an optional table; fall back to the constants
            logger.info("published results: cannot read %s (%s); using built-in numbers", rdir, exc)
    if name != "calochallenge-1-photons":
        return caption + " (leaderboard file not found)", {}
    return caption, {k: dict(v) for k, v in CALOFLOW_DS1_PHOTONS.items()}
