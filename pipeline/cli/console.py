"""What reaches the terminal: our own messages, one line each; libraries' chatter only with ``-v``.

Without ``-v`` the terminal shows records of calodistill's own loggers (INFO and up; WARNING and up for
``calodistill run``, whose full log goes to ``<run dir>/calodistill.log`` and whose terminal shows one
progress bar per stage and the summary), each as its first line, and other libraries' records only
from ERROR up. Python warnings become log records (``logging.captureWarnings``), so a library's
warnings land in the run log, not on the terminal. MLflow is told not to install its own stderr
handler nor draw artifact download bars (``MLFLOW_CONFIGURE_LOGGING``,
``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``; a value the user set wins).
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["QUIET_COMMANDS", "configure_console"]

#: Commands whose INFO records go to their run log only (their terminal shows progress and a summary).
QUIET_COMMANDS = frozenset({"run"})
_OWN = "calodistill"
_FULL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ConsoleHandler(logging.StreamHandler):
    """The handler :func:`configure_console` installed (replaced when it is called again)."""


class _OwnRecords(logging.Filter):
    """Our records at the handler's level; other libraries' from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == _OWN or record.name.startswith(_OWN + ".")
        return own or record.levelno >= logging.ERROR


class _FirstLineFormatter(logging.Formatter):
    """The first line of a message, without the traceback (the run log and ``-v`` have the rest)."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage().strip().splitlines()
        first = text[0] if text else ""
        return f"{self.formatTime(record, '%H:%M:%S')} {record.levelname} {record.name}: {first}"


def configure_console(verbose: bool = False, command: str | None = None) -> None:
    """Set up logging for a command-line run (once per process; an existing foreign set-up is kept).

    Args:
        verbose: ``-v``: everything at DEBUG, in full, on the terminal.
        command: the subcommand (those in :data:`QUIET_COMMANDS` show WARNING and up only).
    """
    root = logging.getLogger()
    if any(not isinstance(h, _ConsoleHandler) for h in root.handlers):
        return  # logging is configured by someone else (an application, pytest): leave it
    for handler in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(handler)
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if "mlflow" in sys.modules and os.environ["MLFLOW_CONFIGURE_LOGGING"].lower() == "false":
        mlflow_log = logging.getLogger("mlflow")  # imported already: its own stderr handler is on
        for mlflow_handler in list(mlflow_log.handlers):
            mlflow_log.removeHandler(mlflow_handler)
        mlflow_log.propagate = True
    logging.getLogger("alembic").setLevel(logging.WARNING)  # MLflow's database migrations, line by line
    handler = _ConsoleHandler(sys.stderr)
    if verbose:
        root.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter(_FULL_FORMAT, datefmt="%H:%M:%S"))
    else:
        root.setLevel(logging.INFO)
        handler.setLevel(logging.WARNING if command in QUIET_COMMANDS else logging.INFO)
        handler.addFilter(_OwnRecords())
        handler.setFormatter(_FirstLineFormatter())
    root.addHandler(handler)
    logging.captureWarnings(True)
