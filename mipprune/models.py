"""Pyomo models of the pruning MIP (P) and its perspective reformulation (PR), built once.

    (P)   min  1/2 w^T Q w + c^T w + const + sum_j ( a_j ||w_j||^2 + b_j z_j )
          s.t. w_i <= M_j z_j,  -w_i <= M_j z_j     (i in group j),    z in {0,1}^G

    (PR)  min  1/2 w^T Q w + c^T w + const + sum_j ( s_j + b_j z_j )
          s.t. the same box rows,   s_j >= 0,
               s_j z_j >= a_j ||w_j||^2          ("cone": a rotated second-order cone for
                                                   s, z >= 0; deactivatable, for SCIP)
               s_j >= a_j (2 v^T w_j - ||v||^2 z_j)   (perspective cuts, ``model.cuts``)

For binary z both have the same optimum (z_j = 0 forces w_j = 0 and s_j = 0; z_j = 1 gives
s_j = a_j ||w_j||^2).  Their continuous relaxations (z in [0, 1]) differ: the big-M relaxation
projects to a_j ||w_j||^2 + b_j ||w_j||_inf / M_j, the PR relaxation to the SPR penalty, and
bigM-relaxation <= PR-relaxation <= optimum of (P).

``a``, ``b``, ``M`` are mutable parameters (one per group) and the w-bounds |w_i| <= M_j are
expressions of ``M``, so a sweep over ``b`` (or ``a``, ``M``) calls :func:`update` /
:func:`set_b` and re-solves the same model; a persistent solver picks up only the changed
coefficients.  A perspective cut is written with the *parameter* ``a_j`` as its factor: it is
valid for every a >= 0, every b and every M > 0 (validity needs only z >= 0 and z_j = 0 =>
w_j = 0, which the box rows give), so cuts survive every :func:`update`.

All ``pyomo`` imports are inside the functions: importing :mod:`mipprune` does not load pyomo.
"""

from __future__ import annotations

import numpy as np

from .instance import Instance

__all__ = [
    "build_bigm",
    "build_pr",
    "update",
    "set_b",
    "set_relaxed",
    "is_relaxed",
    "fix_pattern",
    "unfix_pattern",
    "add_perspective_cut",
    "clear_cuts",
    "solution_arrays",
]

_KINDS = ("bigm", "pr")


def _quadratic_part(model, instance: Instance):
    """f(w) = 1/2 w^T Q w + c^T w + const as a Pyomo expression (upper triangle of Q)."""
    from pyomo.environ import quicksum

    Q, c, w = instance.Q, instance.c, model.w
    n = instance.n
    iu, ku = np.triu_indices(n)
    terms = []
    for i, k in zip(iu.tolist(), ku.tolist()):
        q = Q[i, k]
        if q != 0.0:
            terms.append((0.5 * q if i == k else q) * w[i] * w[k])
    terms.extend(float(c[i]) * w[i] for i in range(n) if c[i] != 0.0)
    return quicksum(terms) + instance.const


def _build(instance: Instance, kind: str, relax: bool, cone: bool):
    from pyomo.environ import (
        Binary,
        ConcreteModel,
        Constraint,
        ConstraintList,
        NonNegativeReals,
        Objective,
        Param,
        UnitInterval,
        Var,
        minimize,
        quicksum,
    )

    if not isinstance(instance, Instance):
        raise ValueError(f"instance must be a mipprune Instance, got {type(instance).__name__}")
    G, n = instance.n_groups, instance.n
    group = instance.group_of()
    m = ConcreteModel(name=f"mipprune_{kind}")
    m.J = range(G)  # plain Python ranges: indexing sets that never change
    m.I = range(n)
    m.a = Param(m.J, mutable=True, initialize=dict(enumerate(instance.a.tolist())))
    m.b = Param(m.J, mutable=True, initialize=dict(enumerate(instance.b.tolist())))
    m.M = Param(m.J, mutable=True, initialize=dict(enumerate(instance.M.tolist())))
    # |w_i| <= M_j is implied by the box rows and z <= 1; as variable bounds it helps solvers
    # and keeps the QP bounded; bounds are expressions of the mutable M.
    m.w = Var(m.I, bounds=lambda mm, i: (-mm.M[int(group[i])], mm.M[int(group[i])]))
    m.z = Var(m.J, domain=UnitInterval if relax else Binary)

    def box(sign):
        def rule(mm, i):
            j = int(group[i])
            return sign * mm.w[i] - mm.M[j] * mm.z[j] <= 0
        return rule

    m.box_up = Constraint(m.I, rule=box(1.0))  #  w_i <= M_j z_j
    m.box_lo = Constraint(m.I, rule=box(-1.0))  # -w_i <= M_j z_j
    f = _quadratic_part(m, instance)
    keep = quicksum(m.b[j] * m.z[j] for j in m.J)
    if kind == "bigm":
        # written term by term as (a_j w_i) w_i: Pyomo 6.10's standard repn mangles a mutable
        # Param times a quadratic sum, a_j * (w_i * w_i), into a bogus nonlinear expression
        ridge = quicksum(m.a[j] * m.w[i] * m.w[i] for j in m.J for i in instance.groups[j])
        m.obj = Objective(expr=f + ridge + keep, sense=minimize)
    else:
        m.s = Var(m.J, domain=NonNegativeReals)
        m.obj = Objective(expr=f + quicksum(m.s[j] for j in m.J) + keep, sense=minimize)
        m.cone = Constraint(
            m.J,
            rule=lambda mm, j: quicksum(mm.a[j] * mm.w[i] * mm.w[i] for i in instance.groups[j])
            - mm.s[j] * mm.z[j] <= 0,
        )
        if not cone:
            m.cone.deactivate()
        m.cuts = ConstraintList()
    m._mipprune = {"kind": kind, "n": n, "groups": instance.groups, "cut_count": [0] * G,
                   "cut_v": [[] for _ in range(G)]}
    return m


def build_bigm(instance: Instance, relax: bool = False):
    """The big-M model (P); ``relax=True`` gives its continuous relaxation (z in [0, 1]),
    a convex QP HiGHS solves.  With binary z it is an MIQP (SCIP, not HiGHS)."""
    return _build(instance, "bigm", relax, cone=False)


def build_pr(instance: Instance, relax: bool = False, cone: bool = False):
    """The perspective model (PR) with epigraph variables ``s`` and an empty ``cuts`` list.

    ``cone=True`` activates ``s_j z_j >= a_j ||w_j||^2`` (for solvers that take quadratic
    constraints, e.g. SCIP); HiGHS takes neither it nor a binary z together with a quadratic
    objective, so the HiGHS route is ``relax=True, cone=False`` plus perspective cuts.
    """
    return _build(instance, "pr", relax, cone)


def _meta(model):
    meta = getattr(model, "_mipprune", None)
    if meta is None:
        raise ValueError("model was not built by mipprune.models.build_bigm / build_pr")
    return meta


def update(model, instance: Instance) -> None:
    """Set the mutable ``a``, ``b``, ``M`` of ``model`` from ``instance``.

    ``instance`` must have the model's Q, c, const and groups (checked: groups and size); only
    the per-group parameters change.  Cuts stay (they are valid for every a, b, M).
    """
    meta = _meta(model)
    if instance.n != meta["n"] or instance.groups != meta["groups"]:
        raise ValueError(
            f"instance has {instance.n} variables in {instance.n_groups} groups; the model was "
            f"built for {meta['n']} variables in {len(meta['groups'])} groups (rebuild it)")
    for name in ("a", "b", "M"):
        param = getattr(model, name)
        for j, val in enumerate(getattr(instance, name).tolist()):
            param[j].set_value(val)


def set_b(model, b) -> None:
    """Set the keep costs ``b`` (scalar or one per group, each >= 0) without rebuilding."""
    G = len(_meta(model)["groups"])
    b = np.broadcast_to(np.asarray(b, dtype=float), (G,)) if np.ndim(b) == 0 else np.asarray(b, float)
    if b.shape != (G,):
        raise ValueError(f"b must have one entry per group ({G}), got shape {b.shape}")
    if not np.all(np.isfinite(b)) or (b < 0).any():
        raise ValueError(f"b must be finite and >= 0, got {b.tolist()}")
    for j, val in enumerate(b.tolist()):
        model.b[j].set_value(val)


def set_relaxed(model, relaxed: bool = True) -> None:
    """Switch z between [0, 1] (``relaxed=True``) and {0, 1}."""
    from pyomo.environ import Binary, UnitInterval

    _meta(model)
    for zj in model.z.values():
        zj.domain = UnitInterval if relaxed else Binary


def is_relaxed(model) -> bool:
    """Whether z is continuous in ``model``."""
    _meta(model)
    return all(not zj.is_integer() for zj in model.z.values())


def fix_pattern(model, z) -> None:
    """Fix z to a 0/1 pattern *by its bounds* (lb = ub = z_j).

    Bounds rather than ``Var.fix``: the persistent HiGHS interface then changes two column
    bounds per group instead of regenerating the dense quadratic objective.  With z continuous
    (``set_relaxed``) the model is a convex QP; with z binary HiGHS would refuse it (MIQP).
    """
    G = len(_meta(model)["groups"])
    z = np.asarray(z, dtype=float)
    if z.shape != (G,) or not np.all((z == 0) | (z == 1)):
        raise ValueError(f"pattern must be {G} zeros and ones, got {z.tolist()}")
    for j, val in enumerate(z.tolist()):
        model.z[j].setlb(val)
        model.z[j].setub(val)


def unfix_pattern(model) -> None:
    """Undo :func:`fix_pattern` (z back to [0, 1] bounds)."""
    _meta(model)
    for zj in model.z.values():
        zj.setlb(0.0)
        zj.setub(1.0)


def add_perspective_cut(model, j: int, v):
    """Add  s_j >= a_j (2 v^T w_j - ||v||^2 z_j)  to ``model.cuts`` (PR models only).

    Derivation: a ||w - v z||^2 / z >= 0 expands to a ||w||^2 / z >= a (2 v^T w - ||v||^2 z),
    with equality at w = v z: the tangent plane of the perspective function along the ray
    w/z = v.  ``a_j`` enters as the parameter, so the cut stays valid when ``a`` changes.
    Returns the new constraint.
    """
    from pyomo.environ import quicksum

    meta = _meta(model)
    if meta["kind"] != "pr":
        raise ValueError("perspective cuts need a PR model (build_pr)")
    g = meta["groups"][j]
    v = np.asarray(v, dtype=float)
    if v.shape != (len(g),) or not np.all(np.isfinite(v)):
        raise ValueError(f"v must be {len(g)} finite numbers for group {j}, got {v.tolist()}")
    a = model.a[j]
    rhs = quicksum((2.0 * float(vi)) * a * model.w[i] for vi, i in zip(v.tolist(), g) if vi != 0.0)
    con = model.cuts.add(model.s[j] - rhs + float(v @ v) * a * model.z[j] >= 0)
    meta["cut_count"][j] += 1
    meta["cut_v"][j].append((con, v.copy()))
    return con


def clear_cuts(model) -> None:
    """Remove every perspective cut."""
    meta = _meta(model)
    if meta["kind"] == "pr":
        from pyomo.environ import ConstraintList

        # replace the component rather than ``cuts.clear()``: after ``clear()`` a persistent
        # solver's removal of the old rows fails (Pyomo 6.10 cannot name the orphaned rows)
        model.del_component(model.cuts)
        model.cuts = ConstraintList()
        meta["cut_count"] = [0] * len(meta["groups"])
        meta["cut_v"] = [[] for _ in meta["groups"]]


def solution_arrays(model):
    """``(w, z)`` of the model's current variable values as numpy arrays (None -> 0)."""
    meta = _meta(model)
    w = np.array([model.w[i].value or 0.0 for i in range(meta["n"])], dtype=float)
    z = np.array([model.z[j].value or 0.0 for j in range(len(meta["groups"]))], dtype=float)
    return w, z
