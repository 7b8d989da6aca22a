"""Node relaxations (prox, conjugate, certified bound) and branch and bound vs independent solves."""

import numpy as np
import pytest
from scipy.optimize import minimize

from mipprune.bnb import branch_and_bound
from mipprune.bounds import bigm_bound, pr_bound_cuts
from mipprune.enumerate import enumerate_solve
from mipprune.instance import Instance, random_instance
from mipprune.relax import BOUNDS, FREE, IN, OUT, NodeRelaxation, pr_bound_closed_form


def _single_group(a, b, M, k):
    return Instance(np.eye(k), np.zeros(k), [list(range(k))], [a], [b], [M])


@pytest.mark.parametrize("bounds", BOUNDS)
@pytest.mark.parametrize("status", [OUT, IN, FREE])
def test_prox_beats_local_search_on_closed_form(bounds, status):
    """prox_{tau h}(v) minimises 1/2||w-v||^2 + tau h(w) with h from the closed form (penalty.py):
    no L-BFGS-B run from several starts finds a lower value."""
    rng = np.random.default_rng(0)
    for trial in range(25):
        k = int(rng.integers(1, 5))
        a, b, M = rng.uniform(0, 2), rng.uniform(0, 2), rng.uniform(0.2, 3)
        R = NodeRelaxation(_single_group(a, b, M, k), bounds)
        st = np.array([status])
        v = rng.normal(size=k) * rng.uniform(0.01, 4)
        tau = rng.uniform(0.05, 3)
        w, _, _ = R.prox(v, tau, st)

        def obj(x):
            return 0.5 * np.sum((x - v) ** 2) + tau * (R.closed_form_value(x, st) - R.inst.f(x))

        mine = obj(w)
        assert np.isfinite(mine)
        if status == OUT:
            assert np.all(w == 0)
            continue
        for x0 in (np.clip(v, -M, M), np.full(k, 1e-3), w + 1e-3):
            r = minimize(obj, x0, method="L-BFGS-B", bounds=[(-M, M)] * k)
            assert mine <= r.fun + 1e-9, (trial, mine, r.fun)


@pytest.mark.parametrize("bounds", BOUNDS)
def test_conjugate_is_the_supremum(bounds):
    """h*(y) = sup_w y.w - h(w): Fenchel-Young for random w, and attained up to 1e-7 by a search."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        k = int(rng.integers(1, 4))
        a, b, M = rng.uniform(0.01, 2), rng.uniform(0, 2), rng.uniform(0.2, 3)
        R = NodeRelaxation(_single_group(a, b, M, k), bounds)
        for status in (IN, FREE):
            st = np.array([status])
            y = rng.normal(size=k) * rng.uniform(0.1, 5)
            hstar = R.conjugate(y, st)

            def neg(x):
                return -(y @ x - (R.closed_form_value(x, st) - R.inst.f(x)))

            ws = rng.uniform(-M, M, size=(200, k)) * rng.uniform(0, 1, size=(200, 1))
            assert max(-neg(x) for x in ws) <= hstar + 1e-12
            best = min(minimize(neg, x0, method="L-BFGS-B", bounds=[(-M, M)] * k).fun
                       for x0 in (np.zeros(k), np.clip(y, -M, M), -np.clip(y, -M, M) * 0.1 + y * 0.01))
            if bounds == "bigm" and status == FREE:
                # h = a||w||^2 + b m/M is nonsmooth in m: solve the epigraph QP in (w, r = m)
                cons = [{"type": "ineq", "fun": lambda x, i=i, s=s: x[k] - s * x[i]}
                        for i in range(k) for s in (1, -1)]
                r = minimize(lambda x: -(y @ x[:k] - a * x[:k] @ x[:k] - b * x[k] / M),
                             np.zeros(k + 1), method="SLSQP", constraints=cons,
                             bounds=[(-M, M)] * k + [(0, M)], options={"ftol": 1e-14})
                best = min(best, r.fun)
            assert hstar == pytest.approx(-best, abs=1e-7, rel=1e-7)


def test_lower_bound_is_valid_anywhere():
    inst = random_instance(8, 3, seed=2)
    for bounds in BOUNDS:
        R = NodeRelaxation(inst, bounds)
        st = np.full(8, FREE)
        opt = R.solve(st, rtol=1e-12)
        rng = np.random.default_rng(3)
        for _ in range(50):
            w = rng.normal(size=inst.n) * rng.uniform(0, 3)
            assert R.lower_bound(w, st) <= opt.value + 1e-10
        assert opt.lower_bound <= opt.value
        assert opt.value - opt.lower_bound <= 1e-10 * max(1, abs(opt.value))


@pytest.mark.parametrize("seed", range(4))
def test_pr_bound_closed_form_equals_highs_cuts(seed):
    inst = random_instance(6, 3, seed=seed)
    cf = pr_bound_closed_form(inst)
    cuts = pr_bound_cuts(inst)
    assert cf.value == pytest.approx(cuts.value, rel=1e-6)
    assert cf.lower_bound <= cuts.upper + 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_bigm_root_equals_highs_qp(seed):
    inst = random_instance(6, 3, seed=seed)
    assert pr_bound_closed_form(inst, "bigm").value == pytest.approx(bigm_bound(inst).value, rel=1e-6)


@pytest.mark.parametrize("kind", ["least_squares", "quadratic"])
@pytest.mark.parametrize("seed", range(4))
def test_bnb_equals_enumeration(kind, seed):
    inst = random_instance(7, 2, seed=seed, kind=kind)
    enum = enumerate_solve(inst)
    for bounds in BOUNDS:
        r = branch_and_bound(inst, bounds)
        assert r.status == "optimal" and r.gap <= 1e-6
        assert r.objective == pytest.approx(enum.value, rel=1e-6, abs=1e-9)
        assert r.lower_bound <= r.objective
        assert np.array_equal(r.z, np.round(enum.z))
        assert inst.violation(r.w, r.z) == 0.0
        assert r.objective == pytest.approx(inst.objective(r.w, r.z), rel=1e-12)


def test_bounds_are_ordered_and_certified():
    for seed in range(3):
        inst = random_instance(10, 3, seed=seed)
        p = branch_and_bound(inst, "perspective")
        b = branch_and_bound(inst, "bigm")
        assert b.root_bound <= p.root_bound + 1e-9 <= p.objective + 2e-9
        assert p.objective == pytest.approx(b.objective, rel=1e-6)


def test_hand_solvable_separable_fixture():
    """Q = I, groups {0}, {1}, a = 1/2, b = 1, M = 10.  Keeping group j costs
    min_w (1/2 + a) w^2 + c_j w + b = w^2 + c_j w + 1, minimised at w = -c_j/2 with value
    1 - c_j^2/4; dropping costs 0.  c = (-3, -0.5): group 0 -> w = 1.5, value -1.25 (keep);
    group 1 -> 1 - 0.0625 > 0 (drop).  Optimum -1.25 at w = (1.5, 0), z = (1, 0).
    With M_0 = 1 the box binds: w_0 = 1, value 1 - 3 + 1 = -1 (still kept)."""
    inst = Instance(np.eye(2), [-3.0, -0.5], [[0], [1]], [0.5, 0.5], [1.0, 1.0], [10.0, 10.0])
    for bounds in BOUNDS:
        r = branch_and_bound(inst, bounds)
        assert r.objective == pytest.approx(-1.25, abs=1e-9)
        np.testing.assert_allclose(r.w, [1.5, 0.0], atol=1e-6)
        np.testing.assert_array_equal(r.z, [1.0, 0.0])
    r = branch_and_bound(inst.__class__(inst.Q, inst.c, inst.groups, inst.a, inst.b, [1.0, 10.0]))
    assert r.objective == pytest.approx(-1.0, abs=1e-9)
    np.testing.assert_allclose(r.w, [1.0, 0.0], atol=1e-9)


def test_perspective_needs_fewer_nodes_than_bigm():
    nodes = {bd: sum(branch_and_bound(random_instance(14, 3, seed=s), bd).nodes for s in range(3))
             for bd in BOUNDS}
    assert 2 * nodes["perspective"] <= nodes["bigm"], nodes


def test_node_limit_reports_honest_gap():
    inst = random_instance(16, 3, seed=1)
    full = branch_and_bound(inst)
    part = branch_and_bound(inst, "bigm", node_limit=2)
    assert part.status == "node_limit" and part.nodes == 2
    assert part.lower_bound <= full.objective + 1e-9
    assert part.objective >= full.objective - 1e-9
    assert part.gap == pytest.approx((part.objective - part.lower_bound) / abs(part.objective))


def test_bad_arguments():
    inst = random_instance(3, 2, seed=0)
    with pytest.raises(ValueError, match="bounds must be one of"):
        branch_and_bound(inst, "cones")
    with pytest.raises(ValueError, match="gap_tol must be in"):
        branch_and_bound(inst, gap_tol=-1)
    with pytest.raises(ValueError, match="time_limit must be positive"):
        branch_and_bound(inst, time_limit=0)
    with pytest.raises(ValueError, match="status must hold"):
        NodeRelaxation(inst).solve(np.array([0, 1, 5]))
