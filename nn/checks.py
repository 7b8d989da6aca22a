"""Argument checks shared by every configuration object: each raises ``ValueError`` naming the
bad value and what is allowed, so a setting is validated the same way wherever it is given."""

from __future__ import annotations

import argparse
import math

__all__ = ["number", "integer", "choice", "optional_count", "argtype"]


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


def integer(name: str, v, lo: int) -> int:
    """``v`` if it is an int (not a bool) ``>= lo``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
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


def argtype(name, kind=float, lo=None, strict=False, hi=None):
    """An argparse ``type``: ``kind(text)``, finite, ``>= lo`` (``> lo`` with ``strict``) and
    ``<= hi``; ``argparse.ArgumentTypeError`` naming the option and the bad text."""
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
