"""Checks on a user-named output before anything is written: no silent overwrite, a writable place.

Every command that writes a file or directory the user named (``generate --out``, ``evaluate --out``,
``bench --out``, ``synth --out``, ...) calls one of these first, so a refused or impossible write ends in
a one-line :class:`~calodistill.pipeline.errors.CalodistillError` and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import CalodistillError

__all__ = ["check_output_dir", "check_output_file", "check_writable_parent", "removing_created_parents"]


def check_writable_parent(path: Path, option: str = "--out") -> None:
    """Refuse ``path`` when its nearest existing ancestor is a file or a directory this process cannot write.

    Args:
        path: the output to be created (it may not exist, nor its parents).
        option: how messages name the output (the command-line option it came from).
    """
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link: mkdir would fail on it
            raise CalodistillError(f"{option} {path}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise CalodistillError(f"{option} {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CalodistillError(f"{option} {path}: directory {probe} is not writable")


def check_output_file(path: str | os.PathLike[str], *, overwrite: bool, option: str = "--out") -> Path:
    """Check that the file ``path`` may be written: new, or existing and ``overwrite`` given.

    Args:
        path: the output file.
        overwrite: whether an existing file may be replaced (``--overwrite``).
        option: how messages name the output.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        CalodistillError: the file exists (without ``overwrite``), is a directory, or cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise CalodistillError(f"{option} {path}: is a directory, not a file")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise CalodistillError(f"{option} {path}: file already exists; pass --overwrite to replace it")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise CalodistillError(f"{option} {path}: directory {path.parent} is not writable")
        return path
    check_writable_parent(path, option)
    return path


def check_output_dir(path: str | os.PathLike[str], *, overwrite: bool, option: str = "--out",
                     replaceable: Callable[[Path], bool] | None = None, what: str = "a calodistill output directory") -> Path:
    """Check that the directory ``path`` may be written: new or empty, or replaceable with ``overwrite``.

    Args:
        path: the output directory.
        overwrite: whether an existing, non-empty directory may be replaced (``--overwrite``).
        option: how messages name the output.
        replaceable: with ``overwrite``, whether an existing directory is one this command wrote (and may
            therefore be replaced); None accepts any. A directory that is not is never replaced.
        what: what the command writes, for messages (``"an evaluation directory"``).

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        CalodistillError: ``path`` is a file, a non-empty directory (without ``overwrite``), a directory
            this command did not write, or cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CalodistillError(f"{option} {path}: is a file, not a directory")
    if path.is_dir():
        if any(path.iterdir()):
            if not overwrite:
                raise CalodistillError(f"{option} {path}: directory exists and is not empty; pass --overwrite to "
                                       "replace it")
            if replaceable is not None and not replaceable(path):
                raise CalodistillError(f"{option} {path}: exists and is not {what}; refusing to replace it")
        if not os.access(path, os.W_OK | os.X_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            raise CalodistillError(f"{option} {path}: directory is not writable")
        return path
    check_writable_parent(path, option)
    return path


@contextlib.contextmanager
def removing_created_parents(path: str | os.PathLike[str]) -> Iterator[None]:
    """On a failure inside the block, remove the parent directories of ``path`` that did not exist before
    it (those left empty), so a failed command leaves no empty directories behind."""
    missing: list[Path] = []
    probe = Path(path).parent
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        yield
    except BaseException:
        for directory in missing:  # deepest first
            try:
                directory.rmdir()
            except OSError:
                break
        raise
