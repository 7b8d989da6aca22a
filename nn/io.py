"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

``atomic_write`` writes into a temporary file beside the target (same folder, so the same file
system), flushes and fsyncs it, ``os.replace``s it over the target (atomic on POSIX and Windows)
and fsyncs the folder so the rename itself survives a crash.  If writing fails the temporary
file is removed and the target is untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "write_json"]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable) -> None:
    """``write(fh)`` into a temporary file beside ``path``, fsync it, then ``os.replace``:
    a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, obj) -> None:
    """``obj`` as JSON (``indent=1``; values JSON cannot hold, e.g. numpy or 0-d tensor
    numbers, go through ``float``), written atomically."""
    text = json.dumps(obj, indent=1, default=float)
    atomic_write(path, lambda fh: fh.write(text.encode()))
