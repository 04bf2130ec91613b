"""Crash-safe file writes: the one way jaxdp replaces a file it owns.

A reader (another process, or this one after a crash, even ``kill -9`` or a power cut) sees either the old
content of ``path`` or the new content, never a mixture or a truncated file: the data goes to a temporary file
in the same directory, is flushed to disk (``fsync``), renamed over ``path`` (``os.replace``, atomic on POSIX
and Windows), and the directory itself is flushed so that the rename survives a power cut.

Used for run records, checkpoints, model cards, reports, sweep and audit results, ledger exports and the ledger
head file.
"""
from __future__ import annotations

import os
import tempfile

TEMP_PREFIX = ".tmp-"  # temporaries left by a crash start with this (checkpoint.save removes them)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory entry (a rename into it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) atomically and durably.

    The parent directory is created if needed. Permissions: ``mode`` when given (e.g. ``0o600`` for a file
    holding secrets such as a noise key); else those of the file being replaced; else the usual ``0o666``
    less the umask. On any error (disk full, interrupt) the temporary file is removed and ``path`` is unchanged.

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> atomic_write(os.path.join(d, "a.json"), '{"ok": true}\\n')
        >>> open(os.path.join(d, "a.json")).read()
        '{"ok": true}\\n'
        >>> sorted(os.listdir(d))  # no temporary left behind
        ['a.json']

    Raises:
      OSError: the directory cannot be created or written (the message names the path).
      TypeError: ``data`` is neither ``str`` nor ``bytes``.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write writes str or bytes, got {type(data).__name__}")
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is None:
            try:
                mode = os.stat(path).st_mode & 0o7777
            except FileNotFoundError:  # mkstemp makes 0600 files: give a new file the usual permissions
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(d)


__all__ = ["atomic_write", "fsync_dir"]
