"""Root bounds of the pruning MIP (P) through Pyomo + HiGHS: big-M and perspective relaxations.

* :func:`bigm_bound`    -- continuous relaxation of (P): one convex QP.
* :func:`pr_bound_cuts` -- perspective (PR) relaxation: a QP whose perspective terms are
  outer-approximated by cuts added in a loop (lower bound every round, closed-form upper bound).

On every instance  bigm_bound <= PR relaxation <= optimum of (P)  (the PR relaxation is the convex
hull of each group's disjunction).  Every reported objective is re-evaluated in numpy at the
returned point (:meth:`Instance.objective`, :func:`mipprune.penalty.spr_value`), never taken
from the solver.  All ``pyomo`` imports happen inside :mod:`mipprune.models` and
:mod:`mipprune.highs`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import models
from .highs import _solve_highs
from .instance import Instance
from .penalty import spr

__all__ = ["Relaxation", "PerspectiveBound", "bigm_bound", "pr_bound_cuts"]


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
    so z -> 0 needs no floor.  (Not the "deepest" cut at v = w^_j / z^_j:
    with z^_j small it sits at a corner of the box, and since every perspective cut passes
    through (w, z, s) = 0 the extra rows make the active-set QP highly degenerate.)

    HiGHS' QP solutions are only as accurate as its optimality tolerance, so ``tol`` much below
    that cannot be certified.  ``model`` (optional, ``models.build_pr(instance, relax=True)``)
    is updated and re-solved with its cuts kept (valid for every a, b, M): a sweep over b
    warm-starts.
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
