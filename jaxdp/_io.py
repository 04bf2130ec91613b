"""File writes that a crash cannot leave half-done."""
from __future__ import annotations

import os
import tempfile


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory, flushed and fsynced, then
    ``os.replace`` (atomic on POSIX and Windows), then an fsync of the directory where the OS allows it. A reader
    sees the old file or the new one, never a mix; a crash leaves at most a ``.jaxdp.*.tmp`` file behind.

    An existing file keeps its permission bits; a new one gets ``0o666 & ~umask`` (not ``mkstemp``'s 0600).

    Example:
      >>> import tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "x.json")
      >>> atomic_write(p, '{"a": 1}')
      >>> open(p).read()
      '{"a": 1}'
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".jaxdp.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # the rename itself survives a power cut only once the directory is synced (not possible on Windows)
        dfd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


__all__ = ["atomic_write"]
