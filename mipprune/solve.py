"""Exact solves and bounds of the pruning MIP through Pyomo + HiGHS.

HiGHS solves LP, MILP and convex QP, not MIQP and not quadratic constraints.  So:

* :func:`bigm_bound`      -- continuous relaxation of (P): one convex QP.
* :func:`pr_bound_cuts`   -- perspective (PR) relaxation: a QP whose perspective terms are
  outer-approximated by cuts added in a loop (lower bound every round, closed-form upper bound).
* :func:`enumerate_solve` -- the optimum of (P) by enumerating every z (one box-QP per pattern).

Every reported objective is re-evaluated in numpy at the returned point
(:meth:`Instance.objective`, :func:`mipprune.spr.spr_value`), never taken from the solver.
All ``pyomo`` imports happen inside the functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from . import models
from .instance import Instance
from .spr import spr

__all__ = [
    "Relaxation",
    "PerspectiveBound",
    "Enumeration",
    "bigm_bound",
    "pr_bound_cuts",
    "enumerate_solve",
    "solve_fixed_z",
    "highs_solver",
]


@dataclass(frozen=True)
class Relaxation:
    """A relaxation's optimum: ``value`` = objective re-evaluated at ``(w, z)``."""

    value: float
    w: np.ndarray
    z: np.ndarray
    seconds: float


@dataclass(frozen=True)
class PerspectiveBound:
    """PR relaxation by cuts: ``value`` (= ``lower``) is a valid lower bound (the QP value with
    cuts, re-evaluated in numpy); ``upper`` = f(w) + sum_j SPR_j(w_j) at the returned ``w``, the
    PR objective at the feasible point ``(w, z)`` (``z`` = SPR's z*); the PR relaxation value
    lies in ``[value, upper]``.  ``iterations`` = QP solves, ``cuts`` = cuts in the model."""

    value: float
    upper: float
    w: np.ndarray
    z: np.ndarray
    seconds: float
    iterations: int
    cuts: int
    converged: bool

    @property
    def lower(self) -> float:
        return self.value


@dataclass(frozen=True)
class Enumeration:
    """Optimum of (P) by enumeration: ``patterns`` = 2^G z-vectors accounted for,
    ``qp_solves`` = how many went to a HiGHS QP (the others were settled in numpy)."""

    value: float
    w: np.ndarray
    z: np.ndarray
    seconds: float
    patterns: int
    qp_solves: int


# ---- the HiGHS solver (Pyomo's pyomo.contrib.solver interface, persistent) -----------------
def highs_solver():
    """A fresh persistent HiGHS interface: ``SolverFactory("highs")`` of ``pyomo.contrib.solver``.

    (In Pyomo 6.10 the factory lives in ``pyomo.contrib.solver.common.factory``;
    ``pyomo.contrib.solver.factory`` still works with a deprecation warning.  The factory is
    filled when ``pyomo.environ`` is imported.  It passes quadratic objectives to HiGHS;
    ``appsi_highs`` does not.)
    """
    import pyomo.environ  # noqa: F401  (registers the solver plugins)
    from pyomo.contrib.solver.common.factory import SolverFactory

    solver = SolverFactory("highs")
    if solver is None or not solver.available():
        raise RuntimeError("HiGHS is not available to Pyomo: pip install highspy")
    return solver


def _solve_highs(model, what: str):
    """Solve ``model`` with the HiGHS interface cached on it (persistent: later calls send only
    what changed).  HiGHS' default tolerances are kept: tightening them makes its QP solver
    report solve errors.

    HiGHS' active-set QP solver sometimes stops with "Non-convex" (model status NotSet) on these
    convex but singular QPs (z and s enter linearly), or stalls for hundreds of thousands of
    iterations; re-running with another ``qp_regularization_value`` (default 1e-7) solves
    them, so ``_QP_ATTEMPTS`` are tried in turn before failing.
    """
    from pyomo.contrib.solver.common.results import TerminationCondition

    meta = model._mipprune
    solver = meta.get("highs")
    if solver is None:
        solver = meta["highs"] = highs_solver()
    for options in _QP_ATTEMPTS:
        res = solver.solve(model, load_solutions=False, raise_exception_on_nonoptimal_result=False,
                           threads=1, rel_gap=0.0, solver_options=options)
        if res.termination_condition == TerminationCondition.convergenceCriteriaSatisfied:
            res.solution_loader.load_vars()
            return res
    raise RuntimeError(f"HiGHS did not solve the {what} to optimality: "
                       f"{res.termination_condition.name}")


# HiGHS' default regularization first; an iteration cap cuts off the rare stalls of the
# active-set method (measured: 488k iterations / 15 s on one QP that 1,200 iterations solve
# with the other regularization), then the same without a cap.
_QP_ATTEMPTS = tuple({"qp_regularization_value": reg, "qp_iteration_limit": limit}
                     for limit in (20000, 2**31 - 1) for reg in (1e-7, 1e-5))


def _relaxed_model(instance, model, build):
    if model is None:
        return build(instance, relax=True)
    models.update(model, instance)
    if not models.is_relaxed(model):
        raise ValueError("model must be a continuous relaxation (built with relax=True)")
    return model


def _in_box(instance, w):
    M = instance.M[instance.group_of()]
    return np.clip(w, -M, M)


# ---- big-M relaxation ---------------------------------------------------------------------------
def bigm_bound(instance: Instance, model=None) -> Relaxation:
    """Continuous relaxation of (P) (z in [0, 1]): a convex QP solved by HiGHS.

    ``model`` (optional, from ``models.build_bigm(instance, relax=True)``) is updated with the
    instance's a, b, M and re-solved: sweeps do not rebuild.  The returned z is the projected
    optimum z_j = min(1, ||w_j||_inf / M_j) (the relaxation's minimiser for b >= 0), and
    ``value`` = ``instance.objective(w, z)`` = f(w) + sum_j a_j||w_j||^2 + b_j ||w_j||_inf / M_j.
    """
    t0 = time.perf_counter()
    model = _relaxed_model(instance, model, models.build_bigm)
    _solve_highs(model, "big-M relaxation")
    w, _ = models.solution_arrays(model)
    w = _in_box(instance, w)
    z = np.minimum(np.max(np.abs(instance.padded(w)), axis=1) / instance.M, 1.0)
    return Relaxation(instance.objective(w, z), w, z, time.perf_counter() - t0)


# ---- perspective relaxation by cuts -----------------------------------------------------------
def pr_bound_cuts(instance: Instance, tol: float = 1e-7, max_rounds: int = 100,
                  model=None) -> PerspectiveBound:
    """PR relaxation  min f(w) + sum_j [ a_j||w_j||^2/z_j + b_j z_j ],  |w_i| <= M_j z_j,
    z in [0, 1]  (= min_{|w_j| <= M_j} f(w) + sum_j SPR_j(w_j) with z projected out),
    as a HiGHS QP with perspective cuts added in a loop.

    Each round solves the QP   min f(w) + sum_j (s_j + b_j z_j)   over the box rows and the
    cuts  s_j >= a_j (2 v^T w_j - ||v||^2 z_j)  (valid for every v: a||w - v z||^2/z >= 0).  At
    its solution (w^, z^):

    * lower = f(w^) + sum_j (s_j + b_j z^_j), s_j = max(0, largest cut at the point), re-evaluated
      in numpy: the QP value, a lower bound because the cuts only relax the PR (valid up to
      HiGHS' optimality tolerance: it is the value at HiGHS' optimal point, not a dual bound);
    * upper = f(w^) + sum_j SPR_j(w^_j): the PR objective at the feasible point (w^, z*(w^)).

    For fixed w^ the QP separates by group, so s_j + b_j z^_j is the cut model's projected
    penalty h_j(w^_j) <= SPR_j(w^_j), and upper - lower = sum_j gap_j with
    gap_j = SPR_j(w^_j) - h_j(w^_j) >= 0.  Stop when upper - lower <= tol * scale
    (scale = max(|lower|, |upper|, 1e-12)); otherwise, for every group with
    gap_j > tol * scale / G, add the cut at v = w^_j / z*_j, z* = min(1, max(u, c t)) the SPR
    optimum (u = ||w^_j||_inf / M_j, c = sqrt(a/b), t = ||w^_j||): the tangent plane of the
    perspective at (w^_j, z*_j), which makes the cut model exact at w^_j
    (h_j(w^_j) = SPR_j(w^_j)) -- Kelley's cutting planes on the projected penalty, with f kept
    exact in the QP.  z* >= u keeps v in the box [-M_j, M_j]; w^_j = 0 has gap 0 (0/0 := 0),
    so z -> 0 needs no floor.  (The "deepest" cut at v = w^_j / z^_j is worse in practice:
    with z^_j small it sits at a corner of the box, and since every perspective cut passes
    through (w, z, s) = 0 the extra rows make the active-set QP highly degenerate -- measured
    up to 100x more QP iterations.)

    HiGHS' QP solutions are accurate to about 1e-9 relative, so ``tol`` much below that cannot
    be certified.  ``model`` (optional, ``models.build_pr(instance, relax=True)``) is updated
    and re-solved with its cuts kept (valid for every a, b, M): a sweep over b warm-starts.
    """
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if int(max_rounds) < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    t0 = time.perf_counter()
    model = _relaxed_model(instance, model, models.build_pr)
    if model._mipprune["kind"] != "pr":
        raise ValueError("model must be a PR model (models.build_pr)")
    if any(c.active for c in model.cone.values()):
        raise ValueError("HiGHS takes no quadratic constraints: build the PR model with cone=False")
    cuts = model._mipprune["cut_v"]  # per group: [(row, v)], the numpy mirror of model.cuts
    a, b, M = instance.a, instance.b, instance.M
    G = instance.n_groups
    best_lower, best_upper, best_w, best_z = -np.inf, np.inf, None, None
    converged = False
    rounds = 0
    for rounds in range(1, int(max_rounds) + 1):
        _solve_highs(model, "perspective relaxation QP")
        w, z = models.solution_arrays(model)
        w = _in_box(instance, w)
        z = np.clip(z, 0.0, 1.0)
        wp = instance.padded(w)
        s = np.array([_cut_max(a[j], cuts[j], wp[j, : len(g)], z[j])
                      for j, g in enumerate(instance.groups)])
        fw = instance.f(w)
        lower = fw + float(s.sum() + b @ z)
        res = spr(wp, a, b, M)
        upper = fw + float(np.sum(res.value))
        gap = res.value - (s + b * z)
        best_lower = max(best_lower, lower)
        if upper < best_upper:
            best_upper, best_w, best_z = upper, w, np.asarray(res.z, float)
        thresh = tol * max(abs(best_lower), abs(best_upper), 1e-12)
        if best_upper - best_lower <= thresh:
            converged = True
            break
        if rounds == max_rounds:
            break
        added = 0
        for j in np.flatnonzero(gap > thresh / G):
            k = len(instance.groups[j])
            zj = float(res.z[j])
            if zj > 0:
                v = np.clip(wp[j, :k] / zj, -M[j], M[j])
                if not any(np.array_equal(v, old) for _, old in cuts[j]):
                    models.add_perspective_cut(model, int(j), v)
                    added += 1
        if not added:  # the cut model is exact at w^ up to round-off: nothing left to add
            break
    return PerspectiveBound(best_lower, best_upper, best_w, best_z, time.perf_counter() - t0,
                            rounds, sum(model._mipprune["cut_count"]), converged)


def _cut_max(a, cuts, w, z) -> float:
    """s_j at a point: max(0, max over the group's cuts of a (2 v^T w - ||v||^2 z))."""
    if not cuts:
        return 0.0
    V = np.array([v for _, v in cuts])
    return max(0.0, float(np.max(a * (2.0 * V @ w - np.sum(V * V, axis=1) * z))))


# ---- enumeration ----------------------------------------------------------------------------------
def enumerate_solve(instance: Instance, max_groups: int = 16, method: str = "fast",
                    chunk: int = 4096) -> Enumeration:
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
    """
    G = instance.n_groups
    if G > max_groups:
        raise ValueError(f"enumeration of {G} groups (2^{G} patterns) exceeds max_groups={max_groups}")
    if method not in ("fast", "pyomo"):
        raise ValueError(f"method must be 'fast' or 'pyomo', got {method!r}")
    t0 = time.perf_counter()
    if method == "pyomo":
        value, w, z, qps = _enumerate_pyomo(instance)
    else:
        value, w, z, qps = _enumerate_fast(instance, int(chunk))
    return Enumeration(value, w, z, time.perf_counter() - t0, 2 ** G, qps)


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


def _enumerate_pyomo(instance):
    model = models.build_bigm(instance, relax=True)
    G = instance.n_groups
    best = (np.inf, None, None)
    for code in range(2 ** G):
        z = np.array([(code >> j) & 1 for j in range(G)], dtype=float)
        models.fix_pattern(model, z)
        _solve_highs(model, f"pattern {z.astype(int).tolist()} QP")
        w, _ = models.solution_arrays(model)
        w = _in_box(instance, w) * z[instance.group_of()]
        val = instance.objective(w, z)
        if val < best[0]:
            best = (val, w, z)
    return best + (2 ** G,)


class _HighsBoxQP:
    """min 1/2 w^T H w + c^T w over column bounds, built once in highspy; bounds per pattern."""

    def __init__(self, H, c):
        import highspy

        self.h = h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("threads", 1)
        n = c.shape[0]
        self.n = n
        inf = highspy.kHighsInf
        h.addVars(n, np.full(n, -inf), np.full(n, inf))
        h.changeColsCost(n, np.arange(n, dtype=np.int32), np.asarray(c, float))
        L = np.tril(H)
        start, index, value = [0], [], []
        for col in range(n):  # lower triangle, column-wise
            rows = np.flatnonzero(L[:, col])
            index.extend(rows.tolist())
            value.extend(L[rows, col].tolist())
            start.append(len(index))
        h.passHessian(n, len(value), highspy.HessianFormat.kTriangular,
                      np.array(start[:-1], dtype=np.int32), np.array(index, dtype=np.int32),
                      np.array(value, dtype=float))
        self._ok = highspy.HighsModelStatus.kOptimal
        self._idx = np.arange(n, dtype=np.int32)

    def solve(self, lo, hi):
        h = self.h
        h.changeColsBounds(self.n, self._idx, np.asarray(lo, float), np.asarray(hi, float))
        for options in _QP_ATTEMPTS:  # same retries as the Pyomo route (see _solve_highs)
            for key, val in options.items():
                h.setOptionValue(key, val)
            h.run()
            status = h.getModelStatus()
            if status == self._ok:
                return np.array(h.getSolution().col_value, dtype=float)
        raise RuntimeError(f"HiGHS did not solve an enumeration QP: {h.modelStatusToString(status)}")


def _enumerate_fast(instance, chunk):
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
        w = qp[0].solve(np.where(keep, -Mv, 0.0), np.where(keep, Mv, 0.0))
        w = np.clip(w, -Mv, Mv) * keep
        return instance.objective(w, z), w

    zero = np.zeros(G)
    best_val, best_w, best_z = instance.objective(np.zeros(n), zero), np.zeros(n), zero
    pending = []  # (lower bound, z) of box-violating patterns
    qps = 0
    for size in range(1, G + 1):
        combos = np.array(list(combinations(range(G), size)), dtype=np.int64)
        if not pd:
            for row in combos:
                pending.append((-np.inf, row))
            continue
        # variable indices of each pattern's kept groups (groups may differ in size: pad by
        # pointing at a dummy row of an identity extension)
        for start in range(0, len(combos), chunk):
            rows = combos[start:start + chunk]
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
        val, w = qp_pattern(z)
        qps += 1
        if val < best_val:
            best_val, best_w, best_z = val, w, z
    return best_val, best_w, best_z, qps


def _gather(instance, rows):
    """Variable indices (P, kmax * size) of each pattern's kept groups, and a validity mask."""
    index = instance.index  # (G, kmax), -1 padded
    idx = index[rows].reshape(len(rows), -1)
    valid = idx >= 0
    return np.maximum(idx, 0), valid
