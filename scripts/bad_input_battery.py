#!/usr/bin/env python
"""Bad-input battery: run well over 100 bad inputs through the ``calodistill`` command line, as a new user
would, and a few kill -9 faults; report what is not handled cleanly.

Not part of the test suite (it takes a few minutes). A case is *clean* when the command exits non-zero,
its stderr is exactly one line ``calodistill: error: ...`` (no traceback, no log or warning lines), and
nothing was written or left behind: the case's own directory, its ``TMPDIR`` and the shared fixtures are
as they were. The kill -9 section interrupts ingest, ingest --overwrite, a standalone train-teacher, a
sharded generate and ``calodistill run`` of a tiny quickstart DAG (its whole process group, the
LocalCluster's workers too, once during train_teacher and once during distill) mid-way, reruns them and
checks that the result equals an uninterrupted run's, that no MLflow run is left RUNNING and that no
temporary file or directory is left.

Long because: the 175 cases are data, one per line, and each kill -9 scenario has its own set-up and checks.

Usage (from the repository root)::

    .venv/bin/python scripts/bad_input_battery.py            # everything, 2 cases at a time
    .venv/bin/python scripts/bad_input_battery.py --only generate --no-kill -v
    .venv/bin/python scripts/bad_input_battery.py --no-cases --kill "dag during distill"
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TINY_TEACHER = [
    "--set", "flow1.model.n_blocks=1", "--set", "flow1.model.hidden_features=8", "--set", "flow1.train.epochs=1",
    "--set", "teacher.model.n_blocks=1", "--set", "teacher.model.hidden_features=8",
    "--set", "teacher.model.num_bins=2", "--set", "teacher.train.epochs=1", "--set", "check_samples=3",
    "--set", "check_batch_size=3", "--quiet", "--device", "cpu",
]
TINY_STUDENT = [
    "--set", "train.epochs=1", "--set", "distill.kl_samples=16", "--set", "nll_subset=4", "--set", "check_samples=8",
    "--set", "teacher_check_samples=2", "--quiet", "--device", "cpu",
]
CASE_TIMEOUT_S = 120
#: dags/quickstart.yaml in about 30 s (a few epochs each, so a kill lands between checkpoints)
TINY_DAG = [
    'ingest.inputs.sources=["synth:calogan?n=3000&seed=1&spectrum=uniform"]',
    "train_teacher.flow1.train.epochs=3", "train_teacher.teacher.train.epochs=3",
    "train_teacher.teacher.model.hidden_features=32", "train_teacher.flow1.model.hidden_features=16",
    "train_teacher.check_samples=5", "train_teacher.check_batch_size=5",
    "distill.train.epochs=3", "distill.student.hidden_features=32", "distill.distill.kl_samples=50",
    "distill.nll_subset=5", "distill.check_samples=50", "distill.teacher_check_samples=5",
    "distill.timing_batch=100", "distill.teacher_timing_batch=5", "distill.timing_repeats=1",
    "generate_student.n=200", "generate_teacher.n=100", "generate_teacher.batch_size=100",
    "evaluate.max_showers=200", "evaluate.likelihood_max_showers=100", "evaluate.student_nll_max_showers=5",
    "evaluate.kl_samples=50", "evaluate.timing_batch_sizes=[1]", "evaluate.classifier={max_epochs: 2, patience: 1}",
]


def cli() -> list[str]:
    script = Path(sys.executable).with_name("calodistill")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "calodistill.pipeline.cli.main"]


def environment(tmpdir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return env


def run(argv: list[str], cwd: Path, timeout: float = CASE_TIMEOUT_S, tmpdir: Path | None = None,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*cli(), *argv], cwd=cwd, env=environment(tmpdir), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"fixture command failed: calodistill {' '.join(argv)}\n{proc.stderr}")
    return proc


# ------------------------------------------------------------------------------------------- fixtures
def make_fixtures(f: Path) -> None:
    """Tiny valid inputs via the command line, then broken copies of them."""
    import h5py
    import numpy as np
    import torch

    t0 = time.perf_counter()
    run(["synth", "-n", "300", "--seed", "1", "--out", "s.h5"], f, check=True)
    run(["synth", "-n", "120", "--seed", "2", "--out", "s.parquet"], f, check=True)
    run(["synth", "--geometry", "calochallenge-1-photons", "-n", "60", "--seed", "3", "--spectrum", "ladder",
         "--out", "cc.h5"], f, check=True)
    for src, out in (("s.h5", "ds"), ("s.parquet", "ds2"), ("cc.h5", "ds_cc")):
        run(["ingest", src, "--out", out, "--scheduler", "synchronous", "--no-progress"], f, check=True)
    run(["train-teacher", "--data", "ds", "--out", "teacher", *TINY_TEACHER], f, check=True)
    run(["distill", "--teacher", "teacher", "--data", "ds", "--out", "student", *TINY_STUDENT], f, check=True)

    from calodistill.pipeline.data.formats import read_showers, write_showers

    showers = read_showers(f / "s.h5")
    write_showers(showers.subset(np.arange(50)), f / "s.csv")
    raw = (f / "s.h5").read_bytes()
    (f / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4096))
    (f / "empty.h5").write_bytes(b"")
    (f / "trunc.h5").write_bytes(raw[: len(raw) // 3])
    pq = (f / "s.parquet").read_bytes()
    (f / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(2048) + b"PAR1")
    (f / "trunc.parquet").write_bytes(pq[: len(pq) // 2])
    (f / "garbage.csv").write_text("a,b,c\n1,x,3\n")
    (f / "text.h5").write_text("this is not HDF5\n")
    (f / "notes.txt").write_text("plain text\n")
    shutil.copy(f / "s.h5", f / "nan.h5")
    with h5py.File(f / "nan.h5", "r+") as h5:
        h5["layer_0"][3, 0, 0] = np.nan
    shutil.copy(f / "s.h5", f / "neg.h5")
    with h5py.File(f / "neg.h5", "r+") as h5:
        h5["energy"][2] = -10.0
    with h5py.File(f / "wrongkeys.h5", "w") as h5:
        h5["foo"] = np.zeros((5, 3))
    with h5py.File(f / "wrongshape.h5", "w") as h5:
        h5["incident_energies"] = np.full((5, 1), 1e4)
        h5["showers"] = np.zeros((5, 7))
    (f / "empty_dir").mkdir()

    def model_copy(name: str) -> Path:
        return Path(shutil.copytree(f / "student", f / name, ignore=shutil.ignore_patterns("checkpoints")))

    (model_copy("badmodel") / "student.pt").write_bytes(b"not a torch file\x00" * 10)
    (model_copy("badpre") / "preprocessing.json").write_text("{")
    (model_copy("truncmodel") / "student.pt").write_bytes((f / "student" / "student.pt").read_bytes()[:500])
    evil = model_copy("evil")
    torch.save({"state": _Evil()}, evil / "student.pt")  # a pickle that would run code if loaded unsafely
    wrongkind = Path(shutil.copytree(f / "teacher", f / "wrongkind", ignore=shutil.ignore_patterns("checkpoints")))
    shutil.copy(f / "student" / "student.pt", wrongkind / "teacher.pt")  # an IAF where the MAF teacher belongs
    (f / "conf_unknown.yaml").write_text("teacher:\n  train:\n    epochz: 3\n")
    (f / "conf_broken.yaml").write_text("teacher: [1,\n")
    (f / "conf_list.yaml").write_text("- 1\n- 2\n")
    (f / "dag_broken.yaml").write_text("name: x\nstages: [\n")
    (f / "dag_kind.yaml").write_text("name: x\nstages:\n  a: {kind: nosuch, outputs: [o]}\n")
    (f / "dag_cycle.yaml").write_text(
        "name: x\nstages:\n  a: {kind: generate, inputs: {model: b.model}, outputs: {showers: a.h5}, params: {n: 5}}\n"
        "  b: {kind: distill, inputs: {teacher: a.showers, data: a.showers}, outputs: [model]}\n")
    (f / "dag_missing_input.yaml").write_text(
        "name: x\nstages:\n  g: {kind: generate, inputs: {model: nowhere/model}, outputs: {showers: g.h5}, "
        "params: {n: 5}}\n")
    print(f"fixtures ready in {time.perf_counter() - t0:.0f} s: {f}", flush=True)


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch PWNED",))


# ---------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One bad input: the command line (``{F}`` fixtures, ``{C}`` the case's own directory)."""

    group: str
    name: str
    argv: list[str]
    setup: Callable[[Path], None] | None = None
    teardown: Callable[[Path], None] | None = None
    note: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def _locked(c: Path) -> None:
    """``{C}/locked``: a directory nobody may write into (root too, with the immutable attribute)."""
    d = c / "locked"
    d.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
            raise RuntimeError("root without chattr +i: cannot make an unwritable directory")
    else:
        d.chmod(0o500)


def _unlock(c: Path) -> None:
    d = c / "locked"
    if d.exists():
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(d)], capture_output=True)
        d.chmod(0o700)


def _mkdir(name: str) -> Callable[[Path], None]:
    return lambda c: (c / name).mkdir(parents=True)


def _file(name: str, text: str = "x") -> Callable[[Path], None]:
    return lambda c: (c / name).write_text(text)


def cases() -> list[Case]:
    out: list[Case] = []

    def add(group: str, name: str, *argv: str, **kw: Any) -> None:
        out.append(Case(group, name, list(argv), **kw))

    lock = {"setup": _locked, "teardown": _unlock}
    # ---- top level and argument syntax
    add("cli", "unknown command", "nosuch")
    add("cli", "unknown option", "generate", "--modle", "{F}/student", "-n", "3", "--out", "{C}/x.h5")
    add("cli", "missing required", "generate")
    # ---- synth
    g = "synth"
    add(g, "n zero", "synth", "-n", "0", "--out", "{C}/x.h5")
    add(g, "n negative", "synth", "-n", "-5", "--out", "{C}/x.h5")
    add(g, "n not a number", "synth", "-n", "abc", "--out", "{C}/x.h5")
    add(g, "unknown geometry", "synth", "--geometry", "nosuch", "-n", "3", "--out", "{C}/x.h5")
    add(g, "unknown extension", "synth", "-n", "3", "--out", "{C}/x.txt")
    add(g, "directory as --out", "synth", "-n", "3", "--out", "{C}/d.h5", setup=_mkdir("d.h5"))
    add(g, "missing parent", "synth", "-n", "3", "--out", "{C}/nodir/x.h5")
    add(g, "negative energy", "synth", "-n", "3", "--energy", "-5", "--out", "{C}/x.h5")
    add(g, "energy not a number", "synth", "-n", "3", "--energy", "abc", "--out", "{C}/x.h5")
    add(g, "chunk size zero", "synth", "-n", "3", "--chunk-size", "0", "--out", "{C}/x.h5")
    add(g, "unknown particle", "synth", "-n", "3", "--particle", "muon", "--out", "{C}/x.h5")
    add(g, "negative impact spread", "synth", "-n", "3", "--impact-spread", "-1", "--out", "{C}/x.h5")
    add(g, "unknown spectrum", "synth", "-n", "3", "--spectrum", "weird", "--out", "{C}/x.h5")
    add(g, "existing output", "synth", "-n", "3", "--out", "{F}/s.h5")
    add(g, "unwritable directory", "synth", "-n", "3", "--out", "{C}/locked/x.h5", **lock)
    add(g, "unwritable system directory", "synth", "-n", "3", "--out", "/sys/calodistill-x.h5")
    add(g, "under a regular file", "synth", "-n", "3", "--out", "{F}/s.h5/x.h5")
    add(g, "impact spread on a cylindrical geometry", "synth", "--geometry", "calochallenge-1-photons", "-n", "3",
        "--impact-spread", "5", "--out", "{C}/x.h5")
    # ---- ingest
    g = "ingest"
    sync = ("--scheduler", "synchronous", "--no-progress")
    add(g, "missing source", "ingest", "{F}/nowhere.h5", "--out", "{C}/ds", *sync)
    add(g, "directory as source", "ingest", "{F}/empty_dir", "--out", "{C}/ds", *sync)
    add(g, "empty file", "ingest", "{F}/empty.h5", "--out", "{C}/ds", *sync)
    add(g, "corrupt HDF5", "ingest", "{F}/corrupt.h5", "--out", "{C}/ds", *sync)
    add(g, "truncated HDF5", "ingest", "{F}/trunc.h5", "--out", "{C}/ds", *sync)
    add(g, "text file named .h5", "ingest", "{F}/text.h5", "--out", "{C}/ds", *sync)
    add(g, "HDF5 without shower keys", "ingest", "{F}/wrongkeys.h5", "--out", "{C}/ds", *sync)
    add(g, "HDF5 with an unknown voxel count", "ingest", "{F}/wrongshape.h5", "--out", "{C}/ds", *sync)
    add(g, "NaN voxel", "ingest", "{F}/nan.h5", "--out", "{C}/ds", *sync)
    add(g, "negative incident energy", "ingest", "{F}/neg.h5", "--out", "{C}/ds", *sync)
    add(g, "corrupt Parquet", "ingest", "{F}/corrupt.parquet", "--out", "{C}/ds", *sync)
    add(g, "truncated Parquet", "ingest", "{F}/trunc.parquet", "--out", "{C}/ds", *sync)
    add(g, "CSV without shower columns", "ingest", "{F}/garbage.csv", "--out", "{C}/ds", *sync)
    add(g, "unknown extension", "ingest", "{F}/notes.txt", "--out", "{C}/ds", *sync)
    add(g, "unknown geometry", "ingest", "{F}/s.h5", "--geometry", "nosuch", "--out", "{C}/ds", *sync)
    add(g, "wrong geometry for the file", "ingest", "{F}/s.h5", "--geometry", "calochallenge-1-photons",
        "--out", "{C}/ds", *sync)
    add(g, "mixed geometries", "ingest", "{F}/s.h5", "{F}/cc.h5", "--out", "{C}/ds", *sync)
    add(g, "same file twice", "ingest", "{F}/s.h5", "{F}/s.h5", "--out", "{C}/ds", *sync)
    add(g, "same content twice", "ingest", "{F}/s.h5", "{C}/copy.h5", "--out", "{C}/ds", *sync,
        setup=lambda c: shutil.copy(c.parent.parent / "fixtures" / "s.h5", c / "copy.h5"))
    add(g, "same synthetic source twice", "ingest", "synth:calogan?n=5", "synth:calogan?n=5", "--out", "{C}/ds",
        *sync)
    add(g, "fractions not summing to 1", "ingest", "{F}/s.h5", "--split-fractions", "0.5,0.4", "--out", "{C}/ds",
        *sync)
    add(g, "fractions not numbers", "ingest", "{F}/s.h5", "--split-fractions", "a,b,c", "--out", "{C}/ds", *sync)
    add(g, "negative fraction", "ingest", "{F}/s.h5", "--split-fractions", "1.2,-0.1,-0.1", "--out", "{C}/ds",
        *sync)
    add(g, "partition size zero", "ingest", "{F}/s.h5", "--partition-mb", "0", "--out", "{C}/ds", *sync)
    add(g, "existing dataset", "ingest", "{F}/s.h5", "--out", "{F}/ds", *sync)
    add(g, "existing foreign directory with --overwrite", "ingest", "{F}/s.h5", "--out", "{C}/mine", "--overwrite",
        *sync, setup=lambda c: (c / "mine").mkdir() or (c / "mine" / "thesis.tex").write_text("x"))
    add(g, "a file as --out", "ingest", "{F}/s.h5", "--out", "{F}/s.csv", *sync)
    add(g, "under a regular file", "ingest", "{F}/s.h5", "--out", "{F}/s.h5/ds", *sync)
    add(g, "unwritable directory", "ingest", "{F}/s.h5", "--out", "{C}/locked/ds", *sync, **lock)
    add(g, "unknown synthetic geometry", "ingest", "synth:nosuch?n=5", "--out", "{C}/ds", *sync)
    add(g, "synthetic n negative", "ingest", "synth:calogan?n=-1", "--out", "{C}/ds", *sync)
    add(g, "synthetic n not a number", "ingest", "synth:calogan?n=abc", "--out", "{C}/ds", *sync)
    add(g, "synthetic unknown key", "ingest", "synth:calogan?n=5&bogus=1", "--out", "{C}/ds", *sync)
    add(g, "bad --columns", "ingest", "{F}/s.csv", "--columns", "nonsense", "--out", "{C}/ds", *sync)
    add(g, "--columns naming no column", "ingest", "{F}/s.csv", "--columns", "incident_energy=E", "--out", "{C}/ds",
        *sync)
    add(g, "unknown scheduler", "ingest", "{F}/s.h5", "--scheduler", "bogus", "--out", "{C}/ds")
    add(g, "corrupt HDF5 on the default LocalCluster", "ingest", "{F}/corrupt.h5", "--out", "{C}/ds",
        "--no-progress")
    add(g, "NaN voxel on the default LocalCluster", "ingest", "{F}/nan.h5", "--out", "{C}/ds", "--no-progress")
    # ---- train-teacher
    g = "train-teacher"
    tt = ("train-teacher", "--out", "{C}/m")
    add(g, "missing dataset", *tt, "--data", "{F}/nowhere", *TINY_TEACHER)
    add(g, "a file as dataset", *tt, "--data", "{F}/s.h5", *TINY_TEACHER)
    add(g, "not a dataset", *tt, "--data", "{F}/empty_dir", *TINY_TEACHER)
    add(g, "a model as dataset", *tt, "--data", "{F}/teacher", *TINY_TEACHER)
    add(g, "unknown --set key", *tt, "--data", "{F}/ds", *TINY_TEACHER, "--set", "teacher.train.epochz=3")
    add(g, "--set value of the wrong type", *tt, "--data", "{F}/ds", *TINY_TEACHER, "--set", "teacher.train.epochs=many")
    add(g, "--set negative learning rate", *tt, "--data", "{F}/ds", *TINY_TEACHER, "--set", "teacher.train.lr=-1")
    add(g, "--set zero batch size", *tt, "--data", "{F}/ds", *TINY_TEACHER, "--set", "teacher.train.batch_size=0")
    add(g, "--set unknown flow kind", *tt, "--data", "{F}/ds", *TINY_TEACHER, "--set", "teacher.model.kind=magic")
    add(g, "--set unknown schedule", *tt, "--data", "{F}/ds", *TINY_TEACHER, "--set", "teacher.train.schedule=linear")
    add(g, "--set without =", *tt, "--data", "{F}/ds", *TINY_TEACHER, "--set", "epochs")
    add(g, "--set negative blocks", *tt, "--data", "{F}/ds", *TINY_TEACHER, "--set", "teacher.model.n_blocks=-2")
    add(g, "missing --config", *tt, "--data", "{F}/ds", *TINY_TEACHER, "--config", "{F}/nowhere.yaml")
    add(g, "--config unknown key", *tt, "--data", "{F}/ds", *TINY_TEACHER, "--config", "{F}/conf_unknown.yaml")
    add(g, "--config invalid YAML", *tt, "--data", "{F}/ds", *TINY_TEACHER, "--config", "{F}/conf_broken.yaml")
    add(g, "--config a list", *tt, "--data", "{F}/ds", *TINY_TEACHER, "--config", "{F}/conf_list.yaml")
    add(g, "--config a directory", *tt, "--data", "{F}/ds", *TINY_TEACHER, "--config", "{F}/empty_dir")
    add(g, "unknown device", *tt, "--data", "{F}/ds", *TINY_TEACHER, "--device", "tpu")
    add(g, "a file as --out", "train-teacher", "--data", "{F}/ds", "--out", "{F}/s.h5", *TINY_TEACHER)
    add(g, "under a regular file", "train-teacher", "--data", "{F}/ds", "--out", "{F}/s.h5/m", *TINY_TEACHER)
    add(g, "unwritable directory", "train-teacher", "--data", "{F}/ds", "--out", "{C}/locked/m", *TINY_TEACHER,
        **lock)
    add(g, "a foreign directory as --out", "train-teacher", "--data", "{F}/ds", "--out", "{F}", *TINY_TEACHER)
    add(g, "rerun with other data", "train-teacher", "--data", "{F}/ds2", "--out", "{F}/teacher", *TINY_TEACHER)
    add(g, "rerun with other settings", "train-teacher", "--data", "{F}/ds", "--out", "{F}/teacher", *TINY_TEACHER,
        "--set", "teacher.train.epochs=2")
    add(g, "into a student directory", "train-teacher", "--data", "{F}/ds", "--out", "{F}/student", *TINY_TEACHER)
    # ---- distill
    g = "distill"
    ds = ("distill", "--out", "{C}/s")
    add(g, "missing teacher", *ds, "--teacher", "{F}/nowhere", "--data", "{F}/ds", *TINY_STUDENT)
    add(g, "a student as teacher", *ds, "--teacher", "{F}/student", "--data", "{F}/ds", *TINY_STUDENT)
    add(g, "a dataset as teacher", *ds, "--teacher", "{F}/ds", "--data", "{F}/ds", *TINY_STUDENT)
    add(g, "an IAF saved as teacher.pt", *ds, "--teacher", "{F}/wrongkind", "--data", "{F}/ds", *TINY_STUDENT)
    add(g, "missing dataset", *ds, "--teacher", "{F}/teacher", "--data", "{F}/nowhere", *TINY_STUDENT)
    add(g, "dataset of another geometry", *ds, "--teacher", "{F}/teacher", "--data", "{F}/ds_cc", *TINY_STUDENT)
    add(g, "unknown student key", *ds, "--teacher", "{F}/teacher", "--data", "{F}/ds", *TINY_STUDENT,
        "--set", "student.width=3")
    add(g, "negative student width", *ds, "--teacher", "{F}/teacher", "--data", "{F}/ds", *TINY_STUDENT,
        "--set", "student.hidden_features=-1")
    add(g, "unknown activation", *ds, "--teacher", "{F}/teacher", "--data", "{F}/ds", *TINY_STUDENT,
        "--set", "student.activation=wiggle")
    add(g, "--out is the teacher", "distill", "--teacher", "{F}/teacher", "--data", "{F}/ds", "--out", "{F}/teacher",
        *TINY_STUDENT)
    add(g, "rerun with other settings", "distill", "--teacher", "{F}/teacher", "--data", "{F}/ds", "--out",
        "{F}/student", *TINY_STUDENT, "--set", "train.epochs=3")
    add(g, "rerun with other data", "distill", "--teacher", "{F}/teacher", "--data", "{F}/ds2", "--out",
        "{F}/student", *TINY_STUDENT)
    add(g, "under a regular file", "distill", "--teacher", "{F}/teacher", "--data", "{F}/ds", "--out",
        "{F}/s.h5/s", *TINY_STUDENT)
    # ---- generate
    g = "generate"
    gen = ("generate", "--device", "cpu")
    ok = ("--model", "{F}/student")
    add(g, "missing model", *gen, "--model", "{F}/nowhere", "-n", "3", "--out", "{C}/x.h5")
    add(g, "a dataset as model", *gen, "--model", "{F}/ds", "-n", "3", "--out", "{C}/x.h5")
    add(g, "an empty directory as model", *gen, "--model", "{F}/empty_dir", "-n", "3", "--out", "{C}/x.h5")
    add(g, "a file as model", *gen, "--model", "{F}/s.h5", "-n", "3", "--out", "{C}/x.h5")
    add(g, "corrupt flow file", *gen, "--model", "{F}/badmodel", "-n", "3", "--out", "{C}/x.h5")
    add(g, "truncated flow file", *gen, "--model", "{F}/truncmodel", "-n", "3", "--out", "{C}/x.h5")
    add(g, "invalid preprocessing JSON", *gen, "--model", "{F}/badpre", "-n", "3", "--out", "{C}/x.h5")
    add(g, "malicious pickle in the flow file", *gen, "--model", "{F}/evil", "-n", "3", "--out", "{C}/x.h5")
    add(g, "models:/ URI without a store", *gen, "--model", "models:/calodistill-student@champion", "-n", "3",
        "--out", "{C}/x.h5")
    add(g, "runs:/ URI without a store", *gen, "--model", "runs:/0123456789abcdef/student", "-n", "3",
        "--out", "{C}/x.h5")
    add(g, "n zero", *gen, *ok, "-n", "0", "--out", "{C}/x.h5")
    add(g, "n negative", *gen, *ok, "-n", "-1", "--out", "{C}/x.h5")
    add(g, "n not an integer", *gen, *ok, "-n", "1.5", "--out", "{C}/x.h5")
    add(g, "energy far above the training range", *gen, *ok, "-n", "3", "--energies", "1e9GeV", "--out", "{C}/x.h5")
    add(g, "energy far below the training range", *gen, *ok, "-n", "3", "--energies", "1MeV", "--out", "{C}/x.h5")
    add(g, "range reaching beyond training", *gen, *ok, "-n", "3", "--energies", "loguniform:1GeV:1TeV",
        "--out", "{C}/x.h5")
    add(g, "negative energy", *gen, *ok, "-n", "3", "--energies=-5GeV", "--out", "{C}/x.h5")
    add(g, "zero energy", *gen, *ok, "-n", "3", "--energies", "0GeV", "--out", "{C}/x.h5")
    add(g, "unknown unit", *gen, *ok, "-n", "3", "--energies", "50furlongs", "--out", "{C}/x.h5")
    add(g, "electronvolts", *gen, *ok, "-n", "3", "--energies", "50eV", "--out", "{C}/x.h5")
    add(g, "NaN energy", *gen, *ok, "-n", "3", "--energies", "nan", "--out", "{C}/x.h5")
    add(g, "infinite energy", *gen, *ok, "-n", "3", "--energies", "infGeV", "--out", "{C}/x.h5")
    add(g, "range upside down", *gen, *ok, "-n", "3", "--energies", "uniform:10GeV:1GeV", "--out", "{C}/x.h5")
    add(g, "range without high", *gen, *ok, "-n", "3", "--energies", "uniform:1GeV", "--out", "{C}/x.h5")
    add(g, "unknown range kind", *gen, *ok, "-n", "3", "--energies", "gauss:1GeV:2GeV", "--out", "{C}/x.h5")
    add(g, "empty energies", *gen, *ok, "-n", "3", "--energies", "", "--out", "{C}/x.h5")
    add(g, "list with garbage", *gen, *ok, "-n", "3", "--energies", "1GeV,,x", "--out", "{C}/x.h5")
    add(g, "ladder with an argument", *gen, *ok, "-n", "3", "--energies", "ladder:3", "--out", "{C}/x.h5")
    add(g, "existing output", *gen, *ok, "-n", "3", "--energies", "50GeV", "--out", "{F}/s.h5")
    add(g, "existing Parquet output", *gen, *ok, "-n", "3", "--energies", "50GeV", "--out", "{F}/s.parquet")
    add(g, "unknown extension", *gen, *ok, "-n", "3", "--energies", "50GeV", "--out", "{C}/x.txt")
    add(g, "a directory as --out", *gen, *ok, "-n", "3", "--energies", "50GeV", "--out", "{C}")
    add(g, "under a regular file", *gen, *ok, "-n", "3", "--energies", "50GeV", "--out", "{F}/s.h5/x.h5")
    add(g, "unwritable directory", *gen, *ok, "-n", "3", "--energies", "50GeV", "--out", "{C}/locked/x.h5", **lock)
    add(g, "unwritable system directory", *gen, *ok, "-n", "3", "--energies", "50GeV", "--out", "/sys/cd-x.h5")
    add(g, "batch size zero", *gen, *ok, "-n", "3", "--energies", "50GeV", "--batch-size", "0", "--out", "{C}/x.h5")
    add(g, "shard size negative", *gen, *ok, "-n", "3", "--energies", "50GeV", "--shard-size", "-4",
        "--out", "{C}/x.h5")
    add(g, "unknown device", "generate", *ok, "-n", "3", "--energies", "50GeV", "--device", "tpu",
        "--out", "{C}/x.h5")
    add(g, "seed not a number", *gen, *ok, "-n", "3", "--seed", "abc", "--out", "{C}/x.h5")
    add(g, "unreachable scheduler", *gen, *ok, "-n", "3", "--energies", "50GeV", "--shard-size", "2",
        "--scheduler", "tcp://127.0.0.1:9", "--out", "{C}/x.h5")
    # ---- evaluate
    g = "evaluate"
    ev = ("evaluate", "--no-classifier", "--no-plots", "--timing-batches")
    add(g, "missing reference", *ev, "--reference", "{F}/nowhere", "--generated", "{F}/s.h5", "--out", "{C}/e")
    add(g, "corrupt reference", *ev, "--reference", "{F}/corrupt.h5", "--generated", "{F}/s.h5", "--out", "{C}/e")
    add(g, "missing generated file", *ev, "--reference", "{F}/ds", "--generated", "{F}/nowhere.h5", "--out", "{C}/e")
    add(g, "corrupt generated file", *ev, "--reference", "{F}/ds", "--generated", "{F}/corrupt.h5", "--out", "{C}/e")
    add(g, "generated file of another geometry", *ev, "--reference", "{F}/ds", "--generated", "{F}/cc.h5",
        "--out", "{C}/e")
    add(g, "reserved label", *ev, "--reference", "{F}/ds", "--generated", "reference={F}/s.h5", "--out", "{C}/e")
    add(g, "nothing to evaluate", *ev, "--reference", "{F}/ds", "--out", "{C}/e")
    add(g, "a file as --out", *ev, "--reference", "{F}/ds", "--generated", "{F}/s.h5", "--out", "{F}/s.csv")
    add(g, "under a regular file", *ev, "--reference", "{F}/ds", "--generated", "{F}/s.h5", "--out", "{F}/s.h5/e")
    add(g, "unwritable directory", *ev, "--reference", "{F}/ds", "--generated", "{F}/s.h5", "--out",
        "{C}/locked/e", **lock)
    add(g, "existing foreign directory", *ev, "--reference", "{F}/ds", "--generated", "{F}/s.h5", "--out", "{F}",
        "--overwrite")
    add(g, "max showers below 2", *ev, "--reference", "{F}/ds", "--generated", "{F}/s.h5", "--max-showers", "1",
        "--out", "{C}/e")
    add(g, "unknown geometry", *ev, "--reference", "{F}/s.h5", "--generated", "{F}/s.h5", "--geometry", "nosuch",
        "--out", "{C}/e")
    add(g, "a student as --teacher", *ev, "--reference", "{F}/ds", "--teacher", "{F}/student", "--out", "{C}/e")
    add(g, "corrupt --student", *ev, "--reference", "{F}/ds", "--student", "{F}/badmodel", "--out", "{C}/e")
    add(g, "threshold not a number", *ev, "--reference", "{F}/ds", "--generated", "{F}/s.h5", "--threshold", "abc",
        "--out", "{C}/e")
    add(g, "energy bins zero", *ev, "--reference", "{F}/ds", "--generated", "{F}/s.h5", "--energy-bins", "0",
        "--out", "{C}/e")
    # ---- bench
    g = "bench"
    be = ("bench", "--quick", "--device", "cpu")
    add(g, "unknown geometry", *be, "--geometry", "nosuch")
    add(g, "unknown section", *be, "--sections", "nosuch")
    add(g, "batches not numbers", *be, "--batches", "a,b")
    add(g, "batch zero", *be, "--batches", "0")
    add(g, "budget zero", *be, "--budget-s", "0")
    add(g, "repeats zero", *be, "--repeats", "0")
    add(g, "threads zero", *be, "--threads", "0", "--sections", "floor", "--batches", "1")
    add(g, "missing model directory", *be, "--model-dir", "{F}/nowhere")
    add(g, "a dataset as model directory", *be, "--model-dir", "{F}/ds")
    add(g, "corrupt model directory", *be, "--model-dir", "{F}/badmodel", "--sections", "floor")
    add(g, "existing --out", *be, "--out", "{F}/s.csv")
    add(g, "unwritable --out", *be, "--out", "{C}/locked/b.json", **lock)
    add(g, "--out under a regular file", *be, "--out", "{F}/s.h5/b.json")
    # ---- run
    g = "run"
    rn = ("--runs-dir", "{C}/runs", "--no-tracking")
    add(g, "missing DAG file", "run", "{F}/nowhere.yaml", *rn)
    add(g, "a directory as DAG", "run", "{F}/empty_dir", *rn)
    add(g, "invalid YAML", "run", "{F}/dag_broken.yaml", *rn)
    add(g, "unknown stage kind", "run", "{F}/dag_kind.yaml", *rn)
    add(g, "a cycle", "run", "{F}/dag_cycle.yaml", *rn)
    add(g, "missing input file", "run", "{F}/dag_missing_input.yaml", *rn)
    add(g, "unknown --set stage", "run", "dags/quickstart.yaml", *rn, "--set", "nosuch.x=1")
    add(g, "bad --set value", "run", "dags/quickstart.yaml", *rn, "--set", "generate_student.n=-5")
    return out


# ---------------------------------------------------------------------------------------------- checks
def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (hidden ones included; directories end in ``/``) with its size and
    modification time."""
    out: dict[str, tuple[int, int]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            is_dir = p.is_dir() and not p.is_symlink()
            # a directory's own time changes when something is made and removed inside: only contents count
            out[str(p.relative_to(root)) + ("/" if is_dir else "")] = (0, 0) if is_dir else (st.st_size, st.st_mtime_ns)
    return out


def changes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    modified = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return [f"+{k}" for k in added] + [f"-{k}" for k in removed] + [f"~{k}" for k in modified]


_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")


def run_case(case: Case, root: Path, fixtures_before: dict[str, tuple[int, int]]) -> Case:
    f = root / "fixtures"
    c = root / "cases" / re.sub(r"[^A-Za-z0-9]+", "_", f"{case.group}_{case.name}")
    c.mkdir(parents=True)
    tmp = c / ".tmp"
    tmp.mkdir()
    try:
        if case.setup is not None:
            case.setup(c)
        before = snapshot(c)
        argv = [a.replace("{F}", str(f)).replace("{C}", str(c)) for a in case.argv]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([*cli(), *argv], cwd=c if "dags/" not in " ".join(argv) else REPO,
                                  env=environment(tmp), capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
            rc, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired:
            rc, stderr = None, f"(timed out after {CASE_TIMEOUT_S} s)\n"
        seconds = time.perf_counter() - t0
        written = changes(before, snapshot(c))
        fixtures_changed = changes(fixtures_before, snapshot(f))
    finally:
        if case.teardown is not None:
            case.teardown(c)
    lines = stderr.splitlines()
    problems: list[str] = []
    if rc is None:
        problems.append("timeout")
    elif rc == 0:
        problems.append("exit 0")
    if "Traceback" in stderr:
        problems.append("traceback")
    if len(lines) != 1 or not lines[0].startswith("calodistill: error: "):
        kinds = "log lines" if lines and all(_LOG_LINE.match(x) or x.startswith("calodistill: error") for x in lines) \
            else "lines"
        problems.append(f"stderr {len(lines)} {kinds}")
    if written:
        problems.append(f"wrote {', '.join(written[:3])}{' ...' if len(written) > 3 else ''}")
    if fixtures_changed:
        problems.append(f"changed fixtures {', '.join(fixtures_changed[:3])}")
    case.result = {"rc": rc, "seconds": seconds, "problems": problems, "stderr": stderr, "argv": argv}
    return case


REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- kill -9
def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _kill_when(argv: list[str], cwd: Path, predicate: Callable[[], bool], delay: float = 0.0,
               timeout: float = 120.0, tmpdir: Path | None = None) -> str:
    """Start the command, kill -9 it (and its process group) once ``predicate`` holds; how it ended."""
    proc = subprocess.Popen([*cli(), *argv], cwd=cwd, env=environment(tmpdir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    hit = _wait_for(lambda: predicate() or proc.poll() is not None, timeout)
    if proc.poll() is not None:
        return f"finished before the kill (rc {proc.returncode})"
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # every process of the group (Dask's nanny and worker processes) must be gone, as after a power cut
    survivors = _wait_for(lambda: not _group_alive(proc.pid), 10.0)
    return ("killed" if hit else "killed at the timeout") + ("" if survivors else " (group still alive!)")


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, which nothing may reap here, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name != ".tmp")


KillResult = tuple[str, bool, str]


def _kill_ingest(root: Path, k: Path) -> list[KillResult]:
    """ingest killed while partitions are written: the rerun gives the uninterrupted run's dataset; then
    ingest --overwrite killed while replacing: the old dataset stays whole, the rerun replaces it."""
    from calodistill.pipeline.data.dataset import dataset_hash

    results: list[KillResult] = []
    src = "synth:calogan?n=20000&seed=5"
    sync = ["--scheduler", "synchronous", "--no-progress", "--partition-mb", "4"]
    run(["ingest", src, "--out", "ref_ds", *sync], k, timeout=300, check=True)
    how = _kill_when(["ingest", src, "--out", "ds", *sync], k,
                     lambda: any(p.name.startswith(".ds.ingest-") and any(p.iterdir()) for p in k.iterdir()), 0.3)
    left = _leftovers(k)
    proc = run(["ingest", src, "--out", "ds", *sync], k, timeout=300)
    ok = proc.returncode == 0 and dataset_hash(k / "ds") == dataset_hash(k / "ref_ds") and not _leftovers(k)
    results.append(("ingest", ok, (f"{how}; left {left or 'nothing'}; rerun rc {proc.returncode}, same dataset "
                                   f"hash: {ok}, leftovers after rerun: {_leftovers(k) or 'none'}")))

    old_hash = dataset_hash(k / "ds")
    src2 = "synth:calogan?n=20000&seed=6"
    run(["ingest", src2, "--out", "ref_ds2", *sync], k, timeout=300, check=True)
    how = _kill_when(["ingest", src2, "--out", "ds", "--overwrite", *sync], k,
                     lambda: any(p.name.startswith(".ds.ingest-") and any(p.iterdir()) for p in k.iterdir()), 0.3)
    intact = dataset_hash(k / "ds") == old_hash
    proc = run(["ingest", src2, "--out", "ds", "--overwrite", *sync], k, timeout=300)
    ok = intact and proc.returncode == 0 and dataset_hash(k / "ds") == dataset_hash(k / "ref_ds2") and not _leftovers(k)
    results.append(("ingest --overwrite", ok, (f"{how}; old dataset intact after the kill: {intact}; rerun rc "
                                               f"{proc.returncode}; leftovers: {_leftovers(k) or 'none'}")))
    return results


def _kill_train_teacher(root: Path, k: Path) -> list[KillResult]:
    """Standalone train-teacher killed after Flow I's first checkpoint: the rerun resumes to the same model."""
    sync = ["--scheduler", "synchronous", "--no-progress"]
    run(["ingest", "synth:calogan?n=3000&seed=7", "--out", "tds", *sync], k, timeout=300, check=True)
    train = ["--set", "flow1.model.n_blocks=2", "--set", "flow1.model.hidden_features=16",
             "--set", "flow1.train.epochs=4", "--set", "teacher.model.n_blocks=1",
             "--set", "teacher.model.hidden_features=16", "--set", "teacher.train.epochs=2",
             "--set", "check_samples=0", "--quiet", "--device", "cpu"]
    run(["train-teacher", "--data", "tds", "--out", "ref_teacher", *train], k, timeout=600, check=True)
    how = _kill_when(["train-teacher", "--data", "tds", "--out", "teacher", *train], k,
                     lambda: (k / "teacher" / "checkpoints" / "flow1" / "last.pt").exists(), 0.2)
    proc = run(["train-teacher", "--data", "tds", "--out", "teacher", *train], k, timeout=600)
    same = all((k / "teacher" / n).read_bytes() == (k / "ref_teacher" / n).read_bytes()
               for n in ("flow1.pt", "teacher.pt", "preprocessing.json")) if proc.returncode == 0 else False
    stale = [p.name for p in (k / "teacher").rglob(".*")]
    return [("train-teacher", proc.returncode == 0 and same and not stale,
             (f"{how}; rerun rc {proc.returncode}; flows identical to an uninterrupted run: {same}; "
              f"temporary files: {stale or 'none'}"))]


def _kill_generate(root: Path, k: Path) -> list[KillResult]:
    """Sharded generate killed after two partitions: the rerun samples the rest, same showers."""
    import numpy as np

    from calodistill.pipeline.data.formats import read_showers

    gen = ["generate", "--model", str(root / "fixtures" / "student"), "-n", "4000", "--energies",
           "uniform:2GeV:90GeV", "--shard-size", "200", "--batch-size", "100", "--device", "cpu"]
    run([*gen, "--out", "ref.h5"], k, timeout=300, check=True)
    how = _kill_when([*gen, "--out", "g.h5"], k,
                     lambda: len(list((k / ".g.h5.parts").glob("part-*.h5"))) >= 2 if (k / ".g.h5.parts").exists()
                     else False)
    proc = run([*gen, "--out", "g.h5"], k, timeout=300)
    same = proc.returncode == 0 and np.array_equal(read_showers(k / "g.h5").voxels, read_showers(k / "ref.h5").voxels)
    timed = re.search(r"timed on the (\d+) sampled now; (\d+) reused", proc.stdout)
    return [("sharded generate", same and not _leftovers(k),
             (f"{how}; rerun rc {proc.returncode}; same showers: {same}; "
              f"{'timing: ' + timed.group(0) if timed else 'no shard reused'}; leftovers: {_leftovers(k) or 'none'}"))]


# --------------------------------------------------------------------------------- kill -9 of a DAG run
_TIMING_METRIC = re.compile(r"time|seconds|ms_per|_s$|per_s|speedup")
_MODEL_FILES = {"train_teacher": ("flow1.pt", "teacher.pt", "preprocessing.json"),
                "distill": ("flow1.pt", "student.pt", "preprocessing.json")}


def _dag_argv(d: Path) -> list[str]:
    sets = [x for o in TINY_DAG for x in ("--set", o)]
    return ["run", str(REPO / "dags" / "quickstart.yaml"), "--runs-dir", str(d / "runs"),
            "--tracking-uri", f"sqlite:///{d / 'mlflow.db'}", *sets]


def _dag_results(d: Path) -> dict[str, Any]:
    """Each stage's non-timing metrics (from its completion marker) and the model files' SHA-256."""
    stages = d / "runs" / "quickstart"
    out: dict[str, Any] = {}
    for marker in sorted(stages.glob("*/_COMPLETE.json")):
        record = json.loads(marker.read_text())
        for key, value in record["metrics"].items():
            if not _TIMING_METRIC.search(key):
                out[f"{record['stage']}.{key}"] = value
    for stage, names in _MODEL_FILES.items():
        for name in names:
            path = stages / stage / "model" / name
            out[f"{stage}/{name}"] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return out


def _running_runs(d: Path) -> list[str]:
    """The MLflow runs of the DAG still RUNNING (none may be left once the rerun has finished).

    Read with sqlite3, a new connection each time: MLflow's client keeps the database of a URI open, and
    every run of the DAG uses the same path (an earlier run's database is moved aside, still open).
    """
    import sqlite3

    db = d / "mlflow.db"
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        rows = con.execute("SELECT name FROM runs WHERE status = 'RUNNING' AND lifecycle_stage = 'active'").fetchall()
    return sorted(str(name) for (name,) in rows)


#: what libraries leave in TMPDIR on purpose: torch's compile cache, onnxruntime's telemetry session file
_LIBRARY_FILES = re.compile(r"^(torchinductor_.*|\.ses)$")


def _stray_paths(d: Path, tmpdir: Path) -> tuple[list[str], list[str]]:
    """Temporary paths left behind (hidden ``*.tmp*`` names and Dask scratch space in the run directory,
    anything in ``TMPDIR``), and the libraries' own files in ``TMPDIR`` (:data:`_LIBRARY_FILES`)."""
    stray = [str(p.relative_to(d)) for p in (d / "runs").rglob("*")
             if (p.name.startswith(".") and ".tmp" in p.name) or "dask-scratch-space" in p.name
             or p.name.startswith("calodistill-dask-")]
    stray += [f"TMPDIR/{p.name}" for p in tmpdir.iterdir() if not _LIBRARY_FILES.match(p.name)]
    return sorted(stray), sorted(p.name for p in tmpdir.iterdir() if _LIBRARY_FILES.match(p.name))


def _kill_dag(root: Path, k: Path) -> list[KillResult]:
    """``calodistill run`` of a tiny quickstart killed (the whole process group) during train_teacher and
    during distill, then rerun: the rerun completes with the uninterrupted run's results.

    Every run uses the same directory (moved aside afterwards), as a user's rerun does: files that record
    where they were made (the ONNX export's metadata) then compare equal too.
    """
    d = k / "dag"
    (d / "tmp").mkdir(parents=True)
    t0 = time.perf_counter()
    proc = run(_dag_argv(d), d, timeout=600, tmpdir=d / "tmp")
    if proc.returncode != 0:
        return [("dag (uninterrupted)", False, f"rc {proc.returncode}: {proc.stderr.strip()[-300:]}")]
    ref_s = time.perf_counter() - t0
    expected = _dag_results(d)
    stray, library = _stray_paths(d, d / "tmp")
    results: list[KillResult] = [
        ("dag (uninterrupted reference)", not stray and not _running_runs(d),
         f"{ref_s:.0f} s; leftovers: {stray or 'none'}{f' (library files in TMPDIR: {library})' if library else ''}")]
    d.rename(k / "dag_reference")
    for stage, checkpoint in (("train_teacher", "teacher"), ("distill", "student")):
        (d / "tmp").mkdir(parents=True)
        last = d / "runs" / "quickstart" / stage / "model" / "checkpoints" / checkpoint / "last.pt"
        how = _kill_when(_dag_argv(d), d, last.exists, timeout=600, tmpdir=d / "tmp")
        running_after_kill = len(_running_runs(d))
        t0 = time.perf_counter()
        proc = run(_dag_argv(d), d, timeout=600, tmpdir=d / "tmp")
        rerun_s = time.perf_counter() - t0
        got = _dag_results(d)
        common = sorted(set(expected) & set(got))
        differ = [key for key in common if expected[key] != got[key]]
        one_sided = sorted(set(expected) ^ set(got))  # the code changed between the runs (someone's edit)
        running = _running_runs(d)
        stray, library = _stray_paths(d, d / "tmp")
        row = re.search(rf"^{stage}\s.*", proc.stdout, re.MULTILINE)
        ok = proc.returncode == 0 and bool(common) and not differ and not running and not stray and how == "killed"
        detail = "; ".join(f"{key} {expected[key]!r} != {got[key]!r}" for key in differ[:6])
        text = (f"{how} after {checkpoint} epoch 1 ({running_after_kill} MLflow runs left RUNNING); "
                f"rerun rc {proc.returncode} in {rerun_s:.0f} s, {stage}: "
                f"{' '.join(row.group(0).split()[2:4]) if row else '?'}; "
                f"{len(common) - len(differ)}/{len(common)} results (metrics, model digests) equal the "
                f"uninterrupted run's{': ' + detail if differ else ''}"
                f"{f' ({len(one_sided)} metrics in one run only)' if one_sided else ''}; "
                f"RUNNING after the rerun: {running or 'none'}; leftovers: {stray or 'none'}"
                f"{f' (library files in TMPDIR: {library})' if library else ''}")
        results.append((f"dag during {stage}", ok, text))
        d.rename(k / f"dag_killed_in_{stage}")
    return results


KILL_SCENARIOS: dict[str, Callable[[Path, Path], list[KillResult]]] = {
    "ingest": _kill_ingest, "train-teacher": _kill_train_teacher, "sharded generate": _kill_generate,
    "dag": _kill_dag,
}


def kill_section(root: Path, wanted: list[str] | None = None) -> list[KillResult]:
    """Interrupt commands with SIGKILL mid-way; rerun; compare with an uninterrupted run."""
    k = root / "kill"
    k.mkdir()
    results: list[KillResult] = []
    for name, scenario in KILL_SCENARIOS.items():
        if not wanted or any(w in name for w in wanted):
            results += scenario(root, k)
    return results


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="cases run at the same time (default 2)")
    parser.add_argument("--only", default=None, metavar="TEXT[,TEXT...]",
                        help="only cases whose group or name contains one of these texts")
    parser.add_argument("--no-kill", action="store_true", help="skip the kill -9 section")
    parser.add_argument("--no-cases", action="store_true", help="skip the bad inputs (kill -9 section only)")
    parser.add_argument("--kill", default=None, metavar="TEXT[,TEXT...]",
                        help=f"only these kill -9 scenarios ({', '.join(KILL_SCENARIOS)})")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case's stderr")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="calodistill-battery-"))
    t0 = time.perf_counter()
    try:
        (root / "fixtures").mkdir()
        kills = [] if args.no_kill else [w for w in (args.kill or "").split(",") if w]
        kill_fixtures = not args.no_kill and (not kills or any(w in "sharded generate" for w in kills))
        if not args.no_cases or kill_fixtures:
            make_fixtures(root / "fixtures")
        wanted = [w for w in (args.only or "").split(",") if w]
        todo = [] if args.no_cases else [c for c in cases()
                                         if not wanted or any(w in c.group or w in c.name for w in wanted)]
        fixtures_before = snapshot(root / "fixtures")
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            done = list(pool.map(lambda c: run_case(c, root, fixtures_before), todo))
        clean = [c for c in done if not c.result["problems"]]
        print(f"\n{len(done)} bad inputs, {len(clean)} clean ({100 * len(clean) / max(1, len(done)):.1f} %), "
              f"{len(done) - len(clean)} not:")
        by_group: dict[str, list[int]] = {}
        for c in done:
            counts = by_group.setdefault(c.group, [0, 0])
            counts[0] += 1
            counts[1] += not c.result["problems"]
        print("  " + ", ".join(f"{g} {n_clean}/{n}" for g, (n, n_clean) in by_group.items()))
        for c in done:
            if c.result["problems"] or args.verbose:
                status = "; ".join(c.result["problems"]) or "clean"
                print(f"- [{c.group}] {c.name}: {status} (rc {c.result['rc']}, {c.result['seconds']:.1f} s)")
                lines = c.result["stderr"].strip().splitlines()
                for line in (lines if args.verbose else lines[-1:]):
                    print(f"    {line[:300]}")
        slowest = sorted(done, key=lambda c: -c.result["seconds"])[:5]
        print("slowest: " + ", ".join(f"[{c.group}] {c.name} {c.result['seconds']:.0f} s" for c in slowest))
        killed: list[KillResult] = []
        if not args.no_kill:
            print("\nkill -9:", flush=True)
            killed = kill_section(root, kills)
            for name, ok, detail in killed:
                print(f"- {name}: {'ok' if ok else 'NOT OK'}: {detail}")
        scenarios = [ok for name, ok, _ in killed if "reference" not in name]  # not the uninterrupted DAG run
        summary = {"cases": len(done), "clean": len(clean), "kill_scenarios": len(scenarios),
                   "kill_exact": sum(scenarios), "seconds": round(time.perf_counter() - t0)}
        print(f"\n{json.dumps(summary)}")
        return 0 if len(clean) >= 0.95 * len(done) and all(ok for _, ok, _ in killed) else 1
    finally:
        for locked in root.glob("cases/*/locked"):
            _unlock(locked.parent)
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
