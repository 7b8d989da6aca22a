"""One wall-clock deadline shared by every phase of a solve.

A solve runs in phases -- reading the input, root bounds, branch and bound or enumeration, HiGHS
runs -- and a time limit caps them together: each phase takes the same :class:`Deadline`,
checks it between its steps and hands what is left to the solvers it calls.

* numpy/numba loops check :meth:`Deadline.expired` (the compiled FISTA loop reads the clock
  itself, against :attr:`Deadline.end`);
* a ``highspy.Highs`` gets ``time_limit`` = :meth:`Deadline.left` and, through :meth:`watch`,
  interrupt callbacks that stop it at the deadline.
"""

from __future__ import annotations

import math
import time

__all__ = ["Deadline"]


class Deadline:
    """``seconds`` from construction (``None``: no limit).  ``end`` is the deadline on the
    ``time.perf_counter`` clock (``inf`` without a limit)."""

    def __init__(self, seconds: float | None = None):
        number = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
        if seconds is not None and not (number and math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"time limit must be a finite number of seconds >= 0 or None, "
                             f"got {seconds!r}")
        self.seconds = None if seconds is None else float(seconds)
        self.start = time.perf_counter()
        self.end = math.inf if seconds is None else self.start + float(seconds)

    @classmethod
    def of(cls, limit) -> "Deadline":
        """``limit`` as a Deadline: a Deadline is shared as it is, a number of seconds (or None)
        starts a new one."""
        return limit if isinstance(limit, Deadline) else cls(limit)

    def elapsed(self) -> float:
        """Seconds since construction (wall time)."""
        return time.perf_counter() - self.start

    def left(self) -> float | None:
        """Seconds left (>= 0), or None without a limit."""
        return None if self.seconds is None else max(self.end - time.perf_counter(), 0.0)

    def expired(self) -> bool:
        return time.perf_counter() >= self.end

    def watch(self, highs) -> None:
        """Make ``highs`` (a ``highspy.Highs``) stop at this deadline: its ``time_limit`` is what
        is left, and its simplex, interior-point, MIP and QP interrupt callbacks stop it once the
        deadline has passed.  Call it again before each run of a model kept across runs: the
        callbacks are installed once and follow the latest deadline."""
        import highspy

        left = self.left()
        highs.setOptionValue("time_limit", math.inf if left is None else left)
        current = getattr(highs, "_mipprune_deadline", None)
        if current is not None:
            current[0] = self
            return
        current = highs._mipprune_deadline = [self]

        def check(event):
            if current[0].expired():
                event.interrupt()

        kinds = highspy.cb.HighsCallbackType
        for kind in (kinds.kCallbackSimplexInterrupt, kinds.kCallbackIpmInterrupt,
                     kinds.kCallbackMipInterrupt, kinds.kHighsCallbackQpInterrupt):
            highs.callbacks[int(kind)].subscribe(check)
            highs.startCallback(kind)

