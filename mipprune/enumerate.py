"""The optimum of (P) by enumerating z: the independent check of branch and bound.

For a fixed 0/1 pattern z, (P) is a convex box-QP in w, so the optimum of (P) is the least of
its 2^G pattern values.

* :func:`enumerate_solve` -- every pattern, settled in numpy where the unconstrained minimiser
  lies in the box and by a HiGHS QP otherwise (or every pattern through Pyomo, for cross-checks);
* :func:`solve_fixed_z`   -- the box-QP of one pattern (polishes external solutions).

Every reported objective is re-evaluated in numpy (:meth:`Instance.objective`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from . import models
from .bounds import Relaxation, _in_box
from .deadline import Deadline
from .highs import _HighsBoxQP, _solve_highs
from .instance import Instance

__all__ = ["Enumeration", "enumerate_solve", "solve_fixed_z"]


@dataclass(frozen=True)
class Enumeration:
    """Optimum of (P) by enumeration: ``patterns`` = 2^G z-vectors accounted for,
    ``qp_solves`` = how many went to a HiGHS QP (the others were settled in numpy).
    ``status`` is ``optimal``, or ``time_limit`` when the time limit stopped it first: then
    ``value``, ``w``, ``z`` are the best pattern found (no optimality claim) and ``patterns``
    those examined."""

    value: float
    w: np.ndarray
    z: np.ndarray
    seconds: float
    patterns: int
    qp_solves: int
    status: str = "optimal"


def enumerate_solve(instance: Instance, max_groups: int = 16, method: str = "fast",
                    chunk: int = 4096, time_limit: float | Deadline | None = None) -> Enumeration:
    """Optimum of (P) by enumerating all 2^G patterns z; for each, the convex box-QP

        min  f(w) + sum_{j: z_j=1} a_j||w_j||^2 + b^T z    s.t.  w_j = 0 (z_j = 0),
                                                                 |w_i| <= M_j (z_j = 1).

    ``method="pyomo"``: every pattern is a QP through Pyomo + HiGHS on one relaxed big-M model
    built once, z fixed by its bounds (slow; for cross-checks on tiny instances).
    ``method="fast"`` (default), exact too: with H = Q + 2 diag(a) positive definite, each
    pattern's unconstrained minimiser (solve H_SS w_S = -c_S, batched in numpy over all patterns
    with the same number of kept groups) is the QP's optimum when it lies in the box.  Otherwise
    its value is a lower bound on that pattern's QP (exactly: value(w^) - ||r||^2/(2 lambda_min(H)),
    r the residual, lambda_min(H_SS) >= lambda_min(H) by interlacing); those patterns are solved
    by HiGHS (highspy, one model built once, column bounds changed per pattern) in order of
    their bound until the bound reaches the incumbent.  H not positive definite (a = 0 and
    singular Q): every pattern goes to HiGHS.

    ``time_limit`` (seconds, or a :class:`Deadline` shared with earlier phases) is checked
    between batches of patterns and passed to HiGHS.
    """
    G = instance.n_groups
    if G > max_groups:
        raise ValueError(f"enumeration of {G} groups (2^{G} patterns) exceeds max_groups={max_groups}")
    if method not in ("fast", "pyomo"):
        raise ValueError(f"method must be 'fast' or 'pyomo', got {method!r}")
    t0 = time.perf_counter()
    deadline = Deadline.of(time_limit)
    if method == "pyomo":
        value, w, z, qps, seen = _enumerate_pyomo(instance, deadline)
    else:
        value, w, z, qps, seen = _enumerate_fast(instance, int(chunk), deadline)
    status = "optimal" if seen is None else "time_limit"
    return Enumeration(value, w, z, time.perf_counter() - t0, 2 ** G if seen is None else seen, qps,
                       status)


def solve_fixed_z(instance: Instance, z) -> Relaxation:
    """The convex box-QP of (P) for one 0/1 pattern ``z`` (w_j = 0 where z_j = 0,
    |w_i| <= M_j where z_j = 1): numpy's linear solve when the unconstrained minimiser lies in
    the box (H = Q + 2 diag(a) positive definite), else HiGHS.  Polishes external solutions."""
    t0 = time.perf_counter()
    G, n = instance.n_groups, instance.n
    z = np.asarray(z, dtype=float)
    if z.shape != (G,) or not np.all((z == 0) | (z == 1)):
        raise ValueError(f"z must be {G} zeros and ones, got {z.tolist()}")
    gof = instance.group_of()
    Mv = instance.M[gof]
    keep = z[gof] > 0
    H = instance.Q + 2.0 * np.diag(instance.a[gof])
    w = np.zeros(n)
    S = np.flatnonzero(keep)
    solved = False
    if S.size:
        HS = H[np.ix_(S, S)]
        try:
            np.linalg.cholesky(HS)
            x = np.linalg.solve(HS, -instance.c[S])
            solved = bool(np.all(np.abs(x) <= Mv[S]))
        except np.linalg.LinAlgError:
            solved = False
        if solved:
            w[S] = x
        else:
            qp = _HighsBoxQP(H, instance.c)
            w = np.clip(qp.solve(np.where(keep, -Mv, 0.0), np.where(keep, Mv, 0.0)), -Mv, Mv) * keep
    return Relaxation(instance.objective(w, z), w, z, time.perf_counter() - t0)


def _enumerate_pyomo(instance, deadline):
    """(value, w, z, QP solves, None), or the pattern count examined in place of None when the
    deadline stopped it (as ``_enumerate_fast``)."""
    model = models.build_bigm(instance, relax=True)
    G = instance.n_groups
    zero = np.zeros(G)
    best = (instance.objective(np.zeros(instance.n), zero), np.zeros(instance.n), zero)
    for code in range(2 ** G):
        if deadline.expired():
            return best + (code, code)
        z = np.array([(code >> j) & 1 for j in range(G)], dtype=float)
        models.fix_pattern(model, z)
        _solve_highs(model, f"pattern {z.astype(int).tolist()} QP")
        w, _ = models.solution_arrays(model)
        w = _in_box(instance, w) * z[instance.group_of()]
        val = instance.objective(w, z)
        if val < best[0]:
            best = (val, w, z)
    return best + (2 ** G, None)


def _enumerate_fast(instance, chunk, deadline):
    """(value, w, z, QP solves, None); in place of None, the number of patterns examined when
    the deadline stopped it first."""
    G, n = instance.n_groups, instance.n
    gof = instance.group_of()
    Mv = instance.M[gof]
    H = instance.Q + 2.0 * np.diag(instance.a[gof])
    c = instance.c
    lam = float(np.linalg.eigvalsh(H).min()) if n else 1.0
    pd = lam > 1e-10 * max(1.0, float(np.abs(H).max()))
    qp = []  # the HiGHS model, built on first need

    def qp_pattern(z):
        keep = z[gof] > 0
        if not qp:
            qp.append(_HighsBoxQP(H, c))
        w = qp[0].solve(np.where(keep, -Mv, 0.0), np.where(keep, Mv, 0.0), deadline)
        if w is None:
            return None, None
        w = np.clip(w, -Mv, Mv) * keep
        return instance.objective(w, z), w

    zero = np.zeros(G)
    best_val, best_w, best_z = instance.objective(np.zeros(n), zero), np.zeros(n), zero
    pending = []  # (lower bound, z) of box-violating patterns
    qps = 0
    seen = 1  # patterns examined (the empty one so far)
    for size in range(1, G + 1):
        combos = np.array(list(combinations(range(G), size)), dtype=np.int64)
        if not pd:
            for row in combos:
                pending.append((-np.inf, row))
            seen += len(combos)
            continue
        # variable indices of each pattern's kept groups (groups may differ in size: pad by
        # pointing at a dummy row of an identity extension)
        for start in range(0, len(combos), chunk):
            if deadline.expired():
                return best_val, best_w, best_z, qps, seen
            rows = combos[start:start + chunk]
            seen += len(rows)
            idx, valid = _gather(instance, rows)
            ragged = not valid.all()  # groups of different sizes: padded slots
            Hs = H[idx[:, :, None], idx[:, None, :]]
            cs = c[idx]
            if ragged:  # padded slots get an identity row and a zero right-hand side
                eye = np.eye(idx.shape[1])
                Hs = np.where(valid[:, :, None] & valid[:, None, :], Hs, eye * ~valid[:, :, None])
                cs = np.where(valid, cs, 0.0)
            x = np.linalg.solve(Hs, -cs[:, :, None])[:, :, 0]
            if ragged:
                x = np.where(valid, x, 0.0)
            # at H_SS x = -c_S the value 1/2 x^T H x + c^T x equals 1/2 c^T x
            base = instance.const + instance.b[rows].sum(axis=1)
            vals = base + 0.5 * np.einsum("pi,pi->p", cs, x)
            Mk = np.where(valid, Mv[idx], np.inf) if ragged else Mv[idx]
            feas = ~(np.abs(x) > Mk * (1.0 + 1e-12)).any(axis=1)
            if feas.any():
                i = int(np.argmin(np.where(feas, vals, np.inf)))
                if vals[i] < best_val:
                    z = np.zeros(G)
                    z[rows[i]] = 1.0
                    w = np.zeros(n)
                    w[idx[i][valid[i]]] = x[i][valid[i]]
                    w = np.clip(w, -Mv, Mv)
                    val = instance.objective(w, z)  # re-evaluated on the full instance
                    if val < best_val:
                        best_val, best_w, best_z = val, w, z
            bad = np.flatnonzero(~feas)
            if bad.size:  # rigorous lower bounds of the box-violating patterns' QPs
                Hb, xb, cb = Hs[bad], x[bad], cs[bad]
                r = np.einsum("pij,pj->pi", Hb, xb) + cb
                quad = 0.5 * np.einsum("pi,pi->p", xb, r + cb)  # 1/2 x^T H x + c^T x
                lows = base[bad] + quad - np.einsum("pi,pi->p", r, r) / (2.0 * lam)
                pending.extend((float(lo), rows[i]) for lo, i in zip(lows, bad))
    pending.sort(key=lambda t: t[0])
    for low, row in pending:
        if low >= best_val:
            break
        z = np.zeros(G)
        z[row] = 1.0
        val, w = qp_pattern(z) if not deadline.expired() else (None, None)
        if val is None:
            return best_val, best_w, best_z, qps, seen
        qps += 1
        if val < best_val:
            best_val, best_w, best_z = val, w, z
    return best_val, best_w, best_z, qps, None


def _gather(instance, rows):
    """Variable indices (P, kmax * size) of each pattern's kept groups, and a validity mask."""
    index = instance.index  # (G, kmax), -1 padded
    idx = index[rows].reshape(len(rows), -1)
    valid = idx >= 0
    return np.maximum(idx, 0), valid
