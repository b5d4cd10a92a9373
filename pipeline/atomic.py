"""Atomic file writes: a temporary file beside the target, renamed over it only when complete.

A reader (or a rerun after a crash) sees either the old file or the whole new one, never a half-written
file; the new file gets the mode a plain ``open(path, "w")`` would give (0o666 minus the umask).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_path", "atomic_write_text", "atomic_write_json", "current_umask",
           "remove_stale_temporaries"]

logger = logging.getLogger(__name__)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: ``/proc/self/status``).

    ``os.umask`` can only be read by setting it, which would briefly change it for every thread.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends cleanly, publish it as ``path``.

    The caller writes the whole file to the yielded path (any writer that takes a file name: h5py,
    pyarrow, ``savefig``). On success the file is synced, given mode ``0o666 & ~umask`` (``mkstemp``
    creates it 0600) and renamed over ``path``; on an exception it is removed and ``path`` is untouched.
    The temporary name ends in ``.tmp``: pass the format explicitly to writers that guess it from the
    extension.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], tag: str = "tmp") -> Iterator[Path]:
    """Yield a new empty directory beside ``path``; when the block ends cleanly, publish it as ``path``.

    For outputs that are a tree of files (a dataset, a report). The directory is renamed into place; an
    existing ``path`` is first moved aside and removed afterwards, so a reader sees the old tree or the
    whole new one. On an exception the temporary directory is removed and ``path`` is untouched. Refusing
    to replace something is the caller's check, done inside the block.

    Args:
        path: the directory to create or replace.
        tag: part of the temporary name (``.<name>.<tag>-<host>-<pid>-<random>``), to tell who left it;
            what a killed process left under that name is removed by the next call
            (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path, tag)
    tmp = path.parent / f".{path.name}.{tag}-{_owner()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # honours the umask (tempfile.mkdtemp would make it 0700)
    try:
        yield tmp
        if not path.exists():
            try:
                os.rename(tmp, path)
                return
            except OSError:
                if not path.exists():
                    raise
        old = path.parent / f".{path.name}.old-{_owner()}-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _owner() -> str:
    """``<host>-<pid>``: who made a temporary path, so that a later run can tell when it is stale."""
    host = "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike[str], tag: str | None = None) -> list[Path]:
    """Remove what a killed writer of ``path`` left beside it: temporary files of :func:`atomic_path`
    (``tag`` None) or directories of :func:`atomic_dir` with ``tag`` (and trees it had moved aside).

    Only names of this module's making whose process ran on this host and is gone are removed, so a
    writer still at work (here or on another machine) keeps its temporary path.

    Returns:
        The paths removed.
    """
    path = Path(path)
    if tag is None:
        patterns = [(f".{path.name}.", ".tmp")]
    else:
        patterns = [(f".{path.name}.{tag}-", ""), (f".{path.name}.old-", "")]
    host = _owner().rsplit("-", 1)[0]
    removed: list[Path] = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for candidate in siblings:
        for prefix, suffix in patterns:
            name = candidate.name
            if not (name.startswith(prefix) and name.endswith(suffix)):
                continue
            parts = name[len(prefix):len(name) - len(suffix)].rsplit("-", 2)
            if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or _alive(int(parts[1])):
                continue
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                candidate.unlink(missing_ok=True)
            logger.info("removed %s, left by an interrupted run", candidate)
            removed.append(candidate)
    return removed


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def atomic_write_json(
    path: str | os.PathLike[str], data: Any, *, sort_keys: bool = True, allow_nan: bool = True
) -> Path:
    """``json.dump`` (indented; numpy scalars and paths as numbers/strings) atomically; returns the path.

    Args:
        path: the target file.
        data: what to write.
        sort_keys: sort the keys of every object (False keeps insertion order).
        allow_nan: False raises ``ValueError`` on NaN/infinity instead of writing non-standard JSON.
    """
    text = json.dumps(data, indent=2, sort_keys=sort_keys, allow_nan=allow_nan, default=_json_default)
    return atomic_write_text(path, text + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy / torch arrays and scalars (a scalar's tolist is a number)
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
