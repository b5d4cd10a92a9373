"""Run a list of Dask tasks where the user asked: a fresh LocalCluster, an existing cluster, or in-process.

``scheduler=None`` (or ``"local"``) starts a ``distributed.LocalCluster`` (worker processes, one thread
each, no dashboard) and closes it afterwards; ``"tcp://HOST:8786"`` uses an existing cluster (its
workers must see the files on a shared file system); ``"threads"`` or ``"synchronous"`` run on Dask's
local schedulers (no cluster start-up: tests, notebooks, small inputs). A cluster started here keeps its
scratch space in a private directory (:func:`make_scratch_dir`), removed when it closes.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CalodistillError

__all__ = ["LOCAL_SCHEDULERS", "TaskScheduler", "make_scratch_dir", "remove_scratch_dir"]

logger = logging.getLogger(__name__)

#: Dask's in-process schedulers (no cluster).
LOCAL_SCHEDULERS = ("threads", "synchronous", "sync", "single-threaded")
_SCRATCH_PREFIX = "calodistill-dask-"


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def make_scratch_dir() -> Path:
    """A private Dask scratch directory (``$TMPDIR/calodistill-dask-HOST-PID-XXXXXXXX``) for a local cluster.

    Dask's default, ``$TMPDIR/dask-scratch-space``, is shared and never removed; this one is removed by
    :func:`remove_scratch_dir`, and those left by processes of this host that died (kill -9) are removed here.
    Pass it to the cluster as Dask's ``temporary-directory`` (scheduler, nannies and workers use it).
    """
    base = Path(tempfile.gettempdir())
    host = _host()
    for old in base.glob(f"{_SCRATCH_PREFIX}*"):
        parts = old.name[len(_SCRATCH_PREFIX):].rsplit("-", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _alive(int(parts[1])):
            logger.debug("removing %s, left by a process that died", old)
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{host}-{os.getpid()}-", dir=base))


def remove_scratch_dir(path: Path | None) -> None:
    """Remove what :func:`make_scratch_dir` made (after its cluster has closed)."""
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


class TaskScheduler:
    """``with TaskScheduler(scheduler) as ts: ts.run(tasks, on_result)``; a cluster it started is closed on exit.

    Args:
        scheduler: ``None``/``"local"``, a scheduler address, or one of :data:`LOCAL_SCHEDULERS`.
    """

    def __init__(self, scheduler: str | None) -> None:
        self.scheduler = scheduler
        self.cluster: Any = None
        self.client: Any = None
        self.scratch: Path | None = None
        self._levels: dict[str, int] = {}

    def __enter__(self) -> TaskScheduler:
        if self.scheduler in LOCAL_SCHEDULERS:
            return self
        import dask
        from distributed import Client, LocalCluster

        if self.scheduler is None or self.scheduler == "local":
            n_workers = max(1, min(8, os.cpu_count() or 1))
            # DEBUG: an error found on a worker is the one line the terminal shows (-v shows this too)
            logger.debug("starting a Dask LocalCluster (%d worker processes)", n_workers)
            self._quiet_distributed()
            self.scratch = make_scratch_dir()
            try:
                with warnings.catch_warnings(), dask.config.set({"temporary-directory": str(self.scratch)}):
                    # "Port 8787 is already in use" (its HTTP server moves on)
                    warnings.filterwarnings("ignore", message="Port .* is already in use")
                    self.cluster = LocalCluster(
                        n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                        silence_logs=logging.ERROR,
                    )
                self.client = Client(self.cluster)
            except BaseException:
                self.__exit__()
                raise
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
            remove_scratch_dir(self.scratch)
            self.scratch = None
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
