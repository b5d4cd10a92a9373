"""The Dask cluster a pipeline runs on: a LocalCluster sized by the DAG's ``cluster:``, or an existing one.

A ``GPU`` resource is declared per worker when CUDA is present, so stages with ``gpu: true`` (which
request ``resources={"GPU": 1}``) run only where a GPU is; a DAG that needs one where none is fails
before anything runs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from ..errors import CalodistillError
from .dag import DagSpec

__all__ = ["cuda_devices", "dask_client", "worker_environ"]


def cuda_devices() -> int:
    """Number of CUDA devices torch sees (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover
        return 0


@contextlib.contextmanager
def dask_client(dag: DagSpec, scheduler: str | None) -> Iterator[tuple[Any, str]]:
    """``with dask_client(dag, scheduler) as (client, address)``: connect to ``scheduler``, or start a LocalCluster.

    Raises:
        CalodistillError: the scheduler cannot be reached, or GPU stages have no GPU to run on.
    """
    import dask
    from distributed import Client, LocalCluster

    needs_gpu = any(s.dask_resources() and "GPU" in (s.dask_resources() or {}) for s in dag.stages.values())
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise CalodistillError(f"--scheduler {scheduler}: cannot connect ({exc})") from exc
        try:
            if needs_gpu:
                workers = client.scheduler_info().get("workers", {}).values()
                if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers):
                    gpu_stages = [s.name for s in dag.stages.values() if s.gpu]
                    raise CalodistillError(f"--scheduler {scheduler}: stage(s) {', '.join(gpu_stages)} request a GPU "
                                           "but no worker has a 'GPU' resource (start workers with "
                                           "--resources GPU=1, or --set STAGE.gpu=false)")
            yield client, scheduler
        finally:
            client.close()
        return
    spec = dag.cluster
    n_gpu = cuda_devices()
    if needs_gpu and n_gpu == 0:
        gpu_stages = [s.name for s in dag.stages.values() if s.gpu]
        raise CalodistillError(f"{dag.path}: stage(s) {', '.join(gpu_stages)} have gpu: true but no CUDA device "
                               f"was found (use --set {gpu_stages[0]}.gpu=false to run on the CPU)")
    kwargs: dict[str, Any] = {
        "n_workers": spec.n_workers, "threads_per_worker": spec.threads_per_worker,
        "processes": spec.processes, "dashboard_address": None,
    }
    if spec.memory_limit:
        kwargs["memory_limit"] = spec.memory_limit
    if n_gpu:
        kwargs["resources"] = {"GPU": max(1, n_gpu // max(1, spec.n_workers))}
    with contextlib.redirect_stdout(sys.stderr), dask.config.set(worker_environ()):
        cluster = LocalCluster(**kwargs)
    client = Client(cluster)
    try:
        yield client, cluster.scheduler_address
    finally:
        client.close()
        cluster.close()


def worker_environ() -> dict[str, Any]:
    """Dask config for LocalCluster workers: Dask's environment without ``MALLOC_TRIM_THRESHOLD_``.

    Setting any ``MALLOC_*_`` variable turns off glibc's dynamic mmap threshold, so every large torch
    temporary is mmap'd and page-faulted anew and training slows markedly (measured: docs/experiments.md).
    """
    import dask

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    return {"distributed.nanny.pre-spawn-environ": env}
