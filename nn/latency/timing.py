"""The timing protocol shared by latency tables and whole networks (:func:`timed_rounds`).

In ``torch.inference_mode``, on the requested number of torch threads (:func:`timing_settings`):
``warmup`` untimed rounds, then timed rounds; a round calls every function once, in an order
shuffled every round (seeded), so slow drift of the machine (heat, other jobs) falls on every
function alike; each call is timed alone (CUDA synchronised before and after).  A function's
latency is the median of its timed calls.

Other processes on the machine distort timings badly (with as many torch threads as cores, one
busy core stalls every parallel region), so rounds are grouped into segments of at least
``segment_s`` seconds and the CPU time other processes used in each segment is read from
``/proc/stat`` (busy ticks minus this process's CPU time).  Only *quiet* segments count --
other processes used no more than the cores this process leaves idle plus ``quiet`` of the
machine -- and rounds continue until at least ``repeats`` quiet rounds are in (for at most
``patience_s`` seconds more; if fewer were quiet by then, the last ``repeats`` rounds count and
the result says it was disturbed).
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager

import torch

from nn.checks import integer, number
from nn.latency.allocator import steady_allocator

__all__ = ["timing_settings", "spare_cores", "timed_rounds", "load_average", "busy_ticks"]


@contextmanager
def timing_settings(threads: int | None, steady: bool):
    """``torch.set_num_threads(threads)`` (None: unchanged; restored after) and inference mode;
    with ``steady``, :func:`~nn.latency.allocator.steady_allocator` first (for good)."""
    if steady:
        steady_allocator()
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(before)


def spare_cores(device, threads: int | None) -> int:
    """Cores a run leaves idle: all but ``threads`` on CPU (None: torch's number), all but
    one (the launching thread) on CUDA."""
    used = 1 if torch.device(device).type == "cuda" else threads or torch.get_num_threads()
    return max(0, (os.cpu_count() or 1) - used)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def busy_ticks() -> int | None:
    """Busy CPU time of the whole machine in clock ticks (Linux ``/proc/stat``), else None."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            f = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(f) - f[3] - (f[4] if len(f) > 4 else 0)  # minus idle and iowait


class _Foreign:
    """Cores used by *other* processes since :meth:`start`: ``(busy ticks / HZ - this
    process's CPU seconds) / wall seconds``; None where ``/proc/stat`` is missing."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start()

    def start(self) -> None:
        t = os.times()
        self.b0, self.o0, self.w0 = busy_ticks(), t.user + t.system, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.w0

    def cores(self) -> float | None:
        b1, t, w1 = busy_ticks(), os.times(), time.perf_counter()
        if self.b0 is None or b1 is None:
            return None
        other = (b1 - self.b0) / self.hz - (t.user + t.system - self.o0)
        return max(0.0, other) / max(w1 - self.w0, 1e-9)


def timed_rounds(fns: list[Callable[[], object]], repeats: int, warmup: int = 2, device="cpu",
                 seed: int = 0, bar=None, quiet: float | None = 0.05, spare: int = 0,
                 patience_s: float = 120.0, segment_s: float = 0.25) -> dict:
    """Time ``fns`` by the module docstring's protocol (``quiet``: None counts every round;
    ``spare``: the cores this process leaves idle).  After the first ``repeats`` timed rounds,
    rounds go on while fewer than ``repeats`` were quiet, for at most ``patience_s`` seconds;
    then the last ``repeats`` rounds count, quiet or not.

    Returns ``{"ms": per function, its milliseconds in the rounds kept; "rounds": timed rounds
    run; "quiet_rounds": how many were quiet; "disturbed": whether rounds that were not quiet
    count; "foreign_cores": other processes' cores in use, per segment (none with ``quiet``
    None)}``.  ``bar``: a progress bar, advanced by ``len(fns)`` per round."""
    integer("repeats", repeats, 1)
    integer("warmup", warmup, 0)
    number("patience_s", patience_s, 0)
    if quiet is not None:
        number("quiet", quiet, 0, 1)
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    ncpu = os.cpu_count() or 1
    rng = random.Random(seed)
    order = list(range(len(fns)))
    kept: list[list[float]] = []
    pending: list[list[float]] = []
    last: deque[list[float]] = deque(maxlen=repeats)
    foreign: list[float | None] = []
    meter = _Foreign()
    rounds = 0
    start = None
    while len(kept) < repeats and (rounds < repeats or time.perf_counter() - start < patience_s):
        rng.shuffle(order)
        row = [0.0] * len(fns)
        for i in order:
            sync()
            t0 = time.perf_counter()
            fns[i]()
            sync()
            row[i] = (time.perf_counter() - t0) * 1e3
        if bar is not None:
            if bar.total is not None and bar.n + len(fns) > bar.total:
                bar.total = bar.n + len(fns)  # rounds added in place of noisy ones
            bar.update(len(fns))
        if warmup:
            warmup -= 1
            meter.start()
            continue
        rounds += 1
        if rounds == repeats:
            start = time.perf_counter()
        last.append(row)
        pending.append(row)
        if quiet is None:
            kept += pending
            pending = []
        elif meter.elapsed() >= segment_s:
            cores = meter.cores()
            foreign.append(cores)
            if cores is None or cores < spare + quiet * ncpu:
                kept += pending
            pending = []
            meter.start()
    disturbed = len(kept) < repeats
    use = list(last) if disturbed else kept
    return {"ms": [[r[i] for r in use] for i in range(len(fns))], "rounds": rounds,
            "quiet_rounds": len(kept), "disturbed": disturbed, "foreign_cores": foreign}
