"""The Dask cluster a pipeline runs on: the DAG's ``cluster:`` section (or ``--cluster FILE``), typed and built.

One of three forms: ``local`` (a LocalCluster on this machine, the default; its keys may also be given
flat, as ``cluster: {n_workers: 2}``), ``address`` (an existing scheduler, as ``--scheduler``), or
``jobqueue`` (SLURM, PBS, LSF or SGE batch jobs through dask-jobqueue, fixed or adaptive). Stages with
``gpu: true`` request the ``GPU`` worker resource; a cluster declares it per worker and gives each
worker process its own device (``CUDA_VISIBLE_DEVICES``), so a DAG that needs a GPU where none is fails
before anything runs.

Long because: the typed spec, its parsing and the three builders belong together (one ``cluster:`` section).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import build_config, load_config_file
from ..data.scheduler import make_scratch_dir, remove_scratch_dir
from ..errors import CalodistillError
from ..openmp import openmp_wait_defaults

if TYPE_CHECKING:
    from .dag import DagSpec

__all__ = [
    "JOBQUEUE_KINDS",
    "ClusterSpec",
    "JobqueueSpec",
    "LocalClusterSpec",
    "claim_gpu",
    "cuda_devices",
    "dask_client",
    "jobqueue_cluster",
    "jobqueue_kwargs",
    "load_cluster_file",
    "local_gpu_workers",
    "parse_cluster",
    "worker_environ",
]

logger = logging.getLogger(__name__)

#: ``jobqueue.kind`` → the dask-jobqueue cluster class.
JOBQUEUE_KINDS: dict[str, str] = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "lsf": "LSFCluster",
                                  "sge": "SGECluster"}
#: The GPU request of ``jobqueue.gpus`` per batch system (``gpu_directive`` overrides it).
_GPU_DIRECTIVES = {"slurm": "--gres=gpu:{gpus}", "lsf": '-gpu "num={gpus}"', "sge": "-l gpu={gpus}"}
_FORMS = ("local", "address", "jobqueue")


# --------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class LocalClusterSpec:
    """A Dask LocalCluster on this machine.

    Attributes:
        n_workers: worker processes (with CUDA: at most one per GPU, each holding its own device).
        threads_per_worker: task threads per worker (stages run concurrently up to this).
        memory_limit: per worker (``"8GB"``; None: Dask's share of the machine).
        processes: workers are processes (False: threads of this process).
        gpus: CUDA devices to use (None: every one found; 0: none, GPU stages are refused).
    """

    n_workers: int = 1
    threads_per_worker: int = 2
    memory_limit: str | None = None
    processes: bool = True
    gpus: int | None = None

    def __post_init__(self) -> None:
        if self.n_workers < 1:
            raise CalodistillError(f"n_workers: expected at least 1, got {self.n_workers}")
        if self.threads_per_worker < 1:
            raise CalodistillError(f"threads_per_worker: expected at least 1, got {self.threads_per_worker}")
        if self.gpus is not None and self.gpus < 0:
            raise CalodistillError(f"gpus: expected 0 or more, got {self.gpus}")


@dataclass(frozen=True)
class JobqueueSpec:
    """Dask workers in batch jobs (dask-jobqueue); the scheduler runs in the ``calodistill run`` process.

    Attributes:
        kind: the batch system: ``slurm``, ``pbs``, ``lsf`` or ``sge``.
        cores: cores per job (Dask threads of its workers in total).
        memory: memory per job (``"32GB"``).
        walltime: per job (``"02:00:00"``; LSF: ``"02:00"``).
        queue: queue or partition.
        account: account (project) charged.
        gpus: GPUs per job (requested with ``gpu_directive``); each worker gets ``GPU = gpus / processes``.
        processes: Dask worker processes per job (None: one per GPU, else 1).
        jobs: jobs started when ``maximum_jobs`` is not set.
        minimum_jobs: adaptive scaling: fewest jobs kept (with ``maximum_jobs``).
        maximum_jobs: adaptive scaling: most jobs (setting it turns adaptive scaling on).
        job_extra_directives: extra scheduler directives, one per line (``--constraint=a100``).
        job_script_prologue: shell lines run before the worker (``module load cuda``, ``source venv``).
        worker_extra_args: extra ``dask worker`` arguments.
        gpu_directive: the GPU request, ``{gpus}`` filled in (default per batch system: SLURM
            ``--gres=gpu:{gpus}``, LSF ``-gpu "num={gpus}"``, SGE ``-l gpu={gpus}``; PBS adds
            ``ngpus={gpus}`` to its ``select`` resource line).
        python: the Python that runs the workers on the compute nodes (default: this one).
        interface: network interface workers and scheduler listen on (``ib0``).
        scheduler_host: address the scheduler listens on (default: from ``interface``, else all).
        dashboard_address: the scheduler's dashboard (``":8787"``; default: any free port).
        local_directory: worker scratch space on the nodes.
        log_directory: where the batch system writes the jobs' logs.
        job_name: the batch job name.
    """

    kind: str = "slurm"
    cores: int = 1
    memory: str = "4GB"
    walltime: str = "01:00:00"
    queue: str | None = None
    account: str | None = None
    gpus: int = 0
    processes: int | None = None
    jobs: int = 1
    minimum_jobs: int = 0
    maximum_jobs: int | None = None
    job_extra_directives: tuple[str, ...] = ()
    job_script_prologue: tuple[str, ...] = ()
    worker_extra_args: tuple[str, ...] = ()
    gpu_directive: str | None = None
    python: str | None = None
    interface: str | None = None
    scheduler_host: str | None = None
    dashboard_address: str = ":0"
    local_directory: str | None = None
    log_directory: str | None = None
    job_name: str = "calodistill"

    def __post_init__(self) -> None:
        if self.kind not in JOBQUEUE_KINDS:
            raise CalodistillError(f"kind: unknown batch system {self.kind!r} (slurm, pbs, lsf or sge)")
        for name in ("cores", "jobs"):
            if getattr(self, name) < 1:
                raise CalodistillError(f"{name}: expected at least 1, got {getattr(self, name)}")
        if self.gpus < 0 or self.minimum_jobs < 0:
            raise CalodistillError(f"{'gpus' if self.gpus < 0 else 'minimum_jobs'}: expected 0 or more")
        if self.processes is not None and not 1 <= self.processes <= self.cores:
            raise CalodistillError(f"processes: expected 1 to cores ({self.cores}), got {self.processes}")
        if self.gpus and self.gpus % self.worker_processes:
            raise CalodistillError(f"gpus: {self.gpus} GPUs per job cannot be shared evenly by "
                                   f"{self.worker_processes} worker processes")
        if self.maximum_jobs is not None and self.maximum_jobs < max(1, self.minimum_jobs):
            raise CalodistillError(f"maximum_jobs: expected at least max(1, minimum_jobs), got {self.maximum_jobs}")
        for name in ("job_extra_directives", "job_script_prologue", "worker_extra_args"):
            if not all(isinstance(x, str) for x in getattr(self, name)):
                raise CalodistillError(f"{name}: expected a list of strings")

    @property
    def worker_processes(self) -> int:
        """Dask worker processes per job."""
        return self.processes if self.processes is not None else max(1, min(self.gpus, self.cores))

    @property
    def adaptive(self) -> bool:
        """Jobs are started and stopped with the load (``maximum_jobs`` set)."""
        return self.maximum_jobs is not None


@dataclass(frozen=True)
class ClusterSpec:
    """Where a pipeline's stages run: exactly one of a local cluster, a scheduler address or batch jobs.

    Attributes:
        local: LocalCluster settings (used when neither ``address`` nor ``jobqueue`` is set).
        address: an existing scheduler (``tcp://HOST:8786``).
        jobqueue: batch-job workers.
        source: where the section came from (a file, ``--scheduler``), for messages.
    """

    local: LocalClusterSpec = field(default_factory=LocalClusterSpec)
    address: str | None = None
    jobqueue: JobqueueSpec | None = None
    source: str = "defaults"

    @property
    def form(self) -> str:
        """``local``, ``address`` or ``jobqueue``."""
        return "address" if self.address else "jobqueue" if self.jobqueue else "local"


def _as_dict(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise CalodistillError(f"{where}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def parse_cluster(raw: Any, source: str) -> ClusterSpec:
    """The typed ``cluster:`` section (None or empty: a default LocalCluster).

    Args:
        raw: the section as parsed YAML.
        source: the file it came from (named in errors).

    Raises:
        CalodistillError: one line naming the file and the key: an unknown key, a wrong type, two forms at once.
    """
    data = _as_dict(raw, f"{source}: cluster")
    local_keys = [f for f in LocalClusterSpec.__dataclass_fields__]
    for key in data:
        if key not in (*_FORMS, *local_keys):
            allowed = ", ".join(sorted((*_FORMS, *local_keys)))
            raise CalodistillError(f"{source}: cluster: unknown key {key!r} (allowed: {allowed})")
    flat = [k for k in data if k in local_keys]
    if len([k for k in _FORMS if k in data]) + bool(flat) > 1:
        raise CalodistillError(f"{source}: cluster: give one of local (or its keys {', '.join(local_keys)}), "
                               f"address or jobqueue; got {', '.join(data)}")
    if "address" in data:
        address = data["address"]
        if not isinstance(address, str) or not address.strip():
            raise CalodistillError(f"{source}: cluster.address: expected a scheduler address such as "
                                   f"tcp://HOST:8786, got {address!r}")
        return ClusterSpec(address=address.strip(), source=source)
    if "jobqueue" in data:
        jq = _as_dict(data["jobqueue"], f"{source}: cluster.jobqueue")
        if "kind" not in jq:
            raise CalodistillError(f"{source}: cluster.jobqueue: missing key 'kind' (slurm, pbs, lsf or sge)")
        return ClusterSpec(jobqueue=build_config(JobqueueSpec, (jq, f"{source}: cluster.jobqueue")), source=source)
    if "local" in data:
        local = build_config(LocalClusterSpec, (_as_dict(data["local"], f"{source}: cluster.local"),
                                                f"{source}: cluster.local"))
    else:
        local = build_config(LocalClusterSpec, (data, f"{source}: cluster"))
    return ClusterSpec(local=local, source=source)


def load_cluster_file(path: str | Path) -> ClusterSpec:
    """A ``--cluster FILE``: YAML holding a ``cluster:`` section (or the section's keys at the top level)."""
    data = load_config_file(path)
    if set(data) == {"cluster"}:
        data = data["cluster"]
    return parse_cluster(data, str(path))


# ------------------------------------------------------------------------------------------------ GPUs


def cuda_devices() -> int:
    """Number of CUDA devices torch sees (0 without CUDA); counted through NVML, so CUDA stays uninitialised."""
    try:
        import torch

        return int(torch.cuda.device_count())
    except (ImportError, RuntimeError):  # pragma: no cover
        return 0


def local_gpu_workers(spec: LocalClusterSpec, devices: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The worker specs of a local GPU cluster without dask-cuda: one process per GPU, each seeing only it.

    Args:
        spec: the local cluster settings (``n_workers`` caps the number of GPU workers).
        devices: the CUDA devices to use (indices or UUIDs, as in ``CUDA_VISIBLE_DEVICES``).

    Returns:
        ``{name: {"cls": Nanny, "options": {...}}}`` for :class:`distributed.SpecCluster`: ``nthreads``,
        ``memory_limit``, ``resources={"GPU": 1}`` and ``env={"CUDA_VISIBLE_DEVICES": device}``.
    """
    from distributed import Nanny

    env = dict(worker_environ()["distributed.nanny.pre-spawn-environ"])
    workers = {}
    for i, dev in enumerate(list(devices)[: spec.n_workers]):
        options: dict[str, Any] = {
            "nthreads": spec.threads_per_worker, "resources": {"GPU": 1},
            "env": {**{k: str(v) for k, v in env.items()}, "CUDA_VISIBLE_DEVICES": str(dev),
                    "PYTORCH_NVML_BASED_CUDA_CHECK": "1"},
            "dashboard_address": None, "host": "127.0.0.1",
        }
        if spec.memory_limit:
            options["memory_limit"] = spec.memory_limit
        workers[f"gpu-{i}"] = {"cls": Nanny, "options": options}
    return workers


_CLAIM: dict[str, Any] = {}


def _gpu_lock_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"calodistill-gpu-locks-{uid}"


def claim_gpu(lock_dir: Path | None = None) -> str | None:
    """Give this worker process one GPU of its host: ``CUDA_VISIBLE_DEVICES`` set to one device it holds.

    Workers started by :func:`dask_client` see one device each already (the claim keeps it). Workers
    started otherwise (``dask worker --nworkers 2 --resources GPU=1`` on a two-GPU node, several worker
    processes of one batch job) all see every device and would all use the first. The first GPU stage in
    such a process takes the first device that no other process on the host holds (an exclusive lock on a
    file in the temporary directory, kept until the process exits) and restricts ``CUDA_VISIBLE_DEVICES``
    to it; CUDA must not be initialised in the process yet (it then keeps what it has).

    Returns:
        The device(s) this process uses (``CUDA_VISIBLE_DEVICES`` after the claim), None without CUDA.
    """
    if "device" in _CLAIM:
        return _CLAIM["device"]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [d.strip() for d in env.split(",") if d.strip()] if env is not None else \
        [str(i) for i in range(cuda_devices())]
    if not visible:
        return None
    if len(visible) > 1 and not _cuda_initialized():
        import fcntl

        directory = lock_dir or _gpu_lock_dir()
        directory.mkdir(parents=True, exist_ok=True)
        for dev in visible:
            fh = open(directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', dev)}.lock", "a")  # noqa: SIM115 - held
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            os.environ["CUDA_VISIBLE_DEVICES"] = dev
            _CLAIM.update(device=dev, lock=fh)
            logger.info("this worker process uses GPU %s (of %s)", dev, ",".join(visible))
            return dev
        logger.warning("every GPU of %s is held by another process: sharing them", ",".join(visible))
    _CLAIM["device"] = ",".join(visible)
    return _CLAIM["device"]


def _cuda_initialized() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_initialized())
    except ImportError:  # pragma: no cover
        return False


# -------------------------------------------------------------------------------------------- jobqueue


def jobqueue_kwargs(spec: JobqueueSpec) -> dict[str, Any]:
    """The keyword arguments of the dask-jobqueue cluster class for ``spec`` (GPUs, resources, account)."""
    processes = spec.worker_processes
    directives = list(spec.job_extra_directives)
    worker_args = list(spec.worker_extra_args)
    kwargs: dict[str, Any] = {
        "cores": spec.cores, "memory": spec.memory, "processes": processes, "walltime": spec.walltime,
        "queue": spec.queue, "job_name": spec.job_name, "job_script_prologue": list(spec.job_script_prologue),
        "python": spec.python or sys.executable, "interface": spec.interface,
        "local_directory": spec.local_directory, "log_directory": spec.log_directory,
        "scheduler_options": {"dashboard_address": spec.dashboard_address,
                              **({"host": spec.scheduler_host} if spec.scheduler_host else {})},
    }
    if spec.account:
        kwargs["account" if spec.kind in ("slurm", "pbs") else "project"] = spec.account
    if spec.gpus:
        worker_args += ["--resources", f"GPU={spec.gpus // processes}"]
        if spec.kind == "pbs" and spec.gpu_directive is None:
            from dask.utils import parse_bytes
            from dask_jobqueue.pbs import pbs_format_bytes_ceil

            kwargs["resource_spec"] = (f"select=1:ncpus={spec.cores}:ngpus={spec.gpus}:"
                                       f"mem={pbs_format_bytes_ceil(parse_bytes(spec.memory))}")
        else:
            template = spec.gpu_directive or _GPU_DIRECTIVES[spec.kind]
            directives.append(template.replace("{gpus}", str(spec.gpus)))
    kwargs["job_extra_directives"] = directives
    kwargs["worker_extra_args"] = worker_args
    return kwargs


def jobqueue_cluster(spec: JobqueueSpec, source: str = "cluster.jobqueue") -> Any:
    """The dask-jobqueue cluster for ``spec``: its scheduler runs here; no job is submitted until it is scaled.

    Raises:
        CalodistillError: dask-jobqueue is not installed, or rejects the settings.
    """
    try:
        import dask_jobqueue
    except ImportError:
        raise CalodistillError(f"{source}: jobqueue needs dask-jobqueue (pip install dask-jobqueue)") from None
    cls = getattr(dask_jobqueue, JOBQUEUE_KINDS[spec.kind])
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return cls(**jobqueue_kwargs(spec))
    except (ValueError, TypeError, OSError) as exc:
        raise CalodistillError(f"{source}: cluster.jobqueue: {' '.join(str(exc).split())}") from exc


# ----------------------------------------------------------------------------------------- the client


def _gpu_stage_names(dag: DagSpec) -> list[str]:
    return [s.name for s in dag.stages.values() if "GPU" in (s.dask_resources() or {})]


def _connect(address: str, where: str) -> Any:
    from distributed import Client

    try:
        return Client(address, timeout="30s")
    except OSError as exc:
        raise CalodistillError(f"{where}: cannot connect to the scheduler at {address} ({exc})") from exc


@contextlib.contextmanager
def dask_client(dag: DagSpec, scheduler: str | None = None,
                cluster: ClusterSpec | None = None) -> Iterator[tuple[Any, str]]:
    """``with dask_client(dag) as (client, address)``: the cluster of ``--scheduler``, ``--cluster`` or the DAG.

    Args:
        dag: the pipeline (its ``cluster:`` section, and which stages need a GPU).
        scheduler: a scheduler address (``--scheduler``); wins over everything.
        cluster: a cluster spec (``--cluster FILE``); wins over the DAG's.

    Raises:
        CalodistillError: the scheduler cannot be reached, or GPU stages have no GPU to run on.
    """
    spec = ClusterSpec(address=scheduler, source="--scheduler") if scheduler else (cluster or dag.cluster)
    gpu_stages = _gpu_stage_names(dag)
    if spec.address:
        where = spec.source if spec.source == "--scheduler" else f"{spec.source}: cluster.address"
        client = _connect(spec.address, where)
        try:
            if gpu_stages:
                workers = client.scheduler_info().get("workers", {}).values()
                if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers):
                    raise CalodistillError(f"{where} {spec.address}: stage(s) {', '.join(gpu_stages)} request a GPU "
                                           "but no worker has a 'GPU' resource (start workers with "
                                           "--resources GPU=1, or --set STAGE.gpu=false)")
            yield client, spec.address
        finally:
            client.close()
        return
    if spec.jobqueue is not None:
        yield from _jobqueue_client(spec, gpu_stages)
        return
    yield from _local_client(dag, spec, gpu_stages)


def _jobqueue_client(spec: ClusterSpec, gpu_stages: list[str]) -> Iterator[tuple[Any, str]]:
    from distributed import Client

    jq = spec.jobqueue
    assert jq is not None
    if gpu_stages and not jq.gpus:
        raise CalodistillError(f"{spec.source}: stage(s) {', '.join(gpu_stages)} have gpu: true but "
                               "cluster.jobqueue.gpus is 0 (ask for gpus: 1, or --set STAGE.gpu=false)")
    cluster = jobqueue_cluster(jq, spec.source)
    client = None
    try:
        if jq.adaptive:
            cluster.adapt(minimum_jobs=jq.minimum_jobs, maximum_jobs=jq.maximum_jobs)
        else:
            cluster.scale(jobs=jq.jobs)
        logger.info("%s jobs (%s), scheduler %s", jq.kind.upper(),
                    f"adaptive {jq.minimum_jobs}..{jq.maximum_jobs}" if jq.adaptive else jq.jobs,
                    cluster.scheduler_address)
        client = Client(cluster)
        yield client, cluster.scheduler_address
    finally:
        if client is not None:
            client.close()
        cluster.close()


def _local_client(dag: DagSpec, spec: ClusterSpec, gpu_stages: list[str]) -> Iterator[tuple[Any, str]]:
    import dask
    from distributed import Client

    local = spec.local
    n_found = cuda_devices()
    n_gpu = n_found if local.gpus is None else min(local.gpus, n_found)
    if gpu_stages and n_gpu == 0:
        raise CalodistillError(f"{dag.path}: stage(s) {', '.join(gpu_stages)} have gpu: true but no CUDA device "
                               f"was found (use --set {gpu_stages[0]}.gpu=false to run on the CPU)")
    scratch = make_scratch_dir()  # not Dask's default, a dask-scratch-space/ left in TMPDIR for good
    try:
        with contextlib.redirect_stdout(sys.stderr), \
                dask.config.set({**worker_environ(), "temporary-directory": str(scratch)}):
            cluster = _start_local_cluster(local, n_gpu)
        try:
            client = Client(cluster)
            try:
                yield client, cluster.scheduler_address
            finally:
                client.close()
        finally:
            cluster.close()
    finally:
        remove_scratch_dir(scratch)


def _start_local_cluster(local: LocalClusterSpec, n_gpu: int) -> Any:
    from distributed import LocalCluster

    kwargs: dict[str, Any] = {"threads_per_worker": local.threads_per_worker, "dashboard_address": None}
    if local.memory_limit:
        kwargs["memory_limit"] = local.memory_limit
    if n_gpu and local.processes:
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = [d.strip() for d in env.split(",") if d.strip()] if env else [str(i) for i in range(n_gpu)]
        devices = devices[:n_gpu]
        n_workers = min(local.n_workers, len(devices))
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            from distributed import Scheduler, SpecCluster

            logger.info("local cluster: %d GPU worker(s) on CUDA device(s) %s", n_workers,
                        ",".join(devices[:n_workers]))
            scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
            return SpecCluster(workers=local_gpu_workers(local, devices), scheduler=scheduler)
        logger.info("local cluster: dask-cuda, %d GPU worker(s) on CUDA device(s) %s", n_workers, ",".join(devices))
        return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(devices), n_workers=n_workers,
                                resources={"GPU": 1}, **kwargs)
    if n_gpu:  # one in-process worker holding every GPU
        kwargs["resources"] = {"GPU": n_gpu}
    return LocalCluster(n_workers=local.n_workers, processes=local.processes, **kwargs)


def worker_environ() -> dict[str, Any]:
    """Dask config for LocalCluster workers: Dask's environment without ``MALLOC_TRIM_THRESHOLD_``, with
    OpenMP threads that spin briefly and then sleep at barriers (:mod:`..openmp`) unless the user chose.

    Setting any ``MALLOC_*_`` variable turns off glibc's dynamic mmap threshold, so every large torch
    temporary is mmap'd and page-faulted anew and training slows markedly (measured: docs/experiments.md).
    """
    import dask

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    # with other work on the cores, torch threads that spin at barriers slowed a distillation step 3-20x
    # (docs/benchmarks.md); a user's setting, here or in our environment, wins
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if key in os.environ:
            env.setdefault(key, os.environ[key])
    for key, value in openmp_wait_defaults(env).items():
        env.setdefault(key, value)
    return {"distributed.nanny.pre-spawn-environ": env}
