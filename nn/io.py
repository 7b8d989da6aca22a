"""Run files: written atomically, read back checked, and a lock that gives a run its folder.

**Atomic.**  ``atomic_write`` writes into a temporary file beside the target (same folder, so
the same file system; named ``.NAME.tmp-PID``), flushes and fsyncs it, ``os.replace``s it over
the target (atomic on POSIX and Windows) and fsyncs the folder so the rename itself survives a
crash.  If writing fails the temporary file is removed and the target is untouched; an
``OSError`` names the target (its ``filename``).  A process killed mid-write leaves its
temporary behind: :func:`remove_temporaries` clears them.

**Checked.**  Every file a run reads back carries a check written with it, and the readers
turn every way of failing -- missing, unreadable, empty, truncated, damaged, not the expected
kind of content -- into one :class:`RunFileError` naming the file and the cause:

- JSON (``write_json(..., checked=True)``, read by :func:`read_json`): the SHA-256 of the bytes
  in ``NAME.sha256`` (``sha256sum`` format: ``sha256sum -c NAME.sha256`` verifies it).  The
  digest file lists the digests a reader accepts; it is rewritten atomically *before* the
  target is replaced, listing the old file's digest and the new one's, and again after,
  listing the new one's alone -- so a crash at any point leaves a file that matches.  A file
  without ``NAME.sha256`` (written by versions before the check) is read with a warning.
- torch files (:func:`save_torch`, read by :func:`read_torch`): the CRC-32 that torch's zip
  format stores for every record (always computed by :func:`save_torch`), verified before
  ``torch.load(weights_only=True)`` (no code runs).  The check lives inside the file, so no
  second file is involved.

**Locked.**  :class:`FolderLock`: an exclusive ``fcntl.flock`` on ``FOLDER/mipprune.lock``,
which holds ``pid P on host H`` while it is held.  The kernel releases it when the process
ends, however it ends: a lock is never stale.  ``flock`` works across NFS clients on Linux
(emulated with byte-range locks).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import pickle
import re
import socket
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from nn.checks import ConfigError

__all__ = ["atomic_write", "strict", "dumps", "write_json", "read_json", "save_torch", "read_torch",
           "RunFileError", "FolderLock", "remove_temporaries", "LOCK", "DIGEST"]

log = logging.getLogger(__name__)
LOCK, DIGEST = "mipprune.lock", ".sha256"
_TEMPORARY = re.compile(r"\..+\.tmp-\d+")


class RunFileError(ConfigError):
    """A run file that cannot be read back as written: ``path``, what is wrong with it
    (``problem``) and, if known, what to do (``fix``).  A :class:`~nn.checks.ConfigError`
    (one line and exit status 2 from ``python -m nn``), so a ``ValueError`` too."""

    def __init__(self, path, problem: str, fix: str | None = None):
        super().__init__(path, problem, fix)
        self.path, self.problem, self.fix = Path(path), problem, fix

    def __str__(self):
        return f"{self.path}: {self.problem}" + (f"; {self.fix}" if self.fix else "")


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


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + DIGEST)


def _write_digests(path: Path, digests: list[str]) -> None:
    text = "".join(f"{d}  {path.name}\n" for d in digests)
    atomic_write(_digest_file(path), lambda fh: fh.write(text.encode()))


def atomic_write(path: Path, write: Callable, *, checked: bool = False) -> None:
    """``write(fh)`` into a temporary file beside ``path``, fsync it, then ``os.replace``:
    a reader sees the old file or the new one, never a partial one.  ``checked``: keep
    ``path.sha256`` (see the module docstring; read with :func:`read_json`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        old = new = None
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            if checked:
                new = hashlib.sha256(tmp.read_bytes()).hexdigest()
                old = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
                _write_digests(path, [new] + ([old] if old not in (None, new) else []))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        if old not in (None, new):
            _write_digests(path, [new])
    except OSError as e:  # e.g. ENOSPC from write(): name the file it was for
        if e.errno is not None and e.filename in (None, str(tmp)):
            e.filename = str(path)
        raise


def strict(obj):
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None: strict JSON has no
    such constant, and a reader gets ``null`` (the record's own status says why)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    """Strict JSON text of ``obj`` (:func:`strict`; numpy or 0-d tensor numbers go through
    ``float``)."""
    return json.dumps(strict(obj), allow_nan=False,
                      default=lambda x: strict(float(x)), **kw)


def write_json(path: Path, obj, *, checked: bool = False) -> None:
    """``obj`` as strict JSON (:func:`dumps`, ``indent=1``), written atomically;
    ``checked``: with ``path.sha256``."""
    text = dumps(obj, indent=1)
    atomic_write(path, lambda fh: fh.write(text.encode()), checked=checked)


def _present(path: Path) -> None:
    """:class:`RunFileError` unless ``path`` is a file with something in it."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise RunFileError(path, "is missing") from None
    except OSError as e:
        raise RunFileError(path, f"cannot be read ({e.strerror or e})") from None
    if size == 0:
        raise RunFileError(path, "is empty")


def read_json(path, keys=()) -> dict:
    """The JSON object in ``path``, checked against ``path.sha256`` and holding ``keys``;
    :class:`RunFileError` otherwise."""
    path = Path(path)
    _present(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RunFileError(path, f"cannot be read ({e.strerror or e})") from None
    side = _digest_file(path)
    try:
        listed = [line.split()[0] for line in
                  side.read_bytes().decode(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        log.warning("%s has no %s (written before run files were checked): read unchecked",
                    path, side.name)
    except OSError as e:
        raise RunFileError(path, f"its digest {side.name} cannot be read "
                                 f"({e.strerror or e})") from None
    else:
        if hashlib.sha256(data).hexdigest() not in listed:
            raise RunFileError(path, f"does not match its SHA-256 in {side.name}: the file is "
                                     f"damaged")
    try:
        obj = json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise RunFileError(path, f"is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise RunFileError(path, f"holds a JSON {type(obj).__name__}, not an object")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise RunFileError(path, f"lacks the key(s) {', '.join(missing)}: not the file this "
                                 f"run wrote")
    return obj


def save_torch(path: Path, obj) -> None:
    """``torch.save(obj)`` to ``path`` atomically, with the CRC-32 of every record (whatever
    ``torch.serialization.set_crc32_options`` says), so :func:`read_torch` can check it."""
    def write(fh):
        was = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(True)
        try:
            torch.save(obj, fh)
        finally:
            torch.serialization.set_crc32_options(was)
    atomic_write(path, write)


def read_torch(path, map_location="cpu"):
    """A file written by :func:`save_torch` (or ``torch.save``): every record's CRC-32
    checked, then loaded with ``weights_only=True`` (no code runs); :class:`RunFileError`
    otherwise."""
    path = Path(path)
    _present(path)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except OSError as e:
        raise RunFileError(path, f"cannot be read ({e.strerror or e})") from None
    except (zipfile.BadZipFile, EOFError) as e:
        raise RunFileError(path, f"is not a complete torch file ({e}): truncated or "
                                 f"damaged") from None
    if bad is not None:
        raise RunFileError(path, f"fails its CRC-32 check (record {bad}): the file is damaged")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = " ".join(str(e).split())
        why = why[why.find("WeightsUnpickler error"):][:300]
        raise RunFileError(path, f"cannot be loaded with weights_only=True (a loader state "
                                 f"or metric holding objects other than tensors and plain "
                                 f"values?): {why}") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise RunFileError(path, f"cannot be loaded ({str(e).splitlines()[0][:200]})") \
            from None


def remove_temporaries(folder) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` calls left under ``folder`` (at any
    depth) when their process was killed; only safe while no one writes there (hold its
    :class:`FolderLock`).  Returns what was deleted."""
    gone = [p for p in Path(folder).rglob(".*.tmp-*")
            if p.is_file() and _TEMPORARY.fullmatch(p.name)]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


class FolderLock:
    """An exclusive lock on ``folder`` (see the module docstring): :meth:`acquire`, then
    :meth:`release` (or let the process end).  Two locks on one folder exclude each other,
    within one process too."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK
        self._fd = None

    def acquire(self) -> str | None:
        """Take the lock without waiting: None, or who holds it (``pid P on host H``).
        ``OSError`` if the lock file cannot be created."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FolderLock")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        except BlockingIOError:  # held: say by whom
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            return holder or "pid unknown"
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return None

    def release(self) -> None:
        """Let go (the lock file stays: deleting it would let two runs lock two files)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)
