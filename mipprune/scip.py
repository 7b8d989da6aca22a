"""SCIP as the external peer (optional; PySCIPOpt is installed for benchmarks only).

The model is built natively in PySCIPOpt, not through Pyomo, so the time reported is SCIP's
own solving time (``Model.getSolvingTime``) and not Pyomo's expression building:

    min  t + r + sum_j b_j z_j + const
    s.t. t >= 1/2 w^T Q w + c^T w            (one convex quadratic row)
         r >= sum_j a_j ||w_j||^2            (formulation "bigm")
      or s_j z_j >= a_j ||w_j||^2, r = sum s_j  (formulation "pr": rotated cones; SCIP adds
                                                 perspective cuts itself)
         |w_i| <= M_j z_j,  z binary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .instance import Instance
from .enumerate import solve_fixed_z

__all__ = ["ScipResult", "scip_solve", "scip_available"]


@dataclass(frozen=True)
class ScipResult:
    objective: float      # re-evaluated in numpy at (w, z); w re-solved exactly for SCIP's z
    w: np.ndarray
    z: np.ndarray
    lower_bound: float    # SCIP's dual bound
    gap: float
    nodes: int
    seconds: float        # SCIP's solving time
    wall_seconds: float   # including building the model
    status: str


def scip_available() -> bool:
    try:
        import pyscipopt  # noqa: F401
    except ImportError:
        return False
    return True


def scip_solve(instance: Instance, formulation: str = "bigm", gap_tol: float = 1e-6,
               time_limit: float | None = None, threads: int = 1) -> ScipResult:
    """Solve (P) with SCIP to the relative gap ``gap_tol``."""
    if formulation not in ("bigm", "pr"):
        raise ValueError(f"formulation must be 'bigm' or 'pr', got {formulation!r}")
    try:
        from pyscipopt import Model, quicksum
    except ImportError as exc:
        raise RuntimeError("SCIP is not installed: pip install pyscipopt") from exc
    t0 = time.perf_counter()
    inst = instance
    m = Model()
    m.hideOutput()
    gof = inst.group_of()
    w = [m.addVar(lb=-float(inst.M[gof[i]]), ub=float(inst.M[gof[i]]), name=f"w{i}")
         for i in range(inst.n)]
    z = [m.addVar(vtype="B", name=f"z{j}") for j in range(inst.n_groups)]
    t = m.addVar(lb=None, name="t")
    iu, ju = np.nonzero(np.triu(inst.Q))
    quad = quicksum((0.5 if i == j else 1.0) * float(inst.Q[i, j]) * w[i] * w[j] for i, j in zip(iu, ju))
    m.addCons(t >= quad + quicksum(float(ci) * wi for ci, wi in zip(inst.c, w) if ci != 0))
    for j, g in enumerate(inst.groups):
        for i in g:
            m.addCons(w[i] <= float(inst.M[j]) * z[j])
            m.addCons(-w[i] <= float(inst.M[j]) * z[j])
    if formulation == "bigm":
        r = m.addVar(lb=0.0, name="r")
        m.addCons(r >= quicksum(float(inst.a[j]) * w[i] * w[i] for j, g in enumerate(inst.groups) for i in g))
        ridge = [r]
    else:
        ridge = []
        for j, g in enumerate(inst.groups):
            s = m.addVar(lb=0.0, name=f"s{j}")
            m.addCons(s * z[j] >= float(inst.a[j]) * quicksum(w[i] * w[i] for i in g))
            ridge.append(s)
    m.setObjective(t + quicksum(ridge) + quicksum(float(inst.b[j]) * z[j] for j in range(inst.n_groups))
                   + inst.const, "minimize")
    m.setParam("limits/gap", gap_tol)
    m.setParam("parallel/maxnthreads", threads)
    if time_limit is not None:
        m.setParam("limits/time", float(time_limit))
    m.optimize()
    wv = np.array([m.getVal(x) for x in w])
    zv = np.round(np.clip([m.getVal(x) for x in z], 0, 1))
    wv = np.clip(wv, -inst.M[gof], inst.M[gof]) * zv[gof]
    obj = inst.objective(wv, zv)
    # SCIP meets its nonlinear rows only to its feasibility tolerance (objectives slightly high):
    # re-solve the QP of its pattern exactly
    exact = solve_fixed_z(inst, zv)
    if exact.value <= obj:
        obj, wv = exact.value, exact.w
    lb = float(m.getDualbound())
    return ScipResult(obj, wv, zv, lb, (obj - lb) / max(abs(obj), 1e-10), int(m.getNNodes()),
                      float(m.getSolvingTime()), time.perf_counter() - t0, str(m.getStatus()))
