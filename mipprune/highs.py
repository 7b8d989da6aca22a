"""Everything that talks to HiGHS: the Pyomo solver factory, the retrying solve, a box QP.

HiGHS solves LP, MILP and convex QP, not MIQP and not quadratic constraints, so every model
sent here is a convex QP (z continuous or fixed by its bounds).  Two routes:

* :func:`highs_solver` / :func:`_solve_highs` -- a Pyomo model through the persistent
  ``pyomo.contrib.solver`` interface (``SolverFactory("highs")``, which passes quadratic
  objectives; ``appsi_highs`` does not);
* :class:`_HighsBoxQP` -- ``min 1/2 w^T H w + c^T w`` over column bounds, built once directly in
  highspy, only the bounds changed per solve (enumeration of z patterns).

Both routes keep HiGHS' default tolerances and retry with the same ``_QP_ATTEMPTS``.
``pyomo`` and ``highspy`` are imported inside the functions: importing :mod:`mipprune` loads
neither.
"""

from __future__ import annotations

import os
import sys

import numpy as np

__all__ = ["highs_solver"]


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
    convex but singular QPs (z and s enter linearly), or stalls in a very long run of
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


_BANNER_SHOWN = False


def _new_highs():
    """A silent ``highspy.Highs``.  The first construction in a process prints HiGHS' banner on
    file descriptor 1 whatever the options; it is sent to /dev/null so ``--json`` output stays
    clean."""
    global _BANNER_SHOWN
    import highspy

    if _BANNER_SHOWN:
        h = highspy.Highs()
    else:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
                h = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        _BANNER_SHOWN = True
    h.setOptionValue("output_flag", False)
    return h


# HiGHS' default regularization first; an iteration cap cuts off the rare stalls of the
# active-set method (one regularization can stall on a QP the other solves quickly), then the
# same without a cap.
_QP_ATTEMPTS = tuple({"qp_regularization_value": reg, "qp_iteration_limit": limit}
                     for limit in (20000, 2**31 - 1) for reg in (1e-7, 1e-5))


class _HighsBoxQP:
    """min 1/2 w^T H w + c^T w over column bounds, built once in highspy; bounds per pattern."""

    def __init__(self, H, c):
        import highspy

        self.h = h = _new_highs()
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

    def solve(self, lo, hi, deadline=None):
        """The minimiser for column bounds ``lo``, ``hi``; None when ``deadline`` (a
        :class:`~mipprune.deadline.Deadline`) stops HiGHS first."""
        h = self.h
        h.changeColsBounds(self.n, self._idx, np.asarray(lo, float), np.asarray(hi, float))
        for options in _QP_ATTEMPTS:  # same retries as the Pyomo route (see _solve_highs)
            for key, val in options.items():
                h.setOptionValue(key, val)
            if deadline is not None:
                deadline.watch(h)
            h.run()
            status = h.getModelStatus()
            if status == self._ok:
                return np.array(h.getSolution().col_value, dtype=float)
            if deadline is not None and deadline.expired():
                return None
        raise RuntimeError(f"HiGHS did not solve an enumeration QP: {h.modelStatusToString(status)}")
