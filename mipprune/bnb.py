"""Exact solution of (P) by branch and bound over z with perspective (or big-M) node bounds.

Each node fixes some z_j to 0 or 1 and relaxes the rest; its bound is the node relaxation of
``relax.NodeRelaxation`` (projected z, closed form), solved by FISTA warm-started from the
parent's point.  Every bound used to prune is a *valid* lower bound (the linearisation/conjugate
bound), never a primal estimate, so the reported gap is certified:

    gap = (incumbent - lower_bound) / max(|incumbent|, 1e-10)

Search: best-first on the node bound.  Branching: the free group whose relaxed z* is most
fractional.  Incumbents: every node's point, rounded (z_j = 1 iff w_j != 0), is feasible for
(P) at no cost; promising rounded patterns are polished by solving their leaf QP (all z fixed).
The incumbent objective is re-evaluated in numpy (``Instance.objective``) at the returned point.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass

import numpy as np

from .deadline import Deadline
from .instance import Instance
from .relax import BOUNDS, FREE, IN, OUT, NodeRelaxation
from .status import converged_status

__all__ = ["BnBResult", "branch_and_bound"]

_INTEGRAL_TOL = 1e-9


@dataclass(frozen=True)
class BnBResult:
    objective: float      # incumbent objective of (P), re-evaluated in numpy
    w: np.ndarray
    z: np.ndarray
    lower_bound: float    # certified lower bound on the optimum
    gap: float            # (objective - lower_bound) / max(|objective|, 1e-10)
    nodes: int            # node relaxations solved
    seconds: float
    status: str           # "optimal" (gap <= status.OPTIMAL_GAP), "within_tolerance" (<= gap_tol),
                          # "time_limit", "node_limit" or "gap_not_closed"
    root_bound: float     # lower bound at the root node
    bounds: str           # "perspective" or "bigm"


def _rounded(inst: Instance, w):
    z = (np.max(np.abs(inst.padded(w)), axis=1) > 0).astype(float)
    return z, inst.objective(w, z)


def branch_and_bound(instance: Instance, bounds: str = "perspective", gap_tol: float = 1e-6,
                     time_limit: float | Deadline | None = None, node_limit: int | None = None,
                     progress: bool = False) -> BnBResult:
    """Solve (P) to a relative gap of ``gap_tol`` (default 1e-6).

    ``time_limit``: seconds from the call, or a :class:`Deadline` shared with earlier phases;
    every node relaxation stops at it too, so the call returns within a few milliseconds of it
    (status ``time_limit``, with the incumbent and its certified bound).  The status is
    ``optimal`` only for a gap of at most ``status.OPTIMAL_GAP``; a looser ``gap_tol`` reached
    is ``within_tolerance``.
    """
    if bounds not in BOUNDS:
        raise ValueError(f"bounds must be one of {BOUNDS}, got {bounds!r}")
    if not (0 <= gap_tol < 1):
        raise ValueError(f"gap_tol must be in [0, 1), got {gap_tol}")
    for name, val in (("time_limit", time_limit), ("node_limit", node_limit)):
        if val is not None and not isinstance(val, Deadline) and val <= 0:
            raise ValueError(f"{name} must be positive, got {val}")
    t0 = time.perf_counter()
    deadline = Deadline.of(time_limit)
    inst = instance
    G = inst.n_groups
    relax = NodeRelaxation(inst, bounds)
    node_rtol = gap_tol / 10

    best_w = np.zeros(inst.n)
    best_z = np.zeros(G)
    best = inst.objective(best_w, best_z)  # all groups dropped: always feasible
    polished: set[bytes] = set()

    def scale():
        return max(abs(best), 1e-10)

    def offer(w, z, value):
        nonlocal best, best_w, best_z
        if value < best:
            best, best_w, best_z = value, w.copy(), z.copy()

    def polish(z):
        key = z.astype(np.int8).tobytes()
        if key in polished:
            return
        polished.add(key)
        res = relax.solve(np.where(z > 0, IN, OUT), None, rtol=node_rtol, deadline=deadline)
        offer(res.w, z, inst.objective(res.w, z))

    counter = itertools.count()
    heap = [(-np.inf, 0, next(counter), np.full(G, FREE, dtype=np.int64), np.zeros(inst.n))]
    closed_min = np.inf  # min bound over nodes closed by pruning or integrality
    nodes = 0
    root_bound = -np.inf
    status = "optimal"
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"bnb[{bounds}]", unit="node", leave=False)
    while heap:
        cutoff = best - gap_tol * scale()
        if heap[0][0] >= cutoff:
            closed_min = min(closed_min, heap[0][0])
            heap.clear()
            break
        if deadline.expired():
            status = "time_limit"
            break
        if node_limit is not None and nodes >= node_limit:
            status = "node_limit"
            break
        lb, neg_depth, _, st, w0 = heapq.heappop(heap)
        res = relax.solve(st, w0, cutoff=cutoff, rtol=node_rtol, deadline=deadline)
        nodes += 1
        nlb = max(lb, res.lower_bound)
        if nodes == 1:
            root_bound = nlb
        if bar is not None:
            bar.update()
            bar.set_postfix(ub=f"{best:.6g}", lb=f"{min(nlb, heap[0][0]) if heap else nlb:.6g}")
        if nlb >= cutoff:
            closed_min = min(closed_min, nlb)
            continue
        zr, val = _rounded(inst, res.w)
        offer(res.w, zr, val)
        if val <= best + 1e-3 * abs(best) + 1e-12 or nodes == 1:  # within 0.1% of the incumbent
            polish(zr)
        free = np.flatnonzero(st == FREE)
        frac = np.minimum(res.z[free], 1 - res.z[free]) if free.size else np.zeros(0)
        if free.size == 0 or frac.max() <= _INTEGRAL_TOL:
            closed_min = min(closed_min, nlb)  # relaxation is exact here
            continue
        j = free[int(np.argmax(frac))]
        for fix in (OUT, IN):
            child = st.copy()
            child[j] = fix
            w_child = res.w.copy()
            if fix == OUT:
                w_child[list(inst.groups[j])] = 0.0
            heapq.heappush(heap, (nlb, neg_depth - 1, next(counter), child, w_child))
    if bar is not None:
        bar.close()
    open_min = min((h[0] for h in heap), default=np.inf)
    lower = min(closed_min, open_min, best)
    objective = inst.objective(best_w, best_z)
    gap = (objective - lower) / max(abs(objective), 1e-10)
    if status == "optimal" and gap > gap_tol * (1 + 1e-9):
        status = "gap_not_closed"  # only if a node hit its iteration limit
    elif status == "optimal":
        status = converged_status(gap)
    return BnBResult(objective, best_w, best_z, float(lower), float(max(gap, 0.0)), nodes,
                     time.perf_counter() - t0, status, float(root_bound), bounds)
