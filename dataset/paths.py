"""Output paths checked before any work starts: one clear message instead of a traceback at the end.

``check_output_file(path)`` / ``check_output_dir(path)`` raise :class:`OutputPathError` when

- the path (or one of its parents) is an existing file where a directory is needed,
- the path is an existing directory where a file is expected,
- the directory that would hold the output cannot be written (probed by creating and removing a
  temporary file in the nearest existing ancestor, so it is right for root and for read-only mounts).

Nothing is created by a check. The message names the path and the problem, e.g.::

    output path out/x.bin is a directory; a file is expected there
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputPathError(OSError):
    """An output path that cannot be written; ``str(e)`` is the message for the user."""

    def __init__(self, message: str, path):
        super().__init__(message)
        self.message = message
        self.path = str(path)

    def __str__(self) -> str:
        return self.message


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_parents(path: Path, what: str, start: Path) -> Path:
    """The nearest existing ancestor of ``start`` (``path`` or its parent); it must be a writable directory."""
    base = _nearest_existing(start)
    if not base.is_dir():
        raise OutputPathError(f"{what} {path}: {base} is a file, not a directory", path)
    _probe_writable(base, path, f"{what} {path}: directory {base}")
    return base


def _probe_writable(directory: Path, path: Path, subject: str) -> None:
    """Create and remove a file in ``directory`` (permission bits alone miss read-only mounts and ACLs)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".mateconv-write-probe-", dir=directory)
    except OSError as e:
        raise OutputPathError(f"{subject} is not writable ({e.strerror or e})", path) from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path, what: str = "output path") -> Path:
    """``path`` can be written as a file (its directory exists or can be created)."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a directory; a file is expected there", path)
    if path.exists() and not path.is_file():
        raise OutputPathError(f"{what} {path} exists and is not a regular file", path)
    _check_parents(path, what, path.parent)
    return path


def check_output_dir(path, what: str = "output directory") -> Path:
    """``path`` is, or can be created as, a writable directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} is a file; a directory is expected there", path)
    if path.is_dir():
        _probe_writable(path, path, f"{what} {path}")
        return path
    _check_parents(path, what, path)
    return path
