"""JSON in and out for the command line: one way to read an input, one way to write a result.

* :func:`read_json` -- every way of failing to read a document (missing, unreadable, a
  directory, empty, not text, not JSON, nested too deeply, an integer too long to parse) is one
  ``ValueError`` line naming the input.  Python's ``NaN``/``Infinity`` literals are read: the
  validation of the document then names the entry that is not finite;
* :func:`dumps` -- strict JSON: a number that is not finite is written as ``null`` (the record
  beside it carries a status saying why), never as ``NaN`` or ``Infinity``.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np

__all__ = ["read_json", "dumps", "finite_or_none"]


def read_json(path: str, what: str = "file"):
    """The JSON document in ``path`` (``"-"``: standard input); ``what`` names it in errors
    ("instance file", "problem file")."""
    where = "standard input" if path == "-" else f"{what} {path}"
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
    except OSError as exc:
        raise ValueError(f"cannot read {where}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where} is not text (JSON expected): {exc.reason}") from None
    if not text.strip():
        raise ValueError(f"{where} is not valid JSON: it is empty")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, over-long integers
        raise ValueError(f"{where} is not valid JSON: {exc}") from None


def finite_or_none(x):
    """A float, or None when ``x`` is None or not finite."""
    return None if x is None or not math.isfinite(x) else float(x)


def _strict(obj):
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _strict(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return finite_or_none(float(obj))
    return obj


def dumps(obj) -> str:
    """``obj`` as strict JSON (numpy numbers and arrays converted; non-finite numbers -> null)."""
    return json.dumps(_strict(obj), allow_nan=False)
