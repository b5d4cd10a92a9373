"""Run a list of Dask tasks where the user asked: a fresh LocalCluster, an existing cluster, or in-process.

``scheduler=None`` (or ``"local"``) starts a ``distributed.LocalCluster`` (worker processes, one thread
each, no dashboard) and closes it afterwards; ``"tcp://HOST:8786"`` uses an existing cluster (its
workers must see the files on a shared file system); ``"threads"`` or ``"synchronous"`` run on Dask's
local schedulers (no cluster start-up: tests, notebooks, small inputs).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

from ..errors import CalodistillError

__all__ = ["LOCAL_SCHEDULERS", "TaskScheduler"]

logger = logging.getLogger(__name__)

#: Dask's in-process schedulers (no cluster).
LOCAL_SCHEDULERS = ("threads", "synchronous", "sync", "single-threaded")


class TaskScheduler:
    """``with TaskScheduler(scheduler) as ts: ts.run(tasks, on_result)``; a cluster it started is closed on exit.

    Args:
        scheduler: ``None``/``"local"``, a scheduler address, or one of :data:`LOCAL_SCHEDULERS`.
    """

    def __init__(self, scheduler: str | None) -> None:
        self.scheduler = scheduler
        self.cluster: Any = None
        self.client: Any = None
        self._levels: dict[str, int] = {}

    def __enter__(self) -> TaskScheduler:
        if self.scheduler in LOCAL_SCHEDULERS:
            return self
        from distributed import Client, LocalCluster

        if self.scheduler is None or self.scheduler == "local":
            n_workers = max(1, min(8, os.cpu_count() or 1))
            logger.info("starting a Dask LocalCluster (%d worker processes)", n_workers)
            self._quiet_distributed()
            with warnings.catch_warnings():  # "Port 8787 is already in use" (its HTTP server moves on)
                warnings.filterwarnings("ignore", message="Port .* is already in use")
                self.cluster = LocalCluster(
                    n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                    silence_logs=logging.ERROR,
                )
            self.client = Client(self.cluster)
            from ..worker_logs import register_worker_logging

            register_worker_logging(self.client)  # a CalodistillError on a worker: no "Compute Failed" block
        else:
            try:
                self.client = Client(self.scheduler, timeout="10s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise CalodistillError(f"scheduler {self.scheduler}: cannot connect: {' '.join(str(exc).split())}") from None
        return self

    def _quiet_distributed(self) -> None:
        """Keep the scheduler's and nannies' INFO chatter off the terminal while our cluster lives."""
        for name in ["distributed", *logging.root.manager.loggerDict]:
            if name.startswith("distributed"):
                log = logging.getLogger(name)
                if log.level <= logging.INFO:
                    self._levels[name] = log.level
                    log.setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        try:
            if self.client is not None:
                self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        finally:
            for name, level in self._levels.items():
                logging.getLogger(name).setLevel(level)

    def run(self, tasks: list[Any], on_result: Callable[[Any], None]) -> None:
        """Compute the delayed ``tasks``, calling ``on_result`` with each result as it finishes."""
        if self.client is None:
            import dask
            from dask.callbacks import Callback

            keys = {t.key for t in tasks}

            class _Progress(Callback):
                def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
                    if key in keys:
                        on_result(result)

            with _Progress():
                dask.compute(*tasks, scheduler=self.scheduler)
            return
        from distributed import as_completed

        futures = self.client.compute(tasks)
        try:
            for fut in as_completed(futures):
                on_result(fut.result())
        finally:
            self.client.cancel(futures)
