"""The ``calodistill`` command line.

Each subcommand has a small module of arguments in this package, ``cli/<command>.py``, that provides
``configure_parser(parser: argparse.ArgumentParser) -> None`` (arguments, description and example)
and ``run_cli(args: argparse.Namespace) -> int`` (the exit status). Modules are imported only when
their subcommand runs, so ``calodistill --help`` stays fast.

Errors: a :class:`pipeline.errors.CalodistillError` (bad input, unknown names, refused overwrites), the
flows' training errors and file-system errors (``OSError``: permission denied, a file where a directory
was expected) are printed as one line ``calodistill: error: ...`` with exit status 2 (``-v`` also logs
the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

from ..openmp import openmp_wait_defaults

__all__ = ["main", "os_error_message", "SUBCOMMANDS"]

# name -> (module, one-line summary shown by `calodistill --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("calodistill.pipeline.cli.run", "run a pipeline DAG (dags/*.yaml) end to end on Dask, tracked in MLflow"),
    "synth": ("calodistill.pipeline.cli.synth", "generate synthetic GFLASH showers on a calorimeter geometry"),
    "ingest": ("calodistill.pipeline.cli.ingest", "ingest HDF5/CSV/Parquet/synthetic showers into a partitioned Parquet dataset"),
    "train-teacher": ("calodistill.pipeline.cli.train_teacher", "train Flow I and the MAF teacher (Flow II) by maximum likelihood"),
    "distill": ("calodistill.pipeline.cli.distill", "distil the IAF student from a trained teacher (CaloFlow II)"),
    "generate": ("calodistill.pipeline.cli.generate", "generate showers with Flow I + the student (HDF5 or Parquet)"),
    "evaluate": ("calodistill.pipeline.cli.evaluate", "compare generated showers with a reference: NLL, observables, AUC, plots"),
    "export": ("calodistill.pipeline.cli.export", "export the student as ONNX for simulators (Geant4), checked against torch"),
    "bench": ("calodistill.pipeline.cli.bench", "benchmark teacher vs student sampling, the matmul floor, ingest and training"),
}


class _LazyHelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other error of the command line."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("calodistill").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"calodistill: error: {where}{_one_line(message)} (see `{self.prog} --help`)\n")


def _build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="calodistill",
        description="Fast surrogate calorimeter simulators: MAF teacher, IAF student, Dask + MLflow pipeline.",
        epilog="Example: calodistill run dags/quickstart.yaml",
        formatter_class=_LazyHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, summary) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary, formatter_class=_LazyHelpFormatter)
        if name == selected:
            module = importlib.import_module(module_name)
            module.configure_parser(p)
            p.set_defaults(_module=module)
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.split())


def os_error_message(exc: OSError) -> str:
    """An :class:`OSError` as one line naming the file(s): ``/data/out: Permission denied``."""
    reason = exc.strerror or _one_line(str(exc)) or type(exc).__name__
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    if not names:
        return _one_line(reason)
    return _one_line(f"{' -> '.join(names)}: {reason}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``calodistill`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # OpenMP threads that spin while they wait collapse torch 10-20x when another process shares the
    # cores; as in the Dask workers, they spin briefly, then sleep (..openmp). Read when torch loads, so
    # it is set before any command module is imported.
    os.environ.update(openmp_wait_defaults(os.environ))
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = _build_parser(selected if selected in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    from .console import configure_console

    configure_console(verbose=args.verbose, command=args.command)
    from ...flows.errors import FlowsError
    from ..errors import CalodistillError

    try:
        return int(args._module.run_cli(args) or 0)
    except (CalodistillError, FlowsError) as exc:
        logging.getLogger(__name__).debug("error", exc_info=True)
        print(f"calodistill: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file system refusal the checks did not foresee: name the file, no traceback
        logging.getLogger(__name__).debug("error", exc_info=True)
        print(f"calodistill: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("calodistill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
