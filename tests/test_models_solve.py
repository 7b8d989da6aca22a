"""Pyomo models and the Pyomo + HiGHS solves: a hand-solved fixture, bound ordering, the PR
relaxation against an independent computation, mutable parameters, bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy.linalg import cholesky, solve_triangular
from scipy.optimize import lsq_linear, minimize_scalar

from mipprune import models
from mipprune.bounds import bigm_bound, pr_bound_cuts
from mipprune.enumerate import enumerate_solve, solve_fixed_z
from mipprune.instance import Instance, random_instance
from mipprune.penalty import bigm_value, spr_numeric


def rel(x, y):
    return abs(x - y) / max(1.0, abs(y))


# ---- hand-solvable fixture --------------------------------------------------------------------
# Q = diag(q_j I) per group, c = -Q w0, const = 1/2 w0^T Q w0, so f(w) = sum_j q_j/2 ||w_j - w0_j||^2
# and (P) separates by group:
#   drop (z_j = 0):  q_j/2 ||w0_j||^2
#   keep (z_j = 1):  min_{|w| <= M_j} q_j/2 ||w - w0_j||^2 + a_j ||w||^2 + b_j,
#                    coordinate-wise convex 1-D problems: w = clip(q_j w0_j / (q_j + 2 a_j), +-M_j)
# and the group is kept iff its keep cost is below its drop cost.
#
#   group 0: q=2, a=.5, w0=(3,-1.5), M=4, b=1  : w=(2,-1) unclipped; keep = 1.25 + 2.5 + 1 = 4.75
#            drop = 11.25                                                        -> keep
#   group 1: q=1, a=0, w0=(3), M=1, b=3        : w=clip(3)=1; keep = 2 + 3 = 5, drop = 4.5
#            (without the clip: keep = 3 < 4.5 -- the box flips the decision)   -> drop
#   group 2: q=4, a=1, w0=(1.5,0,-3), M=1.5, b=10 : w=(1,0,-2) -> clip (1,0,-1.5);
#            keep = 2*(0.25+2.25) + (1+2.25) + 10 = 18.25, drop = 22.5           -> keep
#   group 3: q=1, a=.25, w0=(.6,.3), M=10, b=.2 : w=(.4,.2); keep = .025+.05+.2 = .275,
#            drop = .225                                                         -> drop
#   optimum = 4.75 + 4.5 + 18.25 + 0.225 = 27.725
HAND_GROUPS = [[0, 1], [2], [3, 4, 5], [6, 7]]
HAND_Q = np.array([2, 2, 1, 4, 4, 4, 1, 1], float)
HAND_W0 = np.array([3, -1.5, 3, 1.5, 0, -3, 0.6, 0.3])
HAND_W = np.array([2, -1, 0, 1, 0, -1.5, 0, 0])
HAND_Z = np.array([1, 0, 1, 0], float)
HAND_VALUE = 27.725


def hand_instance():
    return Instance(np.diag(HAND_Q), -HAND_Q * HAND_W0, HAND_GROUPS, [0.5, 0.0, 1.0, 0.25],
                    [1.0, 3.0, 10.0, 0.2], [4.0, 1.0, 1.5, 10.0],
                    const=0.5 * float(HAND_W0 @ (HAND_Q * HAND_W0)))


def test_hand_fixture_objective_is_the_derived_number():
    inst = hand_instance()
    assert inst.objective(HAND_W, HAND_Z) == pytest.approx(HAND_VALUE, abs=1e-12)
    assert inst.violation(HAND_W, HAND_Z) == 0.0


@pytest.mark.parametrize("method", ["fast", "pyomo"])
def test_enumeration_solves_the_hand_fixture(method):
    res = enumerate_solve(hand_instance(), method=method)
    assert res.value == pytest.approx(HAND_VALUE, abs=1e-9)
    np.testing.assert_array_equal(res.z, HAND_Z)
    np.testing.assert_allclose(res.w, HAND_W, atol=1e-7)
    assert res.patterns == 16


def test_hand_fixture_bounds_are_ordered():
    inst = hand_instance()
    bm, pr = bigm_bound(inst), pr_bound_cuts(inst)
    assert bm.value <= pr.value + 1e-9 <= HAND_VALUE + 1e-9
    assert pr.converged and pr.upper - pr.value <= 1e-7 * abs(pr.upper)


# ---- bound ordering on random instances -------------------------------------------------------
@pytest.mark.parametrize("kind", ["least_squares", "quadratic"])
@pytest.mark.parametrize("G", [3, 5, 8])
def test_bigm_le_pr_le_optimum(kind, G):
    for seed in range(3):
        inst = random_instance(G, 3, seed, kind)
        bm, pr, opt = bigm_bound(inst), pr_bound_cuts(inst), enumerate_solve(inst)
        scale = max(1.0, abs(opt.value))
        assert pr.converged
        assert bm.value <= pr.value + 1e-7 * scale
        assert pr.value <= opt.value + 1e-9 * scale
        assert pr.value <= pr.upper + 1e-8 * scale
        # returned points are what they claim: re-evaluate each in numpy
        assert opt.value == inst.objective(opt.w, opt.z)
        assert inst.violation(opt.w, opt.z) == 0.0
        assert set(np.unique(opt.z)) <= {0.0, 1.0}
        wp = inst.padded(bm.w)
        assert bm.value == pytest.approx(inst.f(bm.w) + float(np.sum(bigm_value(wp, inst.a, inst.b, inst.M))),
                                         rel=1e-12)
        spr_val, _ = spr_numeric(inst.padded(pr.w), inst.a, inst.b, inst.M)  # independent of spr()
        assert pr.upper == pytest.approx(inst.f(pr.w) + float(spr_val.sum()), rel=1e-9)


def test_pr_bound_is_strictly_stronger_than_bigm_somewhere():
    gaps = [pr_bound_cuts(i).value - bigm_bound(i).value
            for i in (random_instance(6, 3, s, "least_squares") for s in range(3))]
    assert max(gaps) > 1e-3


# ---- the PR value against an independent computation ------------------------------------------
def _pr_value_nested(inst: Instance) -> float:
    """PR relaxation of a 2-group instance without cuts or closed form: g(z) = min_w of the PR
    objective at fixed z (a box-QP with Hessian Q + diag(2 a_j / z_j), solved exactly by
    bounded-variable least squares) is jointly convex in z, so nested bounded 1-D minimisation
    over z_1, then z_2, gives min_z g."""
    assert inst.n_groups == 2
    gof = inst.group_of()

    def g(z):
        keep = z[gof] > 0
        val = inst.const + float(inst.b @ z)
        if not keep.any():
            return val
        S = np.flatnonzero(keep)
        zS = z[gof[S]]
        H = inst.Q[np.ix_(S, S)] + np.diag(2.0 * inst.a[gof[S]] / zS)
        c = inst.c[S]
        L = cholesky(H, lower=True)
        y = solve_triangular(L, c, lower=True)  # L^{-1} c
        # 1/2 w^T H w + c^T w = 1/2 ||L^T w + y||^2 - 1/2 ||y||^2
        box = inst.M[gof[S]] * zS
        r = lsq_linear(L.T, -y, bounds=(-box, box), method="bvls", tol=1e-14)
        return val + 0.5 * float(np.sum((L.T @ r.x + y) ** 2)) - 0.5 * float(y @ y)

    def inner(z1):
        r = minimize_scalar(lambda z2: g(np.array([z1, z2])), bounds=(0.0, 1.0), method="bounded",
                            options={"xatol": 1e-9})
        return min(r.fun, g(np.array([z1, 0.0])), g(np.array([z1, 1.0])))

    r = minimize_scalar(inner, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-9})
    return min(r.fun, inner(0.0), inner(1.0))


@pytest.mark.parametrize("kind,seed", [("least_squares", 0), ("least_squares", 1), ("quadratic", 0)])
def test_pr_bound_cuts_matches_nested_minimisation(kind, seed):
    inst = random_instance(2, 2, seed, kind)
    ref = _pr_value_nested(inst)
    pr = pr_bound_cuts(inst)
    assert rel(pr.value, ref) <= 1e-6
    assert pr.value <= ref + 1e-9 * max(1.0, abs(ref)) and ref <= pr.upper + 1e-9 * max(1.0, abs(ref))


def test_pr_bound_cuts_matches_closed_form_relaxation():
    relax = pytest.importorskip("mipprune.relax")
    for kind in ("least_squares", "quadratic"):
        inst = random_instance(10, 3, 1, kind)
        pr = pr_bound_cuts(inst)
        cf = relax.pr_bound_closed_form(inst)
        assert rel(pr.value, cf.value) <= 1e-6
        assert rel(bigm_bound(inst).value, relax.pr_bound_closed_form(inst, bounds="bigm").value) <= 1e-6


def test_pr_cut_loop_reports_rounds_and_cuts():
    inst = random_instance(6, 3, 0, "quadratic")
    pr = pr_bound_cuts(inst)
    assert pr.converged and pr.iterations >= 2 and pr.cuts >= 1 and pr.seconds > 0
    capped = pr_bound_cuts(inst, max_rounds=1)
    assert capped.iterations == 1 and not capped.converged and capped.cuts == 0
    assert capped.value <= pr.value + 1e-9 and capped.upper >= pr.value - 1e-9


# ---- enumeration: box-active patterns, singular Hessians ---------------------------------------
def test_fast_enumeration_matches_pyomo_when_the_box_binds():
    base = random_instance(4, 3, 1, "least_squares")
    inst = Instance(base.Q, base.c, base.groups, base.a, base.b, 0.1 * base.M, base.const)
    fast, slow = enumerate_solve(inst), enumerate_solve(inst, method="pyomo")
    assert fast.qp_solves > 0  # the HiGHS path ran
    assert fast.value == pytest.approx(slow.value, rel=1e-9)
    np.testing.assert_array_equal(fast.z, slow.z)
    assert inst.violation(fast.w, fast.z) == 0.0


def test_enumeration_with_singular_hessian():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((4, 9))
    Q = A.T @ A  # rank 4, and a = 0: H = Q is singular
    inst = Instance(Q, -Q @ rng.standard_normal(9), [[0, 1, 2], [3, 4, 5], [6, 7, 8]], 0.0, 0.5, 1.0)
    fast, slow = enumerate_solve(inst), enumerate_solve(inst, method="pyomo")
    assert fast.value == pytest.approx(slow.value, rel=1e-8)
    assert fast.qp_solves == 7  # every non-empty pattern went to HiGHS


def test_solve_fixed_z_is_the_enumerated_pattern():
    inst = random_instance(6, 3, 2, "quadratic")
    opt = enumerate_solve(inst)
    again = solve_fixed_z(inst, opt.z)
    assert again.value == pytest.approx(opt.value, rel=1e-12)
    drop_all = solve_fixed_z(inst, np.zeros(6))
    assert drop_all.value == pytest.approx(inst.const) and not drop_all.w.any()


# ---- mutable parameters -------------------------------------------------------------------------
def test_model_built_once_resolves_like_fresh_models():
    inst = random_instance(6, 3, 0, "least_squares")
    bm_model = models.build_bigm(inst, relax=True)
    pr_model = models.build_pr(inst, relax=True)
    for scale in (2.0, 0.5, 1.0):
        new = inst.with_b(scale * inst.b)
        reused_bm, fresh_bm = bigm_bound(new, model=bm_model), bigm_bound(new)
        assert reused_bm.value == pytest.approx(fresh_bm.value, rel=1e-9)
        reused_pr, fresh_pr = pr_bound_cuts(new, model=pr_model), pr_bound_cuts(new)
        assert reused_pr.converged and fresh_pr.converged
        assert rel(reused_pr.value, fresh_pr.value) <= 2e-7
        assert [pr_model.b[j].value for j in range(6)] == pytest.approx(list(new.b))
    assert pr_bound_cuts(inst, model=pr_model).cuts >= fresh_pr.cuts  # cuts were kept


def test_update_changes_a_b_and_M_in_place():
    inst = random_instance(5, 2, 3, "quadratic")
    other = Instance(inst.Q, inst.c, inst.groups, 2 * inst.a, 0.5 * inst.b, 0.7 * inst.M, inst.const)
    model = models.build_pr(inst, relax=True)
    pr_bound_cuts(inst, model=model)
    reused, fresh = pr_bound_cuts(other, model=model), pr_bound_cuts(other)
    assert rel(reused.value, fresh.value) <= 2e-7
    assert model.w[0].ub == pytest.approx(other.M[0]) and model.a[0].value == pytest.approx(other.a[0])


def test_clear_cuts_starts_over_on_the_same_solver():
    inst = random_instance(4, 3, 1, "quadratic")
    model = models.build_pr(inst, relax=True)
    first = pr_bound_cuts(inst, model=model)
    assert first.cuts > 0 and len(model.cuts) == first.cuts
    models.clear_cuts(model)
    assert len(model.cuts) == 0
    again = pr_bound_cuts(inst, model=model)
    assert again.cuts == first.cuts and again.iterations == first.iterations
    assert again.value == pytest.approx(first.value, rel=1e-9)


def test_set_b_and_relaxation_switch():
    inst = random_instance(3, 2, 0)
    model = models.build_bigm(inst)
    assert not models.is_relaxed(model)
    models.set_relaxed(model, True)
    assert models.is_relaxed(model)
    models.set_b(model, 0.25)
    assert [model.b[j].value for j in range(3)] == [0.25] * 3
    assert bigm_bound(inst.with_b(0.25), model=model).value == pytest.approx(
        bigm_bound(inst.with_b(0.25)).value, rel=1e-9)


# ---- bad input ----------------------------------------------------------------------------------
def test_enumeration_refuses_too_many_groups():
    inst = random_instance(17, 1, 0)
    with pytest.raises(ValueError, match="17 groups"):
        enumerate_solve(inst)
    with pytest.raises(ValueError, match="max_groups=4"):
        enumerate_solve(random_instance(5, 1, 0), max_groups=4)
    with pytest.raises(ValueError, match="method"):
        enumerate_solve(random_instance(2, 1, 0), method="brute")


def test_bad_arguments_are_named():
    inst = random_instance(3, 2, 0)
    with pytest.raises(ValueError, match="tol"):
        pr_bound_cuts(inst, tol=0.0)
    with pytest.raises(ValueError, match="max_rounds"):
        pr_bound_cuts(inst, max_rounds=0)
    model = models.build_pr(inst, relax=True)
    with pytest.raises(ValueError, match="4 groups"):
        models.update(model, random_instance(4, 2, 0))
    with pytest.raises(ValueError, match="one entry per group"):
        models.set_b(model, [1.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        models.set_b(model, [1.0, -2.0, 1.0])
    with pytest.raises(ValueError, match="zeros and ones"):
        models.fix_pattern(model, [0.5, 1, 0])
    with pytest.raises(ValueError, match="PR model"):
        models.add_perspective_cut(models.build_bigm(inst), 0, [1.0, 1.0])
    with pytest.raises(ValueError, match="2 finite numbers"):
        models.add_perspective_cut(model, 0, [1.0])
    with pytest.raises(ValueError, match="relax=True"):
        bigm_bound(inst, model=models.build_bigm(inst))
    with pytest.raises(ValueError, match="cone=False"):
        pr_bound_cuts(inst, model=models.build_pr(inst, relax=True, cone=True))
    with pytest.raises(ValueError, match="zeros and ones"):
        solve_fixed_z(inst, [1, 0])


def test_missing_scip_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyscipopt", None)  # makes `import pyscipopt` fail
    from mipprune.scip import scip_available, scip_solve

    assert not scip_available()
    with pytest.raises(RuntimeError, match="pip install pyscipopt"):
        scip_solve(random_instance(3, 2, 0))
    with pytest.raises(ValueError, match="formulation must be"):
        scip_solve(random_instance(3, 2, 0), formulation="cones")


def test_scip_agrees_with_enumeration_when_installed():
    pytest.importorskip("pyscipopt")
    from mipprune.scip import scip_solve

    inst = random_instance(3, 2, 0, "least_squares")
    opt = enumerate_solve(inst)
    for formulation in ("pr", "bigm"):
        res = scip_solve(inst, formulation=formulation, gap_tol=0.0, time_limit=60)
        assert res.status == "optimal"
        np.testing.assert_array_equal(res.z, opt.z)
        assert res.objective == pytest.approx(opt.value, rel=1e-9)


def test_models_and_solve_do_not_import_pyomo_eagerly():
    code = ("import sys, mipprune, mipprune.models, mipprune.highs, mipprune.bounds, "
            "mipprune.enumerate; "
            "assert not any(m == 'pyomo' or m.startswith('pyomo.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
