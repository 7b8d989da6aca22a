"""The exact selection: a MILP solved by HiGHS, built directly in highspy (Pyomo as reference).

Variables: x[f,k] in {0,1} (family f takes its k-th width) and, for every coupled pair (a, b)
(terms on the same pair merged first), y[a,b,k,l] in [0,1] standing for x[a,k] x[b,l]:

    max   sum_{f,k} v_f[k] x[f,k] + sum_{(a,b),k,l} V_ab[k,l] y[a,b,k,l]
    s.t.  sum_k x[f,k] = 1                                              for every f
          sum_l y[a,b,k,l] = x[a,k],   sum_k y[a,b,k,l] = x[b,l]        for every pair, k, l
          ( sum_{f,k} u_f[k] x[f,k] + sum C_ab[k,l] y[a,b,k,l] ) / s <= (budget - constant) / s

The two marginal rows (the "local marginal" or transportation constraints) make y exact for
binary x: row k of y sums to x[a,k], so every row but k_a is 0, and that row is the one-hot
column x[b,.].  They imply the McCormick rows (y <= x[a,k], y <= x[b,l],
y >= x[a,k] + x[b,l] - 1) and are tighter: over a forest of pairs without the budget row their
relaxation is integral.  The whole y block of a pair is kept (dropping y entries whose cost and
value are 0 would loosen the marginal rows); a pair whose merged cost and value are all 0 is
left out.  The budget row is divided by s = the problem's cost scale so that HiGHS' feasibility
tolerance (set to the problem's ``FEAS_RTOL``) means ``cost <= budget + tol``.

HiGHS stops at ``mip_rel_gap = gap`` (``mip_abs_gap`` is 0, so the relative gap alone decides);
the widths are read from x, value and cost re-evaluated in numpy, and the certified gap is
computed from HiGHS' dual bound (:func:`problem.relative_gap`).  :func:`solve_selection` passes
the matrix to HiGHS in one call; :func:`solve_selection_pyomo` states the same MILP in Pyomo
(the reference formulation, slower to build).
"""

from __future__ import annotations

import time

import numpy as np

from ..deadline import Deadline
from ..highs import _new_highs
from ..status import converged_status
from .baselines import greedy, improve
from .problem import FEAS_RTOL, SelectionProblem
from .result import SelectionResult, relative_gap

__all__ = ["solve_selection", "solve_selection_pyomo", "milp_arrays"]


def milp_arrays(problem: SelectionProblem) -> dict:
    """The MILP above as arrays: column-wise sparse matrix, bounds, objective, integrality.

    Columns: every x[f,.] (family order), then every pair's y block row-major (k * K_b + l).
    Rows: F one-hot rows, then per pair K_a + K_b marginal rows, then the budget row.
    """
    sizes = np.array(problem.sizes)
    F = sizes.shape[0]
    xo = np.concatenate([[0], np.cumsum(sizes)])
    pairs = [p for p in problem.pairs if p[2].any() or p[3].any()]
    scale = problem.cost_scale or 1.0
    rows, cols, vals = [], [], []
    fam_of = np.repeat(np.arange(F), sizes)
    rows.append(fam_of)
    cols.append(np.arange(xo[-1]))
    vals.append(np.ones(xo[-1]))
    cost = [np.concatenate([f.value for f in problem.families])]
    budget_coef = [np.concatenate(problem.unary_cost) / scale]
    ncol, nrow = int(xo[-1]), F
    for i, j, C, V in pairs:
        Ka, Kb = C.shape
        ya = np.arange(Ka * Kb)
        k, l = np.divmod(ya, Kb)
        ra, rb = nrow, nrow + Ka
        rows += [ra + k, rb + l, ra + np.arange(Ka), rb + np.arange(Kb)]
        cols += [ncol + ya, ncol + ya, xo[i] + np.arange(Ka), xo[j] + np.arange(Kb)]
        vals += [np.ones(2 * Ka * Kb), -np.ones(Ka + Kb)]
        cost.append(V.ravel())
        budget_coef.append(C.ravel() / scale)
        ncol += Ka * Kb
        nrow += Ka + Kb
    coef = np.concatenate(budget_coef)
    nz = np.flatnonzero(coef)
    rows.append(np.full(nz.shape[0], nrow))
    cols.append(nz)
    vals.append(coef[nz])
    nrow += 1
    r, c, v = (np.concatenate(a) for a in (rows, cols, vals))
    order = np.argsort(c, kind="stable")
    start = np.concatenate([[0], np.cumsum(np.bincount(c, minlength=ncol))])
    lower = np.zeros(nrow)
    upper = np.zeros(nrow)
    lower[:F] = upper[:F] = 1.0
    lower[-1] = -np.inf
    upper[-1] = (problem.budget - problem.constant) / scale
    return {"ncol": ncol, "nrow": nrow, "nx": int(xo[-1]), "x_offsets": xo,
            "cost": np.concatenate(cost), "col_lower": np.zeros(ncol), "col_upper": np.ones(ncol),
            "row_lower": lower, "row_upper": upper, "start": start.astype(np.int32),
            "index": r[order].astype(np.int32), "value": v[order].astype(float),
            "pairs": pairs}


def _options(gap):
    """HiGHS' options (the time limit comes from the deadline: :meth:`Deadline.watch`)."""
    return {"threads": 1, "mip_rel_gap": float(gap), "mip_abs_gap": 0.0, "presolve_mode": 2,
            "mip_feasibility_tolerance": FEAS_RTOL, "primal_feasibility_tolerance": FEAS_RTOL}


def _check_args(time_limit, gap):
    if time_limit is not None and not isinstance(time_limit, Deadline) and not (
            time_limit >= 0 and np.isfinite(time_limit)):
        raise ValueError(f"time_limit must be a finite number >= 0, got {time_limit}")
    if not (gap >= 0 and np.isfinite(gap)):
        raise ValueError(f"gap must be a finite number >= 0, got {gap}")


def _result(problem, status, x, x_offsets, bound, t0) -> SelectionResult:
    """Widths from x (argmax per family), value and cost re-evaluated in numpy."""
    if x is None:
        return SelectionResult(status, None, None, None, None, bound, time.perf_counter() - t0)
    choice = np.array([int(np.argmax(x[x_offsets[f]:x_offsets[f + 1]]))
                       for f in range(len(problem.families))])
    value, cost = problem.evaluate(choice)
    if not problem.fits(cost):  # HiGHS' rows hold to FEAS_RTOL: an internal invariant
        raise RuntimeError(f"HiGHS returned widths of cost {cost!r} over the budget "
                           f"{problem.budget!r} (tolerance {problem.tol:.3g})")
    gap = relative_gap(value, bound)
    if status == "optimal":
        status = converged_status(gap)
    return SelectionResult(status, problem.widths_of(choice), value, cost, gap, bound,
                           time.perf_counter() - t0)


def _highs_lp(A, integer: bool = True):
    """The arrays of :func:`milp_arrays` as a ``highspy.HighsLp`` (x integer unless
    ``integer=False``: the LP relaxation)."""
    import highspy

    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = A["ncol"], A["nrow"]
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = A["cost"], A["col_lower"], A["col_upper"]
    lp.row_lower_ = np.maximum(A["row_lower"], -highspy.kHighsInf)
    lp.row_upper_ = A["row_upper"]
    lp.sense_ = highspy.ObjSense.kMaximize
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = A["ncol"], A["nrow"]
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = A["start"], A["index"], A["value"]
    if integer:
        integ = np.full(A["ncol"], highspy.HighsVarType.kContinuous)
        integ[:A["nx"]] = highspy.HighsVarType.kInteger
        lp.integrality_ = integ.tolist()
    return lp


def _start(problem, A):
    """A feasible MILP point from greedy + local search (None if greedy finds none): x one-hot,
    y the outer product of its two families' x."""
    g = greedy(problem)
    if not g.found:
        return None
    choice = improve(problem, problem.choice_of(g.widths))
    sol = np.zeros(A["ncol"])
    sol[A["x_offsets"][:-1] + choice] = 1.0
    col = A["nx"]
    for i, j, C, _ in A["pairs"]:
        sol[col + choice[i] * C.shape[1] + choice[j]] = 1.0
        col += C.size
    return sol


def solve_selection(problem: SelectionProblem, time_limit: float | Deadline | None = None,
                    gap: float = 1e-6, warm_start: bool = True) -> SelectionResult:
    """Solve the selection MILP (module docstring) with HiGHS, built directly in highspy.

    ``time_limit`` (seconds, or a :class:`Deadline` shared with earlier phases) bounds the
    whole call, model building included: HiGHS gets what is left and is interrupted at the
    deadline (it checks now and then, so it may overrun by a fraction of a second).
    ``warm_start`` hands HiGHS the greedy choice improved by local search
    (:func:`baselines.improve`) as its first incumbent.  Returns status ``optimal`` (a gap of
    at most ``status.OPTIMAL_GAP``), ``within_tolerance`` (a looser ``gap`` reached),
    ``infeasible`` or ``time_limit`` (with the best widths found and their certified gap, or
    ``widths=None`` when none was found).
    """
    _check_args(time_limit, gap)
    t0 = time.perf_counter()
    deadline = Deadline.of(time_limit)
    import highspy

    A = milp_arrays(problem)
    lp = _highs_lp(A)
    start = _start(problem, A) if warm_start else None
    h = _new_highs()
    for key, val in _options(gap).items():
        h.setOptionValue(key, val)
    deadline.watch(h)
    h.passModel(lp)
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = start
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    ms = h.getModelStatus()
    S = highspy.HighsModelStatus
    info = h.getInfo()
    if ms == S.kInfeasible:
        return SelectionResult("infeasible", None, None, None, None, None, time.perf_counter() - t0)
    if ms not in (S.kOptimal, S.kTimeLimit, S.kInterrupt):
        raise RuntimeError(f"HiGHS stopped with model status {h.modelStatusToString(ms)}")
    has_x = info.primal_solution_status == 2  # kSolutionStatusFeasible
    x = np.asarray(h.getSolution().col_value[:A["nx"]]) if has_x else None
    bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else None
    return _result(problem, "optimal" if ms == S.kOptimal else "time_limit", x, A["x_offsets"],
                   bound, t0)


def solve_selection_pyomo(problem: SelectionProblem, time_limit: float | Deadline | None = None,
                          gap: float = 1e-6) -> SelectionResult:
    """The same MILP stated in Pyomo, solved through ``SolverFactory("highs")`` (the reference
    formulation: same rows, same scaling, same options; slower to build)."""
    _check_args(time_limit, gap)
    t0 = time.perf_counter()
    deadline = Deadline.of(time_limit)
    import pyomo.environ as pyo
    from pyomo.contrib.solver.common.results import SolutionStatus, TerminationCondition

    from ..highs import highs_solver

    fams = problem.families
    pairs = [p for p in problem.pairs if p[2].any() or p[3].any()]
    scale = problem.cost_scale or 1.0
    m = pyo.ConcreteModel()
    m.X = pyo.Set(initialize=[(f, k) for f, fam in enumerate(fams) for k in range(fam.widths.shape[0])],
                  dimen=2)
    m.Y = pyo.Set(initialize=[(p, k, l) for p, (_, _, C, _) in enumerate(pairs)
                              for k in range(C.shape[0]) for l in range(C.shape[1])], dimen=3)
    m.x = pyo.Var(m.X, domain=pyo.Binary)
    m.y = pyo.Var(m.Y, bounds=(0, 1))
    m.one = pyo.Constraint(range(len(fams)), rule=lambda m, f: sum(
        m.x[f, k] for k in range(fams[f].widths.shape[0])) == 1)
    m.row_a = pyo.Constraint([(p, k) for p, (_, _, C, _) in enumerate(pairs) for k in range(C.shape[0])],
                             rule=lambda m, p, k: sum(m.y[p, k, l] for l in range(pairs[p][2].shape[1]))
                             == m.x[pairs[p][0], k])
    m.row_b = pyo.Constraint([(p, l) for p, (_, _, C, _) in enumerate(pairs) for l in range(C.shape[1])],
                             rule=lambda m, p, l: sum(m.y[p, k, l] for k in range(pairs[p][2].shape[0]))
                             == m.x[pairs[p][1], l])
    value = sum(float(fams[f].value[k]) * m.x[f, k] for f, k in m.X) + sum(
        float(pairs[p][3][k, l]) * m.y[p, k, l] for p, k, l in m.Y)
    cost = sum(float(problem.unary_cost[f][k]) / scale * m.x[f, k] for f, k in m.X) + sum(
        float(pairs[p][2][k, l]) / scale * m.y[p, k, l] for p, k, l in m.Y)
    m.obj = pyo.Objective(expr=value, sense=pyo.maximize)
    m.budget = pyo.Constraint(expr=cost <= (problem.budget - problem.constant) / scale)
    left = deadline.left()
    opts = _options(gap)
    kw = {"rel_gap": opts.pop("mip_rel_gap"), "threads": opts.pop("threads")}
    if left is not None:
        kw["time_limit"] = left
    res = highs_solver().solve(m, load_solutions=False, raise_exception_on_nonoptimal_result=False,
                               solver_options=opts, **kw)
    tc = res.termination_condition
    if tc in (TerminationCondition.provenInfeasible, TerminationCondition.infeasibleOrUnbounded):
        return SelectionResult("infeasible", None, None, None, None, None, time.perf_counter() - t0)
    if tc not in (TerminationCondition.convergenceCriteriaSatisfied,
                  TerminationCondition.maxTimeLimit):
        raise RuntimeError(f"HiGHS (Pyomo) stopped with {tc.name}")
    bound = res.objective_bound
    bound = float(bound) if bound is not None and np.isfinite(bound) else None
    x = None
    if res.solution_status in (SolutionStatus.feasible, SolutionStatus.optimal):
        res.solution_loader.load_vars()
        x = np.array([pyo.value(m.x[f, k]) for f, k in m.X])
    xo = np.concatenate([[0], np.cumsum(problem.sizes)])
    status = "optimal" if tc == TerminationCondition.convergenceCriteriaSatisfied else "time_limit"
    return _result(problem, status, x, xo, bound, t0)
