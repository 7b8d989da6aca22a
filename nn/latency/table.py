"""The latency table: measured unit latencies keyed by machine, and the network latency they
predict.

A :class:`LatencyTable` holds, for every distinct unit of a network (a
:attr:`~nn.latency.layers.Layer.key`), an :class:`Entry`: the median latency in ms over a grid
of (input width, output width) pairs, measured under one :class:`LatencyKey` (device and its
name, threads, dtype, batch size, torch version, allocator state).  Between grid points latencies are
interpolated bilinearly (:meth:`Entry.at`); a width outside the grid is an error.  A network's
predicted latency (:func:`predict`) is::

    T(widths, blocks) = scale * sum_{units l kept} E_l(in_w(l), out_w(l)) + constant_ms

``in_w(l)``/``out_w(l)``: the widths of the unit's families (its dense count for a fixed
axis); a unit of a removed block contributes 0.  ``scale`` and ``constant_ms`` are fitted
against networks measured whole (:func:`nn.latency.measure.fit_constant`; ``scale`` stays 1
when only the constant is fitted): the constant is the work outside the units, the scale the
difference between units timed alone (their data cold in cache) and inside the network.

File format (``FORMAT``; strict JSON, :mod:`nn.latency.files`)::

    {"format": FORMAT, "key": {...LatencyKey}, "model": {"arch": {...}, "input_size": [c, h, w]},
     "granularity": g, "constant_ms": c, "scale": a, "meta": {...},
     "entries": {unit key: {"in_widths": [...], "out_widths": [...], "tied": bool,
                            "ms": [[...], ...] or, tied, [...]}}}
"""

from __future__ import annotations

import bisect
import platform
import re
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from nn.checks import integer, number
from nn.latency.allocator import ALLOCATORS, allocator_state
from nn.latency.layers import Layer

__all__ = ["FORMAT", "DTYPES", "LatencyKey", "Entry", "LatencyTable", "device_name",
           "current_key", "predict"]

FORMAT = "mipprune.nn.latency-table/1"
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class LatencyKey:
    """Where a table was measured: ``device`` (``"cpu"``, ``"cuda"``), ``device_name`` (the CPU
    model string or the CUDA device name), torch ``threads``, ``dtype`` (one of
    :data:`DTYPES`), ``batch`` size, the ``torch`` version and the ``allocator`` state (one of
    :data:`~nn.latency.allocator.ALLOCATORS`).  Tables under different keys do not mix."""

    device: str
    device_name: str
    threads: int
    dtype: str
    batch: int
    torch: str
    allocator: str = "steady"

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        for name in ("device_name", "torch"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, "
                                 f"got {getattr(self, name)!r}")
        integer("threads", self.threads, 1)
        integer("batch", self.batch, 1)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"allocator must be one of {ALLOCATORS}, got {self.allocator!r}")

    def slug(self) -> str:
        """The key as a file-name part."""
        name = re.sub(r"[^A-Za-z0-9.]+", "-", self.device_name).strip("-")
        return (f"{self.device}-{name}-t{self.threads}-{self.dtype}-b{self.batch}-"
                f"torch{re.sub(r'[^A-Za-z0-9.]+', '-', self.torch)}-{self.allocator}")

    def differences(self, other: LatencyKey) -> list[str]:
        return [f"{f.name} {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def device_name(device) -> str:
    """The CPU model string (``/proc/cpuinfo``, else ``platform``) or the CUDA device name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def current_key(device="cpu", dtype: str = "float32", threads: int | None = None,
                batch: int = 1) -> LatencyKey:
    """The key of this process for ``device``/``dtype``/``batch`` with ``threads`` torch
    threads (None: torch's current number) and its current allocator state."""
    device = torch.device(device)
    return LatencyKey(device.type, device_name(device),
                      torch.get_num_threads() if threads is None else threads, dtype, batch,
                      torch.__version__, allocator_state())


def _bracket(grid: tuple[int, ...], w: int, what: str) -> tuple[int, int, float]:
    """``(i, j, t)`` with ``w = (1 - t) grid[i] + t grid[j]``; ``ValueError`` outside."""
    if isinstance(w, bool) or not isinstance(w, int) or not grid[0] <= w <= grid[-1]:
        raise ValueError(f"{what} {w!r} is outside the table's grid {grid[0]}..{grid[-1]} "
                         f"(widths {list(grid)})")
    j = bisect.bisect_left(grid, w)
    if grid[j] == w:
        return j, j, 0.0
    return j - 1, j, (w - grid[j - 1]) / (grid[j] - grid[j - 1])


@dataclass(frozen=True)
class Entry:
    """Latencies (ms) of one unit over ``in_widths x out_widths`` (``ms[i][j]``), or, for a
    ``tied`` unit (one family sets both), over ``in_widths`` (== ``out_widths``; ``ms[i]``)."""

    in_widths: tuple[int, ...]
    out_widths: tuple[int, ...]
    ms: tuple
    tied: bool = False

    def __post_init__(self):
        for name in ("in_widths", "out_widths"):
            g = getattr(self, name)
            if not g or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in g) \
                    or list(g) != sorted(set(g)):
                raise ValueError(f"{name} must be increasing positive ints, got {g!r}")
        if self.tied and self.in_widths != self.out_widths:
            raise ValueError(f"a tied entry has in_widths == out_widths, got {self.in_widths} "
                             f"and {self.out_widths}")
        rows = [self.ms] if self.tied else list(self.ms)
        n_out = len(self.in_widths) if self.tied else len(self.out_widths)
        if len(rows) != (1 if self.tied else len(self.in_widths)) or \
                any(len(r) != n_out for r in rows):
            raise ValueError(f"ms must have shape ({len(self.in_widths)},"
                             f"{'' if self.tied else f' {len(self.out_widths)}'}), got {self.ms!r}")
        for r in rows:
            for v in r:
                number("entry latency (ms)", v, 0)

    def at(self, in_w: int, out_w: int) -> float:
        """Latency at ``(in_w, out_w)``: exact at grid points, bilinear between them:
        ``(1-s)(1-t) m[i][j] + (1-s) t m[i][j'] + s (1-t) m[i'][j] + s t m[i'][j']``."""
        i0, i1, s = _bracket(self.in_widths, in_w, "input width")
        if self.tied:
            if in_w != out_w:
                raise ValueError(f"a tied unit has one width, got in {in_w} and out {out_w}")
            return (1 - s) * self.ms[i0] + s * self.ms[i1]
        j0, j1, t = _bracket(self.out_widths, out_w, "output width")
        m = self.ms
        return ((1 - s) * ((1 - t) * m[i0][j0] + t * m[i0][j1])
                + s * ((1 - t) * m[i1][j0] + t * m[i1][j1]))

    def to_dict(self) -> dict:
        return {"in_widths": list(self.in_widths), "out_widths": list(self.out_widths),
                "tied": self.tied,
                "ms": list(self.ms) if self.tied else [list(r) for r in self.ms]}

    @classmethod
    def from_dict(cls, d: dict) -> Entry:
        ms = d["ms"]
        return cls(tuple(d["in_widths"]), tuple(d["out_widths"]),
                   tuple(ms) if d["tied"] else tuple(tuple(r) for r in ms), bool(d["tied"]))


@dataclass(frozen=True)
class LatencyTable:
    """Entries by unit key measured under ``key``; ``model``: the dense model's ``arch`` and
    ``input_size`` (informational); ``granularity``: of the width grid; ``constant_ms`` and
    ``scale``: of :func:`predict`; ``meta``: how it was measured and fitted."""

    key: LatencyKey
    entries: dict[str, Entry]
    granularity: int
    model: dict = field(default_factory=dict)
    constant_ms: float = 0.0
    scale: float = 1.0
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.key, LatencyKey):
            raise ValueError(f"key must be a LatencyKey, got {type(self.key).__name__}")
        integer("granularity", self.granularity, 1)
        number("constant_ms", self.constant_ms)
        number("scale", self.scale, 0, open_lo=True)
        for k, e in self.entries.items():
            if not isinstance(e, Entry):
                raise ValueError(f"entry {k!r} must be an Entry, got {type(e).__name__}")

    def entry(self, layer: Layer) -> Entry:
        e = self.entries.get(layer.key)
        if e is None:
            raise ValueError(f"the latency table has no entry for {layer.name} ({layer.key}); "
                             f"it was measured for {self.model.get('arch', {}).get('name')!r}")
        return e

    def lookup(self, layer: Layer, in_w: int, out_w: int) -> float:
        """Latency (ms) of ``layer``'s unit at input width ``in_w`` and output width ``out_w``
        (:meth:`Entry.at`; a fixed axis takes its dense count)."""
        return self.entry(layer).at(in_w, out_w)

    def check_key(self, key: LatencyKey, where: str = "the latency table") -> None:
        """``ValueError`` naming every field where ``key`` differs from the table's."""
        diff = self.key.differences(key)
        if diff:
            raise ValueError(f"{where} was measured under another key ({'; '.join(diff)}): "
                             f"measure one here (python -m nn latency-table)")

    def to_dict(self) -> dict:
        return {"format": FORMAT, "key": asdict(self.key), "model": self.model,
                "granularity": self.granularity, "constant_ms": self.constant_ms,
                "scale": self.scale, "meta": self.meta,
                "entries": {k: e.to_dict() for k, e in self.entries.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> LatencyTable:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a latency table (format {FORMAT!r} expected)")
        return cls(LatencyKey(**d["key"]), {k: Entry.from_dict(e) for k, e in
                                            d["entries"].items()},
                   d["granularity"], d.get("model", {}), d["constant_ms"], d["scale"],
                   d.get("meta", {}))

    def with_fit(self, constant_ms: float, scale: float = 1.0, **meta) -> LatencyTable:
        """A copy with the fitted ``constant_ms``/``scale``; ``meta`` merged into its meta."""
        return replace(self, constant_ms=float(constant_ms), scale=float(scale),
                       meta={**self.meta, **meta})


def predict(table: LatencyTable, layers: list[Layer], widths: dict[str, int] | None = None,
            blocks_kept: dict[str, bool] | None = None) -> float:
    """Predicted latency (ms) of the pruned network with family ``widths`` (families left out:
    dense) and ``blocks_kept`` (blocks left out: kept): the module docstring's ``T``.
    ``ValueError`` for a family or block ``layers`` do not name."""
    widths = dict(widths or {})
    blocks_kept = dict(blocks_kept or {})
    fams = {f for ly in layers for f in (ly.in_family, ly.out_family) if f is not None}
    unknown = sorted(set(widths) - fams)
    if unknown:
        raise ValueError(f"unknown families {unknown}; the layers' families are {sorted(fams)}")
    blocks = {ly.block for ly in layers if ly.block is not None}
    unknown = sorted(set(blocks_kept) - blocks)
    if unknown:
        raise ValueError(f"unknown blocks {unknown}; removable blocks are {sorted(blocks)}")
    total = 0.0
    for ly in layers:
        if ly.block is not None and not blocks_kept.get(ly.block, True):
            continue
        in_w = widths.get(ly.in_family, ly.in_channels) if ly.in_family else ly.in_channels
        out_w = widths.get(ly.out_family, ly.out_channels) if ly.out_family else ly.out_channels
        total += table.lookup(ly, in_w, out_w)
    return table.scale * total + table.constant_ms
