"""A steady memory allocator for timing: freed memory stays in the process for reuse.

With glibc's default settings a large tensor (above the dynamic mmap threshold, or at the top
of a heap larger than the trim threshold) goes back to the operating system when freed, and the
next one of that size is faulted in page by page (the kernel zeroes every page).  Which
allocations pay that depends on every tensor alive at the time, so it is not a property of one
layer: measured on ResNet-56 at batch 64 on CPU it was 10-20 % of a network's latency and spread
differently over the layers of a network than over the same layers timed alone, which is what an
additive latency model cannot follow.  :func:`steady_allocator` turns it off for the rest of the
process, through ``mallopt``: no mmap-backed allocations (``M_MMAP_MAX = 0``) and no heap
trimming (``M_TRIM_THRESHOLD = 2^31 - 1``).  Freed memory is then reused without page faults,
as allocators made for inference (jemalloc, tcmalloc) do by default; the price is a resident
size that never shrinks.

A latency table records the state it was measured in (:attr:`LatencyKey.allocator
<nn.latency.table.LatencyKey>`: ``"steady"`` or ``"as-is"``, the process' own allocator,
whatever it is) and predicts the latency of networks run in that state.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["ALLOCATORS", "steady_allocator", "allocator_state"]

ALLOCATORS = ("steady", "as-is")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>
_steady = False


def steady_allocator() -> bool:
    """Make glibc keep freed memory for reuse, for the rest of the process (module docstring).
    Returns whether that is now the case (False where there is no glibc ``mallopt``)."""
    global _steady
    if _steady:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _steady = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    return _steady


def allocator_state() -> str:
    """``"steady"`` once :func:`steady_allocator` succeeded in this process, else ``"as-is"``."""
    return "steady" if _steady else "as-is"
