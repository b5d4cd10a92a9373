"""The cluster (pipeline/orchestration/cluster.py): the ``cluster:`` section and ``--cluster FILE``, batch job
scripts rendered without submitting anything, GPU workers each seeing their own device, GPU stages refused
where there is no GPU."""

from __future__ import annotations

import fcntl
import json
import socket
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

import calodistill.pipeline.orchestration.cluster as cluster_mod
from calodistill.pipeline.errors import CalodistillError
from calodistill.pipeline.orchestration.cluster import (
    ClusterSpec,
    LocalClusterSpec,
    claim_gpu,
    jobqueue_cluster,
    load_cluster_file,
    local_gpu_workers,
    parse_cluster,
)
from calodistill.pipeline.orchestration.dag import load_dag
from calodistill.pipeline.orchestration.runner import run_pipeline
from tests.pipeline.orchestration.test_runner import fake_dag

# ------------------------------------------------------------------------------------------- parsing


def test_cluster_section_forms() -> None:
    assert parse_cluster(None, "c.yaml") == ClusterSpec(source="c.yaml")
    flat = parse_cluster({"n_workers": 2, "processes": False}, "c.yaml")
    assert flat.form == "local" and flat.local == LocalClusterSpec(n_workers=2, processes=False)
    local = parse_cluster({"local": {"n_workers": 3, "gpus": 0}}, "c.yaml").local
    assert local == LocalClusterSpec(n_workers=3, gpus=0)
    address = parse_cluster({"address": "tcp://head:8786"}, "c.yaml")
    assert address.form == "address" and address.address == "tcp://head:8786"
    jq = parse_cluster({"jobqueue": {"kind": "slurm", "cores": 8, "memory": "32GB", "gpus": 2,
                                     "job_extra_directives": ["--constraint=a100"], "maximum_jobs": 4}}, "c.yaml")
    assert jq.form == "jobqueue" and jq.jobqueue is not None
    assert jq.jobqueue.worker_processes == 2 and jq.jobqueue.adaptive  # one worker per GPU; adaptive up to 4 jobs
    assert jq.jobqueue.job_extra_directives == ("--constraint=a100",)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"nworkers": 2}, r"c\.yaml: cluster: unknown key 'nworkers' \(allowed: address, gpus, jobqueue, local"),
        ({"local": {"n_workers": 0}}, r"c\.yaml: cluster\.local: n_workers: expected at least 1, got 0"),
        ({"local": {"threads": 2}}, r"c\.yaml: cluster\.local: unknown key 'threads'"),
        ({"address": "tcp://h:1", "n_workers": 2}, r"c\.yaml: cluster: give one of local .* got address, n_workers"),
        ({"address": 5}, r"c\.yaml: cluster\.address: expected a scheduler address"),
        ({"jobqueue": {"cores": 4}}, r"c\.yaml: cluster\.jobqueue: missing key 'kind' \(slurm, pbs, lsf or sge\)"),
        ({"jobqueue": {"kind": "condor"}}, r"c\.yaml: cluster\.jobqueue: kind: unknown batch system 'condor'"),
        ({"jobqueue": {"kind": "slurm", "walltme": "1:00"}}, r"c\.yaml: cluster\.jobqueue: unknown key 'walltme'"),
        ({"jobqueue": {"kind": "slurm", "cores": "many"}}, r"c\.yaml: cluster\.jobqueue: cores: expected an integer"),
        ({"jobqueue": {"kind": "slurm", "cores": 4, "gpus": 3, "processes": 2}},
         r"cluster\.jobqueue: gpus: 3 GPUs per job cannot be shared evenly by 2 worker processes"),
        ({"jobqueue": {"kind": "pbs", "maximum_jobs": 0}}, r"cluster\.jobqueue: maximum_jobs: expected at least"),
        ({"jobqueue": {"kind": "lsf", "job_extra_directives": [1]}},
         r"cluster\.jobqueue: job_extra_directives: expected a list of strings"),
        ([1, 2], r"c\.yaml: cluster: expected a mapping, got list"),
    ],
)
def test_cluster_section_errors_name_the_key_and_file(section: Any, message: str) -> None:
    with pytest.raises(CalodistillError, match=message):
        parse_cluster(section, "c.yaml")


def test_dag_cluster_section_and_cluster_file(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    data = yaml.safe_load(fake_dag(tmp_path, log).read_text())
    data["cluster"] = {"jobqueue": {"kind": "pbs", "cores": 4, "memory": "8GB", "queue": "short"}}
    path = tmp_path / "jq.yaml"
    path.write_text(yaml.safe_dump(data))
    dag = load_dag(path)
    assert dag.cluster.form == "jobqueue" and dag.cluster.jobqueue.queue == "short"
    data["cluster"] = {"jobqueue": {"kind": "pbs", "cores": "four"}}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CalodistillError, match=r"jq\.yaml: cluster\.jobqueue: cores: expected an integer"):
        load_dag(path)
    wrapped, bare = tmp_path / "wrapped.yaml", tmp_path / "bare.yaml"
    wrapped.write_text("cluster:\n  address: tcp://head:8786\n")
    bare.write_text("jobqueue: {kind: sge, cores: 2}\n")
    assert load_cluster_file(wrapped).address == "tcp://head:8786"
    assert load_cluster_file(bare).jobqueue.kind == "sge"
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: {jobqueue: {kind: slurm, queues: gpu}}\n")
    with pytest.raises(CalodistillError, match=r"bad\.yaml: cluster\.jobqueue: unknown key 'queues'"):
        load_cluster_file(bad)


def test_cluster_file_wins_over_the_dag_and_scheduler_excludes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from calodistill.pipeline.cli import main

    def refuse(address: str, where: str) -> Any:
        raise CalodistillError(f"{where}: would connect to {address}")

    monkeypatch.setattr(cluster_mod, "_connect", refuse)
    log = tmp_path / "calls.log"
    dag = fake_dag(tmp_path, log)  # its own cluster: an in-process LocalCluster
    site = tmp_path / "site.yaml"
    site.write_text("cluster:\n  address: tcp://head:8786\n")
    with pytest.raises(CalodistillError, match=r"site\.yaml: cluster\.address: would connect to tcp://head:8786"):
        run_pipeline(dag, run_root=tmp_path / "runs", track=False, cluster=site)
    rc = main(["run", str(dag), "--no-tracking", "--runs-dir", str(tmp_path / "runs"), "--cluster", str(site)])
    assert rc == 2 and "site.yaml: cluster.address: would connect to tcp://head:8786" in capsys.readouterr().err
    with pytest.raises(CalodistillError, match="give --scheduler or --cluster, not both"):
        run_pipeline(dag, run_root=tmp_path / "runs", track=False, cluster=site, scheduler="tcp://x:1")
    assert not log.exists()


def test_local_cluster_scratch_space_is_private_and_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DAG's LocalCluster keeps its scratch space in its own directory, not in the shared
    ``$TMPDIR/dask-scratch-space`` Dask leaves behind; nothing is left in TMPDIR once it closes."""
    import tempfile

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    dag = load_dag(fake_dag(tmp_path, tmp_path / "calls.log"))
    with cluster_mod.dask_client(dag) as (client, _):
        assert client.submit(sum, [1, 2]).result() == 3
        inside = [p.name for p in tmpdir.iterdir()]
    assert len(inside) == 1 and inside[0].startswith("calodistill-dask-")
    assert list(tmpdir.iterdir()) == []


# --------------------------------------------------------------------------------- batch job scripts


def _render(section: dict[str, Any]) -> str:
    """The job script of a jobqueue cluster, built and closed without submitting a job."""
    spec = parse_cluster({"jobqueue": {"scheduler_host": "127.0.0.1", **section}}, "site.yaml").jobqueue
    assert spec is not None
    cluster = jobqueue_cluster(spec)
    try:
        script = cluster.job_script()
        host, port = cluster.scheduler_address.removeprefix("tcp://").rsplit(":", 1)
        assert not cluster.workers and not cluster.worker_spec  # nothing was submitted
    finally:
        cluster.close()
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass  # the scheduler's port is closed again
    return script


def test_slurm_job_script() -> None:
    script = _render({"kind": "slurm", "cores": 8, "memory": "32GB", "walltime": "02:00:00", "queue": "gpu",
                      "account": "hep123", "gpus": 2, "job_extra_directives": ["--constraint=a100"],
                      "job_script_prologue": ["module load cuda/12.4"]})
    lines = script.splitlines()
    for directive in ("#SBATCH -J calodistill", "#SBATCH -p gpu", "#SBATCH -A hep123", "#SBATCH --cpus-per-task=8",
                      "#SBATCH -t 02:00:00", "#SBATCH --constraint=a100", "#SBATCH --gres=gpu:2"):
        assert directive in lines, script
    assert any(line.startswith("#SBATCH --mem=") for line in lines)
    worker = lines[-1] if lines[-1].strip() else lines[-2]
    assert "module load cuda/12.4" in lines
    assert "--nworkers 2" in worker and "--nthreads 4" in worker and "--resources GPU=1" in worker
    assert sys.executable in worker


def test_pbs_lsf_sge_job_scripts() -> None:
    pbs = _render({"kind": "pbs", "cores": 8, "memory": "16GB", "walltime": "04:00:00", "queue": "gpuq",
                   "account": "hep123", "gpus": 1, "job_extra_directives": ["-l place=excl"]}).splitlines()
    assert "#PBS -q gpuq" in pbs and "#PBS -A hep123" in pbs and "#PBS -l walltime=04:00:00" in pbs
    assert "#PBS -l place=excl" in pbs
    assert any(line.startswith("#PBS -l select=1:ncpus=8:ngpus=1:mem=") for line in pbs), pbs
    lsf = _render({"kind": "lsf", "cores": 4, "memory": "8GB", "walltime": "01:00", "gpus": 1}).splitlines()
    assert '#BSUB -gpu "num=1"' in lsf and "#BSUB -W 01:00" in lsf
    sge = _render({"kind": "sge", "cores": 2, "memory": "4GB", "gpus": 1, "queue": "all.q"}).splitlines()
    assert "#$ -l gpu=1" in sge and "#$ -q all.q" in sge
    custom = _render({"kind": "slurm", "gpus": 4, "cores": 4, "processes": 1,
                      "gpu_directive": "--gpus-per-node={gpus}"}).splitlines()
    assert "#SBATCH --gpus-per-node=4" in custom and not any("--gres" in line for line in custom)
    assert "--resources GPU=4" in custom[-1] + custom[-2]


class _FakeJobqueueCluster:
    """Stands in for a dask-jobqueue cluster: an in-process LocalCluster that records scale/adapt calls."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def __init__(self) -> None:
        from distributed import LocalCluster

        self._local = LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0")
        self.scheduler_address = self._local.scheduler_address

    def scale(self, **kwargs: Any) -> None:
        self.calls.append(("scale", kwargs))

    def adapt(self, **kwargs: Any) -> None:
        self.calls.append(("adapt", kwargs))

    def close(self) -> None:
        self.calls.append(("close", {}))
        self._local.close()

    def __getattr__(self, name: str) -> Any:  # what Client(cluster) asks of a cluster
        return getattr(self._local, name)


@pytest.mark.parametrize(("section", "call"), [({"jobs": 3}, ("scale", {"jobs": 3})),
                                               ({"minimum_jobs": 1, "maximum_jobs": 5},
                                                ("adapt", {"minimum_jobs": 1, "maximum_jobs": 5}))])
def test_jobqueue_cluster_is_scaled_then_closed(section: dict[str, Any], call: tuple[str, Any], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _FakeJobqueueCluster.calls = []
    monkeypatch.setattr(cluster_mod, "jobqueue_cluster", lambda spec, source: _FakeJobqueueCluster())
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"cluster": {"jobqueue": {"kind": "slurm", **section}}}))
    summary = run_pipeline(fake_dag(tmp_path, tmp_path / "calls.log"), run_root=tmp_path / "runs", track=False,
                           cluster=site)
    assert summary.ok, summary.format_table()
    assert _FakeJobqueueCluster.calls == [call, ("close", {})]


# ---------------------------------------------------------------------------------------------- GPUs


def test_gpu_stage_without_gpu_is_refused_before_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_mod, "cuda_devices", lambda: 0)
    log = tmp_path / "calls.log"
    data = yaml.safe_load(fake_dag(tmp_path, log).read_text())
    data["stages"]["train"]["gpu"] = True
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CalodistillError, match=r"gpu\.yaml: stage\(s\) train have gpu: true but no CUDA device"):
        run_pipeline(path, run_root=tmp_path / "runs", track=False)
    site = tmp_path / "site.yaml"
    site.write_text("jobqueue: {kind: slurm, cores: 4}\n")
    with pytest.raises(CalodistillError, match=r"site\.yaml: stage\(s\) train have gpu: true but "
                                               r"cluster\.jobqueue\.gpus is 0"):
        run_pipeline(path, run_root=tmp_path / "runs", track=False, cluster=site)
    assert not log.exists()


def test_local_gpu_worker_specs() -> None:
    workers = local_gpu_workers(LocalClusterSpec(n_workers=2, threads_per_worker=3, memory_limit="4GB"),
                                ["0", "1", "2"])
    assert list(workers) == ["gpu-0", "gpu-1"]  # n_workers caps the GPUs used
    for i, w in enumerate(workers.values()):
        opts = w["options"]
        assert opts["env"]["CUDA_VISIBLE_DEVICES"] == str(i)
        assert opts["resources"] == {"GPU": 1} and opts["nthreads"] == 3 and opts["memory_limit"] == "4GB"
        assert "MALLOC_TRIM_THRESHOLD_" not in opts["env"]


def test_gpu_stages_run_on_gpu_workers_with_their_own_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two (pretend) GPUs without dask-cuda: two worker processes, each with GPU=1 and its own
    CUDA_VISIBLE_DEVICES; the GPU stage runs on one of them and records which device it had."""
    monkeypatch.setattr(cluster_mod, "cuda_devices", lambda: 2)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # the SpecCluster fallback, even where dask-cuda is installed
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    log = tmp_path / "calls.log"
    data = yaml.safe_load(fake_dag(tmp_path, log).read_text())
    data["cluster"] = {"n_workers": 2, "threads_per_worker": 1, "processes": True}
    data["stages"]["train"]["gpu"] = True
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(data))
    summary = run_pipeline(path, run_root=tmp_path / "runs", track=False)
    assert summary.ok, summary.format_table()
    tags = json.loads((tmp_path / "runs" / "fake" / "train" / "_COMPLETE.json").read_text())["tags"]
    assert tags["cuda_visible_devices"] in {"0", "1"}
    report = json.loads((tmp_path / "runs" / "fake" / "report" / "_COMPLETE.json").read_text())["tags"]
    assert "cuda_visible_devices" not in report  # a CPU stage claims nothing


def test_claim_gpu_takes_the_first_device_no_other_process_holds(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_mod, "_cuda_initialized", lambda: False)
    monkeypatch.setattr(cluster_mod, "_CLAIM", {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with open(tmp_path / "0.lock", "a") as other:  # another worker process holds device 0
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert claim_gpu(lock_dir=tmp_path) == "1"
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert claim_gpu(lock_dir=tmp_path) == "1"  # once per process
    cluster_mod._CLAIM["lock"].close()

    monkeypatch.setattr(cluster_mod, "_CLAIM", {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc")  # one device (a worker of ours): kept as it is
    assert claim_gpu(lock_dir=tmp_path) == "GPU-abc"
    monkeypatch.setattr(cluster_mod, "_CLAIM", {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert claim_gpu(lock_dir=tmp_path) is None  # no device
