"""Where log records go: a pipeline run's log file, and Dask workers that keep expected errors short.

The terminal belongs to the command line (:mod:`calodistill.pipeline.cli.console`); a pipeline run
appends every record of its processes to ``<run dir>/calodistill.log`` (:func:`open_run_log`, and
:class:`calodistill.pipeline.worker_logs.WorkerLogging` in the worker processes). A
:class:`CalodistillError` raised in a Dask task is reported to the user as one line by the caller, so
the worker's own "Compute Failed ... Traceback" record of it is dropped (:class:`ExpectedErrorFilter`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CalodistillError

__all__ = [
    "FILE_FORMAT",
    "RUN_LOG_NAME",
    "ExpectedErrorFilter",
    "RunLog",
    "install_expected_error_filter",
    "open_run_log",
    "remove_expected_error_filter",
]

#: The log file of a pipeline run, in its run directory.
RUN_LOG_NAME = "calodistill.log"
#: Format of the log file's lines (the process id tells the driver from the workers).
FILE_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"

_WORKER_LOGGER = "distributed.worker"
_EXCEPTION_LINE = re.compile(r"^Exception:\s*[\"']?(\w+)\(", re.MULTILINE)


def _expected_error_names() -> set[str]:
    """Class names of :class:`CalodistillError` and its subclasses."""
    names: set[str] = set()
    todo: list[type] = [CalodistillError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


class ExpectedErrorFilter(logging.Filter):
    """Drops Dask's "Compute Failed" record when the task raised a :class:`CalodistillError`.

    The worker logs the exception's ``repr`` and traceback (7+ lines) before the caller even sees the
    error; for an error that is already a one-line message naming the file and the problem, that block
    is noise. Other exceptions (bugs) keep their record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a "Compute Failed" record of an expected error."""
        if not (isinstance(record.msg, str) and record.msg.startswith("Compute Failed")):
            return True
        match = _EXCEPTION_LINE.search(record.getMessage())
        return match is None or match.group(1) not in _expected_error_names()


def install_expected_error_filter() -> bool:
    """Put an :class:`ExpectedErrorFilter` on Dask's worker logger (once); True if this call added it."""
    log = logging.getLogger(_WORKER_LOGGER)
    if any(isinstance(f, ExpectedErrorFilter) for f in log.filters):
        return False
    log.addFilter(ExpectedErrorFilter())
    return True


def remove_expected_error_filter() -> None:
    """Take the :class:`ExpectedErrorFilter` off Dask's worker logger."""
    log = logging.getLogger(_WORKER_LOGGER)
    for f in [f for f in log.filters if isinstance(f, ExpectedErrorFilter)]:
        log.removeFilter(f)


class _RunLogHandler(logging.FileHandler):
    """A file handler this module added (so it is found again, and never added twice for one file)."""


@dataclass
class RunLog:
    """A log file attached to this process's root logger; :meth:`close` detaches it.

    Attributes:
        path: the log file.
        handler: the handler this call added (None when the file was already attached).
    """

    path: Path
    handler: logging.Handler | None = None

    def close(self) -> None:
        """Detach the handler (when this object added it) and close the file."""
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
            self.handler.close()
            self.handler = None


def _attached(path: Path) -> logging.Handler | None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _RunLogHandler) and Path(handler.baseFilename) == path:
            return handler
    return None


def open_run_log(path: Path) -> RunLog:
    """Append this process's log records to ``path`` until :meth:`RunLog.close` (created with the umask).

    Records reach it as the logging configuration lets them through (the command line sets the root
    logger to INFO, DEBUG with ``-v``); Python warnings are in it when ``logging.captureWarnings`` is on.
    """
    path = Path(path).resolve()
    if _attached(path) is not None:
        return RunLog(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _RunLogHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    logging.getLogger().addHandler(handler)
    return RunLog(path, handler)


def stream_identity(stream: Any = None) -> tuple[str, int, int] | None:
    """(host, device, inode) of a stream's file (default: stderr), or None when it has none.

    Two processes whose stderr has the same identity write to the same terminal (or pipe).
    """
    import socket

    stream = sys.stderr if stream is None else stream
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return socket.gethostname(), st.st_dev, st.st_ino
