"""Errors the command line turns into a one-line message and a non-zero exit code."""


class CalodistillError(Exception):
    """A user-facing error: bad input, an unknown name, a refused overwrite.

    The message names the file or field and the problem, on one line; the CLI prints
    ``calodistill: error: <message>`` and exits with status 2.
    """
