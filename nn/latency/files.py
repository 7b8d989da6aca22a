"""Where latency tables live: the cache folder, file names that encode model and key, and
strict-JSON files written atomically (:func:`nn.io.atomic_write`) and read back with their key
checked."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from nn.checks import ConfigError
from nn.io import atomic_write
from nn.latency.table import LatencyKey, LatencyTable

__all__ = ["cache_dir", "default_path", "save_table", "load_table"]


def cache_dir() -> Path:
    """Where tables are cached: ``$XDG_CACHE_HOME/mipprune/latency`` (default
    ``~/.cache/mipprune/latency``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mipprune" / "latency"


def default_path(model: dict, key: LatencyKey) -> Path:
    """The cache file of a table: ``<model tag>__<key slug>.json`` in :func:`cache_dir`;
    ``model`` as in :attr:`LatencyTable.model`."""
    a, size = model.get("arch", {}), model.get("input_size", [])
    width = a.get("width")
    tag = (f"{a.get('name') or 'resnet'}-w{'x' if width is None else f'{width:g}'}-"
           f"{a.get('shortcut')}-{'x'.join(map(str, size))}-c{a.get('num_classes')}")
    return cache_dir() / f"{re.sub(r'[^A-Za-z0-9.+-]+', '-', tag)}__{key.slug()}.json"


def save_table(table: LatencyTable, path) -> Path:
    """Write ``table`` as strict JSON (no NaN/Infinity), atomically, creating the folder."""
    path = Path(path)
    text = json.dumps(table.to_dict(), indent=1, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(text.encode()))
    return path


def _no_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def load_table(path, key: LatencyKey | None = None) -> LatencyTable:
    """Read a table written by :func:`save_table`; with ``key``, refuse a table measured under
    another one.  A file that is not such a table, or a table of another key: a one-line
    :class:`~nn.checks.ConfigError` (a ``ValueError``) naming the file."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
        table = LatencyTable.from_dict(d)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: not a latency table written by python -m nn latency-table "
                          f"({' '.join(str(e).split())})") from None
    if key is not None:
        try:
            table.check_key(key, str(path))
        except ValueError as e:
            raise ConfigError(" ".join(str(e).split())) from None
    return table
