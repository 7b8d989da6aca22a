"""Argument checks shared by every configuration object: each raises ``ValueError`` naming the
bad value and what is allowed, so a setting is validated the same way wherever it is given.

:class:`ConfigError` is the one error type of a run that cannot go on as asked, wherever it is
found (a setting, a data set, a weights file, a diverging loss): ``python -m nn`` prints its
message as one line and exits with status 2."""

from __future__ import annotations

import argparse
import math
import os

__all__ = ["ConfigError", "FLOAT32_MAX", "INT_MAX", "number", "integer", "choice",
           "optional_count", "existing_file", "argtype", "max_threads"]

FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: a setting that multiplies float32 tensors (a learning rate, a weight
decay) must not exceed it, or torch cannot convert it."""

INT_MAX = 2**31 - 1
"""The largest integer a command-line option takes (no count of epochs, images or repeats
comes near it; torch and ``collections`` overflow on far larger ones)."""


class ConfigError(ValueError):
    """A run that cannot start or go on as asked: ``out`` holds a run, resume with a changed
    config, a method that cannot run in this setting, data or weights that do not fit, a loss
    that is no longer finite...  A ``ValueError``, so library callers may catch either."""


def max_threads() -> int:
    """The most torch CPU threads a setting may ask for: the machine's logical CPUs."""
    return os.cpu_count() or 1


def number(name: str, v, lo: float = -math.inf, hi: float = math.inf, *,
           open_lo: bool = False) -> float:
    """``v`` as a float, if it is a finite real number (not a bool) in ``[lo, hi]`` (``(lo,
    hi]`` with ``open_lo``)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < lo or v > hi or (open_lo and v == lo):
        want = "a finite number"
        if lo > -math.inf:
            want += f" {'>' if open_lo else '>='} {lo:g}"
        if hi < math.inf:
            want += f"{' and' if lo > -math.inf else ''} <= {hi:g}"
        raise ValueError(f"{name} must be {want}, got {v!r}")
    return float(v)


def integer(name: str, v, lo: int, hi: int | None = None) -> int:
    """``v`` if it is an int (not a bool) ``>= lo`` (and ``<= hi`` when given)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        want = f"an int >= {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise ValueError(f"{name} must be {want}, got {v!r}")
    return v


def optional_count(name: str, v) -> int | None:
    """``v`` if it is None ("all") or an int >= 1."""
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")
    return v


def choice(name: str, v, choices):
    """``v`` if it is one of ``choices``."""
    if v not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {v!r}")
    return v


def existing_file(name: str, path) -> str:
    """``path`` (as a string) if it names a readable file; else ``ValueError`` saying what is
    there instead (nothing, a folder, a file this user cannot read)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"{name} must be a file path, got {path!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{name}: no such file: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{name} must be a file, got the folder {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{name}: {path} is not readable (permission denied)")
    return path


def argtype(name, kind=float, lo=None, strict=False, hi=None):
    """An argparse ``type``: ``kind(text)``, finite, ``>= lo`` (``> lo`` with ``strict``) and
    ``<= hi`` (integers: at most :data:`INT_MAX` unless ``hi`` says otherwise);
    ``argparse.ArgumentTypeError`` naming the option and the bad text."""
    if kind is int and hi is None:
        hi = INT_MAX

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be {'an integer' if kind is int else 'a number'}, "
                f"got {text!r}") from None
        if kind is float and not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{name} must be finite, got {text!r}")
        if lo is not None and (x <= lo if strict else x < lo):
            raise argparse.ArgumentTypeError(
                f"{name} must be {'>' if strict else '>='} {lo}, got {text}")
        if hi is not None and x > hi:
            raise argparse.ArgumentTypeError(f"{name} must be <= {hi}, got {text}")
        return x
    return parse
