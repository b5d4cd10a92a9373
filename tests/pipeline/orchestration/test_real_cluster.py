"""Real Dask processes: ``dask scheduler`` and two one-thread ``dask worker`` processes on 127.0.0.1.

``calodistill run --scheduler`` (a subprocess) runs a tiny pipeline (ingest + a teacher) tracked in a
SQLite MLflow store while the worker training the teacher is killed (SIGKILL): Dask runs the stage again
on a live worker, which resumes it from its checkpoint; nothing half-written is left or marked complete.
``calodistill generate --scheduler --shard-size`` shards on the workers. Every process started here is
stopped by the fixture, also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.pipeline.stages.test_generate import make_model_dir

BIN = Path(sys.executable).parent
DASK = BIN / "dask"
CALODISTILL = BIN / "calodistill"
TEMPORARY = re.compile(r"^\..+\.tmp(\d*|-.+)$")  # what pipeline/atomic.py and atomic_torch_save write first

pytestmark = pytest.mark.skipif(not (DASK.exists() and CALODISTILL.exists()),
                                reason="needs the dask and calodistill commands beside the interpreter")


@dataclass
class RealCluster:
    """A running scheduler (``address``) with two one-thread workers; their logs in ``log_dir``.

    The workers have no nanny: one that is killed stays dead (and costs no restart), so what it was
    running can only go to the other.
    """

    address: str
    log_dir: Path

    def worker_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("worker-*.log")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(cmd: list[Any], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:  # the child keeps its own descriptor
        return subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its own process group: the nanny's worker goes too


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in reversed(procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 3  # then SIGKILL: nothing here needs a graceful shutdown
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if all(p.poll() is not None for p in procs):
            return


def start_real_cluster(tmp: Path, scheduler_env: dict[str, str] | None = None) -> tuple[RealCluster, list[Any]]:
    """Start the processes; returns the cluster and the processes to :func:`_stop` (also on failure)."""
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [_start([DASK, "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"],
                    tmp / "scheduler.log", {**env, **(scheduler_env or {})})]
    try:
        for i in range(2):
            procs.append(_start([DASK, "worker", address, "--name", f"w{i}", "--nthreads", 1, "--no-nanny",
                                 "--no-dashboard",
                                 "--local-directory", tmp / f"w{i}", "--death-timeout", 30],
                                tmp / f"worker-{i}.log", env))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
    except BaseException:
        _stop(procs)
        raise
    return RealCluster(address, tmp), procs


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    cluster, procs = start_real_cluster(tmp_path_factory.mktemp("real-cluster"))
    try:
        yield cluster
    finally:
        _stop(procs)


@pytest.fixture
def mlflow_dir(tmp_path: Path) -> Iterator[Path]:
    """Where the SQLite MLflow store goes: in memory (/dev/shm) where there is one, else ``tmp_path``.

    SQLite syncs every commit to disk; on this VM's disk creating MLflow's tables alone took 11 s (3.6 s
    in /dev/shm), and a tracked run commits every metric.
    """
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="calodistill-test-mlflow-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tiny_dag(tmp_path: Path, teacher_epochs: int = 2) -> Path:
    """Ingest 300 synthetic CaloGAN showers and train a tiny Flow I + teacher (seconds)."""
    data = {
        "name": "real",
        "tracking": {"experiment": "calodistill-real-cluster", "system_metrics_interval": 1},
        "stages": {
            "ingest": {"kind": "ingest", "inputs": {"sources": ["synth:calogan?n=300&seed=1&spectrum=uniform"]},
                       "params": {"geometry": "calogan", "split_seed": 0}},
            "train_teacher": {"kind": "train_teacher", "inputs": {"data": "ingest.dataset"}, "params": {
                "seed": 0, "check_samples": 0,
                "flow1": {"model": {"n_blocks": 1, "hidden_features": 8, "n_hidden_layers": 1},
                          "train": {"epochs": 1, "batch_size": 128}},
                "teacher": {"model": {"n_blocks": 1, "hidden_features": 16, "n_hidden_layers": 1, "kind": "affine"},
                            "train": {"epochs": teacher_epochs, "batch_size": 128}}}},
        },
    }
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def calodistill(*args: Any, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CALODISTILL), *map(str, args)], cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def stage_line(table: str, stage: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(stage + " "))


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if TEMPORARY.match(p.name)]


def _kill_worker_running(address: str, stage: str, progress: Path, proc: subprocess.Popen[str],
                         timeout: float = 120) -> str:
    """Wait until a worker runs ``stage`` and ``progress`` exists, SIGKILL that worker; its address."""
    from distributed import Client

    with Client(address, timeout="30s") as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before the stage could be interrupted"
            busy = [w for w, keys in client.processing().items() if any(str(k).startswith(f"{stage}-") for k in keys)]
            if busy and progress.exists():
                pid = client.run(os.getpid, workers=busy)[busy[0]]
                os.kill(pid, signal.SIGKILL)
                return busy[0]
            time.sleep(0.05)
    raise AssertionError(f"stage {stage} was not seen running with {progress}")


def _run_in_background(dag: Path, address: str, runs: Path, cwd: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(CALODISTILL), "run", str(dag), "--scheduler", address, "--runs-dir", str(runs),
                             *extra], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _run_and_kill(dag: Path, address: str, runs: Path, cwd: Path, *extra: str) -> tuple[int, str, str]:
    """``calodistill run`` in a subprocess; the worker training the teacher is killed after its first epoch."""
    proc = _run_in_background(dag, address, runs, cwd, *extra)
    try:
        _kill_worker_running(address, "train_teacher",
                             runs / "real" / "train_teacher" / "model" / "checkpoints" / "teacher" / "last.pt", proc)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def test_tracked_run_survives_a_worker_killed_mid_stage(real_cluster: RealCluster, tmp_path: Path,
                                                        mlflow_dir: Path) -> None:
    """``calodistill run --scheduler``: the stages run on the workers; the one whose worker is killed runs
    again on a live worker, resuming from its checkpoint; MLflow holds one finished run per stage."""
    from mlflow.tracking import MlflowClient

    from calodistill.pipeline.orchestration.runner import run_pipeline

    runs = tmp_path / "runs"
    uri = f"sqlite:///{mlflow_dir / 'mlflow.db'}"
    dag = tiny_dag(tmp_path, teacher_epochs=8)
    rc, out, err = _run_and_kill(dag, real_cluster.address, runs, tmp_path, "--tracking-uri", uri)
    assert rc == 0, out + err[-3000:]
    assert " ran " in stage_line(out, "ingest")
    assert "ran (resumed)" in stage_line(out, "train_teacher")
    logs = real_cluster.worker_logs()
    assert "stage ingest: done" in logs and "stage train_teacher: done" in logs  # on the workers, not here
    assert "stage train_teacher: resuming attempt" in logs
    stage_dir = runs / "real" / "train_teacher"
    assert (stage_dir / "_COMPLETE.json").is_file() and not (stage_dir / "_ATTEMPT.json").exists()
    assert {"flow1.pt", "teacher.pt", "preprocessing.json"} <= {p.name for p in (stage_dir / "model").iterdir()}
    assert list((runs / "real" / "ingest" / "dataset").glob("*.parquet"))
    assert not temporaries(runs)  # what the killed attempt was writing is gone
    history = json.loads((stage_dir / "model" / "history.json").read_text())
    assert [int(h["epoch"]) for h in history["teacher"]] == list(range(1, 9))

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("calodistill-real-cluster")
    parent = client.search_runs([exp.experiment_id], "attributes.run_name = 'real'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")}
    assert set(children) == {"ingest", "train_teacher"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert children["ingest"].data.metrics["n_showers"] == 300
    teacher_run = children["train_teacher"]
    assert np.isfinite(teacher_run.data.metrics["test_nll"])
    final = json.loads((stage_dir / "_COMPLETE.json").read_text())["metrics"]
    assert set(teacher_run.data.metrics) - set(final), "no per-epoch metric was streamed from the workers"

    again = run_pipeline(dag, scheduler=real_cluster.address, run_root=runs, track=False)
    assert [s.status for s in again.stages] == ["skipped", "skipped"]


def test_sharded_generate_on_real_workers(real_cluster: RealCluster, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``calodistill generate --scheduler --shard-size``: one task per shard on the workers, the same
    showers as sharded in this process, no partition left behind."""
    from distributed import Client, get_task_stream

    from calodistill.pipeline.cli import main
    from calodistill.pipeline.data.formats import read_showers
    from calodistill.pipeline.stages.generate import generate_showers_file

    student = make_model_dir(tmp_path / "student")
    out = tmp_path / "showers.h5"
    with Client(real_cluster.address, timeout="30s") as c, get_task_stream(c) as stream:
        rc = main(["generate", "--model", str(student), "-n", "300", "--shard-size", "100", "--batch-size", "50",
                   "--device", "cpu", "--seed", "3", "--scheduler", real_cluster.address, "--out", str(out)])
    assert rc == 0 and "wrote 300 showers" in capsys.readouterr().out
    assert sum(str(t["key"]).startswith("_generate_shard") for t in stream.data) == 3
    local = tmp_path / "local.h5"
    generate_showers_file(str(student), 300, "uniform:1GeV:100GeV", local, batch_size=50, device="cpu", seed=3,
                          shard_size=100, progress=False)
    got, want = read_showers(out), read_showers(local)
    np.testing.assert_array_equal(got.incident_energy, want.incident_energy)
    np.testing.assert_array_equal(got.voxels, want.voxels)
    assert not list(tmp_path.glob(".showers.h5.parts")) and not temporaries(tmp_path)


@pytest.mark.slow
def test_worker_deaths_beyond_allowed_failures_fail_the_stage_clearly(tmp_path: Path) -> None:
    """With no failure allowed (scheduler setting), a worker's death fails the stage in one line; rerun resumes."""
    cluster, procs = start_real_cluster(tmp_path, {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"})
    try:
        runs = tmp_path / "runs"
        dag = tiny_dag(tmp_path, teacher_epochs=10)
        stage_dir = runs / "real" / "train_teacher"
        rc, out, err = _run_and_kill(dag, cluster.address, runs, tmp_path, "--no-tracking")
        assert rc == 1, out + err[-3000:]
        line = stage_line(out, "train_teacher")
        assert "failed" in line and "worker running it died" in line
        assert "the Dask worker running it died (1 attempt" in err
        assert not (stage_dir / "_COMPLETE.json").exists() and (stage_dir / "_ATTEMPT.json").exists()
        res = calodistill("run", dag, "--scheduler", cluster.address, "--runs-dir", runs, "--no-tracking", cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr[-3000:]
        assert "ran (resumed)" in stage_line(res.stdout, "train_teacher")
        assert not temporaries(runs)
    finally:
        _stop(procs)
