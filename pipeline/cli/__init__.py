"""The ``calodistill`` command line: :func:`main` and one small module of arguments per command."""

from .main import main

__all__ = ["main"]
