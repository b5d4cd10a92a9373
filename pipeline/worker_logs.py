"""A Dask worker plugin that keeps the workers' log records off the user's terminal.

Registered by whoever opens a Dask client for calodistill work (the pipeline runner, the ingest's task
scheduler). On every worker it drops the "Compute Failed" record of an expected error
(:class:`~calodistill.pipeline.logs.ExpectedErrorFilter`). A worker process that writes to the same
terminal as the process that registered the plugin (a LocalCluster's workers) and a run log file given:
its records and Python warnings go to that file instead of the terminal (to both, when the registering
process itself shows INFO records on its terminal: ``-v``). Removing the plugin
(``client.unregister_worker_plugin``, or the worker closing) undoes both.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from .logs import (
    FILE_FORMAT,
    install_expected_error_filter,
    open_run_log,
    remove_expected_error_filter,
    stream_identity,
)

__all__ = ["WorkerLogging", "register_worker_logging"]

logger = logging.getLogger(__name__)


def _terminal_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    """Every (logger, handler) pair writing to this process's stderr or stdout."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    streams = {id(s) for s in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) if s is not None}
    found = []
    for lg in loggers:
        for handler in lg.handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and (id(stream) in streams or getattr(stream, "name", None) in ("<stderr>", "<stdout>")):
                found.append((lg, handler))
    return found


class WorkerLogging(WorkerPlugin):
    """Worker-side logging for one calodistill session (see the module docstring).

    Args:
        log_file: the run log file (None: only the expected-error filter).
        terminal: :func:`~calodistill.pipeline.logs.stream_identity` of the registering process's stderr.
        pid: the registering process (an in-process worker shares its logging: left alone).
        to_terminal: also keep the records on the terminal (the registering process shows its INFO there).
    """

    idempotent = False

    def __init__(self, log_file: str | None, terminal: tuple[str, int, int] | None, pid: int,
                 to_terminal: bool = False) -> None:
        self.log_file = log_file
        self.terminal = terminal
        self.pid = pid
        self.to_terminal = to_terminal
        self._state: dict[str, Any] = {}

    def setup(self, worker: Any) -> None:
        """Install the filter; route this worker process's records to the log file when it shares our terminal."""
        self._state = {"filter": install_expected_error_filter()}
        if os.getpid() == self.pid or self.log_file is None or self.terminal is None \
                or stream_identity() != self.terminal:
            return
        root = logging.getLogger()
        moved = [] if self.to_terminal else _terminal_handlers()
        propagate = {lg.name: lg.propagate for lg, _ in moved if lg is not root}
        for lg, handler in moved:
            lg.removeHandler(handler)
            if lg is not root:
                lg.propagate = True
        added = None
        if self.to_terminal and not any(lg is root for lg, _ in _terminal_handlers()):
            added = logging.StreamHandler(sys.stderr)
            added.setFormatter(logging.Formatter(FILE_FORMAT))
            root.addHandler(added)
        level = root.level
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        run_log = open_run_log(Path(self.log_file))
        logging.captureWarnings(True)
        self._state.update(moved=moved, propagate=propagate, level=level, run_log=run_log, added=added)

    def teardown(self, worker: Any) -> None:
        """Undo :meth:`setup`."""
        state, self._state = self._state, {}
        if state.get("filter"):
            remove_expected_error_filter()
        run_log = state.get("run_log")
        if run_log is None:
            return
        run_log.close()
        if state["added"] is not None:
            logging.getLogger().removeHandler(state["added"])
        logging.captureWarnings(False)
        logging.getLogger().setLevel(state["level"])
        for lg, handler in state["moved"]:
            lg.addHandler(handler)
            if lg.name in state["propagate"]:
                lg.propagate = state["propagate"][lg.name]


def register_worker_logging(client: Any, log_file: Path | None = None) -> str | None:
    """Register a :class:`WorkerLogging` for this process on ``client``'s workers; returns its name.

    Best effort: a cluster that refuses plugins keeps its default logging (None is returned).
    """
    import uuid

    name = f"calodistill-logging-{uuid.uuid4().hex[:8]}"
    shows_info = any(lg is logging.getLogger() and handler.level <= logging.INFO and not handler.filters
                     for lg, handler in _terminal_handlers())  # -v
    plugin = WorkerLogging(str(log_file) if log_file is not None else None, stream_identity(), os.getpid(),
                           to_terminal=shows_info)
    try:
        client.register_plugin(plugin, name=name)
    except Exception as exc:  # noqa: BLE001 - logging set-up must not stop the work
        logger.debug("worker logging plugin not registered: %s", exc)
        return None
    return name
