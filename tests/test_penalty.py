"""The closed-form SPR (mipprune.penalty) checked against its definition, several independent ways.

One group: t = ||w||_2, m = ||w||_inf, u = m/M, c = sqrt(a/b),
phi(z) = a t^2/z + b z on [u, 1], SPR = min phi, and

    C1  max(u, c t) >= 1 :  a t^2 + b             z* = 1
    C2  u <= c t < 1     :  2 sqrt(ab) t          z* = c t
    C3  c t < u < 1      :  a M t^2/m + b m/M     z* = u

Checks: (i) a numeric 1-D minimisation over z (``spr_numeric``) on property-based draws
concentrated near the case boundaries; (ii) hand-solved fixtures; (iii) gradients against
central finite differences, torch autograd and ``torch.autograd.gradcheck``; (iv) structure:
continuity, the u = 1 kink, BerHu for singletons, convexity in the box, 1-homogeneity near 0,
big-M <= SPR; (v) batches, broadcasting, numpy == torch.

Case tests use the division-free form of the definition, exact in rationals:
c t >= 1  <=>  a s >= b  and  u <= c t  <=>  m^2 b <= M^2 a s   (s = t^2).
For b = 0 this reads "c = +inf": every group is C1 (z* = 1), which is what phi says when
a t^2 > 0 and an arbitrary but harmless choice when phi is identically 0.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mipprune.penalty as S

D = torch.float64

# derandomized: the same few thousand examples on every run, no example database
SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _stats(w):
    w = np.asarray(w, float)
    s = float(np.sum(w * w))
    return s, math.sqrt(s), float(np.max(np.abs(w)))


def _reference_case(w, a, b, M):
    """The case by its definition, decided exactly in rational arithmetic (division-free form)."""
    F = Fraction
    s = sum(F(float(x)) ** 2 for x in w)
    m = max(abs(F(float(x))) for x in w)
    a, b, M = F(a), F(b), F(M)
    if m >= M or a * s >= b:  # max(u, c t) >= 1
        return S.C1
    if m * m * b <= M * M * a * s:  # u <= c t
        return S.C2
    return S.C3


def _near_boundary(w, a, b, M, tol):
    """True when (w, a, b, M) is within relative distance ``tol`` of a case boundary, where
    rounding may legitimately put it on either side.  Exact zeros (w = 0, a = b = 0) are decided
    without rounding, so they do not count as near."""
    s, _, m = _stats(w)

    def near(x, y):
        return 0 < max(x, y) and abs(x - y) <= tol * max(x, y)

    return near(m, M) or near(a * s, b) or near(m * m * b, M * M * a * s)


def _phi(z, a, b, s):
    return (a * s / z if s > 0 else 0.0) + b * z


# ----------------------------------------------------------------------------------------------
# property-based draws, concentrated near the case boundaries
# ----------------------------------------------------------------------------------------------
REL = [0.0, 1e-15, -1e-15, 1e-12, -1e-12, 1e-9, -1e-9, 1e-6, -1e-6, 1e-3, -1e-3, 0.1, -0.1]
coef = st.floats(-3.0, 2.0).map(lambda e: 10.0 ** e)  # a, b log-uniform in [1e-3, 1e2]
MODES = ["generic", "ct=1", "u=ct", "u=1", "a=0", "b=0", "a=b=0", "w=0", "tiny"]


@st.composite
def groups(draw, max_k=8):
    """``(w, a, b, M)`` for one group of size 1..max_k."""
    k = draw(st.integers(1, max_k))
    mode = draw(st.sampled_from(MODES))
    a, b = draw(coef), draw(coef)
    d = np.array(draw(st.lists(st.floats(-1.0, 1.0), min_size=k, max_size=k)))
    d[np.abs(d) < 0.05] = 0.0  # exact zeros inside the group (and no subnormal directions)
    if not d.any():
        d[-1] = -0.5
    d = d / np.linalg.norm(d)  # t(d) = 1
    md = float(np.abs(d).max())
    eps = draw(st.sampled_from(REL))
    scale = draw(st.floats(1e-3, 5.0))
    M = draw(st.floats(0.05, 5.0))
    c = math.sqrt(a / b)
    if mode == "ct=1":  # c t = 1 + eps, u anywhere in [0.01, 1.5]
        w = d * ((1.0 + eps) / c)
        M = md * (1.0 + eps) / c / draw(st.floats(0.01, 1.5))
    elif mode == "u=ct":  # u = c t (1 + eps), c t = r < 1
        r = draw(st.floats(0.01, 0.99))
        w = d * (r / c)
        M = md * (r / c) / (r * (1.0 + eps))
    elif mode == "u=1":  # m = M (1 + eps)
        w = d * scale
        M = md * scale / (1.0 + eps)
    elif mode == "w=0":
        w = np.zeros(k)
    elif mode == "tiny":
        w = d * scale * 1e-7
    else:
        w = d * scale
        if mode in ("a=0", "a=b=0"):
            a = 0.0
        if mode in ("b=0", "a=b=0"):
            b = 0.0
    return np.asarray(w, float), float(a), float(b), float(M)


@settings(max_examples=2000, **SETTINGS)
@given(groups())
def test_closed_form_matches_numeric_minimum_and_case_definition(g):
    w, a, b, M = g
    r = S.spr(w[None], a, b, M)
    v, z, case = float(r.value[0]), float(r.z[0]), int(r.case[0])
    s, t, m = _stats(w)
    # (i) the value is the minimum of phi over [u, 1], found numerically
    v_num, z_num = S.spr_numeric(w[None], a, b, M)
    assert v == pytest.approx(float(v_num[0]), rel=1e-9, abs=1e-15)
    unique = not (b == 0 and (a == 0 or s == 0))  # phi is constant otherwise
    if unique:
        assert z == pytest.approx(float(z_num[0]), rel=1e-6, abs=1e-9)
    assert 0.0 <= z <= 1.0
    if m <= M:
        assert z >= m / M * (1 - 1e-15)  # z* feasible: u <= z*
        if z > 0:  # and it attains the value: phi(z*) = SPR
            assert _phi(z, a, b, s) == pytest.approx(v, rel=1e-12, abs=1e-15)
    # (ii) the case reported is the case of the definition (exact rationals), except within
    # 1e-12 of a boundary where rounding may pick either side (the value is continuous there)
    if not _near_boundary(w, a, b, M, 1e-12):
        assert case == _reference_case(w, a, b, M)
    # (iii) z and value are those of the reported case
    if case == S.C1:
        assert z == 1.0
        assert v == pytest.approx(a * s + b, rel=1e-13, abs=1e-300)
    elif case == S.C2:
        assert z == pytest.approx(math.sqrt(a) * t / math.sqrt(b), rel=1e-13, abs=1e-300)
        assert v == pytest.approx(2 * math.sqrt(a * b) * t, rel=1e-13, abs=1e-300)
    else:
        assert case == S.C3
        assert z == pytest.approx(m / M, rel=1e-15)
        assert v == pytest.approx(a * M * s / m + b * m / M, rel=1e-13)


@settings(max_examples=400, **SETTINGS)
@given(groups(), st.integers(1, 8), st.data())
def test_padding_with_zeros_changes_nothing(g, n_pad, data):
    w, a, b, M = g
    pos = data.draw(st.integers(0, w.size))  # zeros anywhere, not only at the end
    wp = np.insert(w, pos, np.zeros(n_pad))
    r, rp = S.spr(w, a, b, M), S.spr(wp, a, b, M)
    np.testing.assert_allclose(rp.value, r.value, rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(rp.z, r.z, rtol=1e-14, atol=1e-300)
    if not _near_boundary(w, a, b, M, 1e-12):
        assert int(rp.case) == int(r.case)
        gp = S.spr_grad(wp, a, b, M)
        assert np.all(gp[pos:pos + n_pad] == 0.0)
        np.testing.assert_allclose(np.delete(gp, np.s_[pos:pos + n_pad]), S.spr_grad(w, a, b, M),
                                   rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(S.bigm_value(wp, a, b, M), S.bigm_value(w, a, b, M), rtol=1e-14)


def test_b_zero_is_c1_and_a_zero_is_linear_in_u():
    # b = 0: c = inf, phi(z) = a t^2 / z decreasing -> z* = 1, plain ridge a t^2.
    w = np.array([0.3, -0.4])
    r = S.spr(w, 2.0, 0.0, 1.0)
    assert (int(r.case), float(r.z), float(r.value)) == (S.C1, 1.0, pytest.approx(2 * 0.25))
    # a = 0, b = 3, M = 2: c = 0, phi(z) = 3 z increasing -> z* = u = 0.4/2 = 0.2, value 0.6 (C3)
    r = S.spr(w, 0.0, 3.0, 2.0)
    assert (int(r.case), float(r.z), float(r.value)) == (S.C3, 0.2, pytest.approx(0.6))
    # a = 0, u >= 1 (M = 0.4 = m): C1, value b = 3
    r = S.spr(w, 0.0, 3.0, 0.4)
    assert (int(r.case), float(r.z), float(r.value)) == (S.C1, 1.0, 3.0)


# ----------------------------------------------------------------------------------------------
# hand-solvable fixtures, answers attached
# ----------------------------------------------------------------------------------------------
FIXTURES = [
    # id, w, a, b, M, case, value, z, grad
    # a=1,b=1,M=1, w=[0.3,0.4]: t=0.5, m=0.4, u=0.4, c=1, ct=0.5; u <= ct < 1 -> C2;
    # value 2*sqrt(1*1)*0.5 = 1.0, z = ct = 0.5; grad 2 w / t = [1.2, 1.6]
    ("C2", [0.3, 0.4], 1.0, 1.0, 1.0, S.C2, 1.0, 0.5, [1.2, 1.6]),
    # a=1,b=4,M=5, w=[3,4]: t=5, m=4, u=0.8, c=0.5, ct=2.5 >= 1 -> C1;
    # value 1*25 + 4 = 29, z = 1; grad 2 a w = [6, 8]
    ("C1 via ct", [3.0, 4.0], 1.0, 4.0, 5.0, S.C1, 29.0, 1.0, [6.0, 8.0]),
    # a=1,b=100,M=2, w=[2,0,0]: t=2, m=2, u=1 (on the box), c=0.1, ct=0.2 -> C1 via u;
    # value 4 + 100 = 104, z = 1; grad [4, 0, 0]
    ("C1 via u", [2.0, 0.0, 0.0], 1.0, 100.0, 2.0, S.C1, 104.0, 1.0, [4.0, 0.0, 0.0]),
    # a=1,b=16,M=0.5, w=[0.4,0.3]: t=0.5, m=0.4, u=0.8, c=0.25, ct=0.125 < u < 1 -> C3;
    # value a M t^2/m + b m/M = 0.5*0.25/0.4 + 16*0.4/0.5 = 0.3125 + 12.8 = 13.1125, z = 0.8;
    # check phi(0.8) = 0.25/0.8 + 16*0.8 = 13.1125.
    # grad 2 a M w/m = 2.5 w = [1.0, 0.75]; arg-max k=0 adds b/M - a M t^2/m^2
    #      = 32 - 0.5*0.25/0.16 = 31.21875  ->  [32.21875, 0.75]
    ("C3", [0.4, 0.3], 1.0, 16.0, 0.5, S.C3, 13.1125, 0.8, [32.21875, 0.75]),
    # same but w_k < 0: sign flips the arg-max term: [-32.21875, 0.75]
    ("C3 negative", [-0.4, 0.3], 1.0, 16.0, 0.5, S.C3, 13.1125, 0.8, [-32.21875, 0.75]),
    # singleton a=1,b=4,M=1, w=[0.5]: t=m=0.5, u=0.5, c=0.5, ct=0.25 < u -> C3;
    # value 1*1*0.25/0.5 + 4*0.5/1 = 2.5, z = 0.5; grad 2*1*1*0.5/0.5 + (4 - 0.25/0.25) = 5
    ("C3 singleton", [0.5], 1.0, 4.0, 1.0, S.C3, 2.5, 0.5, [5.0]),
    # w = 0 (a, b > 0): t = m = 0 -> u = ct = 0 -> C2, value 0, z = 0, grad 0
    ("zero", [0.0, 0.0, 0.0], 2.0, 3.0, 1.0, S.C2, 0.0, 0.0, [0.0, 0.0, 0.0]),
    # outside the box, a=1,b=1,M=1, w=[2,0]: u=2 > 1, the C1 extension: 4 + 1 = 5, grad [4, 0]
    ("beyond box", [2.0, 0.0], 1.0, 1.0, 1.0, S.C1, 5.0, 1.0, [4.0, 0.0]),
    # exact boundaries, exactly representable: ct = 1 (a=b=1, w=[1,0], M=4) belongs to C1
    ("ct=1 exactly", [1.0, 0.0], 1.0, 1.0, 4.0, S.C1, 2.0, 1.0, [2.0, 0.0]),
    # u = ct = 0.5 (a=b=1, w=[0.5], M=1) belongs to C2: value 2*0.5 = 1, z = 0.5
    ("u=ct exactly", [0.5], 1.0, 1.0, 1.0, S.C2, 1.0, 0.5, [2.0]),
]


@pytest.mark.parametrize("name,w,a,b,M,case,value,z,grad", FIXTURES, ids=[f[0] for f in FIXTURES])
def test_hand_solved_fixtures(name, w, a, b, M, case, value, z, grad):
    w = np.array(w)
    r = S.spr(w, a, b, M)
    assert int(r.case) == case
    assert float(r.value) == pytest.approx(value, rel=1e-13, abs=1e-15)
    assert float(r.z) == pytest.approx(z, rel=1e-13, abs=1e-15)
    np.testing.assert_allclose(S.spr_grad(w, a, b, M), grad, rtol=1e-12, atol=1e-15)
    assert float(S.spr_value(w, a, b, M)) == float(r.value)
    assert float(S.spr_numeric(w, a, b, M)[0]) == pytest.approx(value, rel=1e-9, abs=1e-15)
    # torch gives the same answer, and autograd the same gradient
    wt = torch.tensor(w, dtype=D, requires_grad=True)
    rt = S.spr(wt, a, b, M)
    assert int(rt.case) == case
    assert float(rt.value.detach()) == pytest.approx(value, rel=1e-13, abs=1e-15)
    rt.value.backward()
    np.testing.assert_allclose(wt.grad.numpy(), grad, rtol=1e-12, atol=1e-15)


def test_fixtures_hit_every_case():
    assert {f[5] for f in FIXTURES} == {S.C1, S.C2, S.C3}


# ----------------------------------------------------------------------------------------------
# continuity at the case boundaries, and the kink at u = 1
# ----------------------------------------------------------------------------------------------
A, B = 0.3, 0.7
C = math.sqrt(A / B)
FLAT = np.ones(5) / math.sqrt(5)  # m/t small
PEAKY = np.array([1.0, 0.1, -0.2, 0.05, 0.1])
PEAKY = PEAKY / np.linalg.norm(PEAKY)  # t = 1, m ~ 0.97


def _c1c2(side):  # c t = 1 + side, M far away (u small)
    return FLAT * (1 + side) / C, 10.0


def _c2c3(side):  # c t = 0.5, u = 0.5 (1 + side)
    w = PEAKY * 0.5 / C
    return w, np.abs(w).max() / (0.5 * (1 + side))


def _c1c3(side):  # c t = 0.1 < 1, u = 1 + side (C1 above: the box edge / extension)
    w = PEAKY * 0.1 / C
    return w, np.abs(w).max() / (1 + side)


BOUNDARIES = [("C1|C2", _c1c2, S.C1, S.C2), ("C2|C3", _c2c3, S.C3, S.C2),
              ("C1|C3", _c1c3, S.C1, S.C3)]


@pytest.mark.parametrize("name,make,above,below", BOUNDARIES, ids=[b[0] for b in BOUNDARIES])
@pytest.mark.parametrize("eps", [1e-4, 1e-6, 1e-9])
def test_value_continuous_across_boundary(name, make, above, below, eps):
    (wp, Mp), (wm, Mm) = make(eps), make(-eps)
    rp, rm = S.spr(wp, A, B, Mp), S.spr(wm, A, B, Mm)
    assert (int(rp.case), int(rm.case)) == (above, below)  # really on both sides
    assert abs(float(rp.value) - float(rm.value)) <= 5 * eps * float(rp.value)
    assert abs(float(rp.z) - float(rm.z)) <= 5 * eps


@pytest.mark.parametrize("name,make,above,below", BOUNDARIES[:2], ids=["C1|C2", "C2|C3"])
def test_gradient_continuous_across_c1c2_and_c2c3(name, make, above, below):
    eps = 1e-7
    (wp, Mp), (wm, Mm) = make(eps), make(-eps)
    gp, gm = S.spr_grad(wp, A, B, Mp), S.spr_grad(wm, A, B, Mm)
    assert np.max(np.abs(gp - gm)) <= 20 * eps * np.max(np.abs(gp))


def test_gradient_kink_at_u_equal_one():
    """C1|C3 (u = 1 with c t < 1) is a kink: coming from C3 the arg-max coordinate carries the
    extra (b - a t^2)/M > 0 that C1 (z* = 1) does not.  Documented, not smoothed."""
    eps = 1e-9
    w, M1 = _c1c3(0.0)
    s, t, m = _stats(w)
    _, M_in = _c1c3(-eps)  # u = 1 - eps, C3
    g_in = S.spr_grad(w, A, B, M_in)
    g_on = S.spr_grad(w, A, B, M1)  # u = 1 exactly: C1
    g_out = S.spr_grad(w, A, B, _c1c3(eps)[1])
    assert int(S.spr(w, A, B, M1).case) == S.C1
    np.testing.assert_allclose(g_on, 2 * A * w, rtol=1e-12)
    np.testing.assert_allclose(g_out, 2 * A * w, rtol=1e-12)
    jump = g_in - g_on
    k = int(np.argmax(np.abs(w)))
    assert jump[k] == pytest.approx((B - A * s) / M1, rel=1e-6)
    assert jump[k] > 0.5  # a real kink, not rounding
    np.testing.assert_allclose(np.delete(jump, k), 0.0, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# gradients: finite differences, autograd, gradcheck, w = 0
# ----------------------------------------------------------------------------------------------
def _random_points(seed, n=600, k=4):
    """Random groups spread over all three cases, with per-group a, b, M."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)) * 10 ** rng.uniform(-1.5, 0.5, (n, 1))
    w[rng.random((n, k)) < 0.15] = 0.0
    w[:, 0] += 0.01  # no all-zero rows
    a = 10 ** rng.uniform(-2, 1, n)
    b = 10 ** rng.uniform(-2, 1, n)
    M = np.abs(w).max(-1) / rng.uniform(0.05, 1.3, n)  # u uniform in [0.05, 1.3]
    return w, a, b, M


def _off_kinks(w, a, b, M, tol=1e-4):
    ok = np.array([not _near_boundary(w[i], a[i], b[i], M[i], tol) for i in range(len(w))])
    srt = np.sort(np.abs(w), axis=-1)
    return ok & (srt[:, -1] - srt[:, -2] > tol * srt[:, -1])  # unique arg-max


def _fd_grad(fun, w, a, b, M):
    """Central differences, step 1e-6 of the group's scale; also returns the rounding-error
    bound of the difference quotient (a few ulps of the value over the step)."""
    h = 1e-6 * np.abs(w).max(-1, keepdims=True)
    g = np.empty_like(w)
    for i in range(w.shape[-1]):
        e = np.zeros_like(w)
        e[:, i] = h[:, 0]
        g[:, i] = (fun(w + e, a, b, M) - fun(w - e, a, b, M)) / (2 * h[:, 0])
    return g, 1e-14 * np.abs(fun(w, a, b, M))[:, None] / h


@pytest.mark.parametrize("fun,grad", [(S.spr_value, S.spr_grad), (S.bigm_value, S.bigm_grad)],
                         ids=["spr", "bigm"])
def test_gradient_matches_central_finite_differences(fun, grad):
    w, a, b, M = _random_points(0)
    keep = _off_kinks(w, a, b, M)
    w, a, b, M = w[keep], a[keep], b[keep], M[keep]
    cases = np.asarray(S.spr(w, a, b, M).case)
    assert min(np.sum(cases == c) for c in (S.C1, S.C2, S.C3)) >= 50  # every case exercised
    g = grad(w, a, b, M)
    g_fd, rounding = _fd_grad(fun, w, a, b, M)
    scale = np.abs(g).max(-1, keepdims=True)
    sharp = (rounding <= 1e-7 * scale)[:, 0]  # rows where the comparison can see a 1e-6 error
    assert sharp.mean() > 0.9
    assert np.all(np.abs(g - g_fd)[sharp] <= 1e-6 * scale[sharp])
    assert np.all(np.abs(g - g_fd) <= 1e-6 * scale + rounding)


def _tied_rows():
    """Rows with tied maxima in every case (a = 1, b = 16): subgradients spread evenly."""
    rows = [([0.5, -0.5, 0.1], 0.6),  # t=0.714, ct=0.18, u=0.83: C3 with a tie
            ([0.3, 0.3, -0.3, 0.0], 0.4),  # t=0.52, ct=0.13, u=0.75: C3, three-way tie
            ([0.1, 0.1], 10.0),  # ct=0.035, u=0.01: C2
            ([3.0, -3.0], 5.0)]  # ct=1.06: C1
    k = max(len(r) for r, _ in rows)
    w = np.array([r + [0.0] * (k - len(r)) for r, _ in rows])
    return w, 1.0, 16.0, np.array([M for _, M in rows])


def test_tied_maxima_share_the_subgradient_evenly():
    w, a, b, M = _tied_rows()
    assert list(np.asarray(S.spr(w, a, b, M).case)) == [S.C3, S.C3, S.C2, S.C1]
    g = S.spr_grad(w, a, b, M)
    s, m = np.sum(w[0] ** 2), 0.5
    share = b / M[0] - a * M[0] * s / m ** 2  # split as +1/2, -1/2 over the tie
    expect = 2 * a * M[0] * w[0] / m + share * np.array([0.5, -0.5, 0.0, 0.0])
    np.testing.assert_allclose(g[0], expect, rtol=1e-12)
    # three-way tie, one of them negative: each gets a third of the arg-max term
    s, m = np.sum(w[1] ** 2), 0.3
    share = b / M[1] - a * M[1] * s / m ** 2
    expect = 2 * a * M[1] * w[1] / m + share * np.array([1.0, 1.0, -1.0, 0.0]) / 3
    np.testing.assert_allclose(g[1], expect, rtol=1e-12)


@pytest.mark.parametrize("which", ["random", "ties", "zeros"])
def test_torch_autograd_equals_closed_form_gradient(which):
    if which == "random":
        w, a, b, M = _random_points(1, n=300)
    elif which == "ties":
        w, a, b, M = _tied_rows()
    else:
        w = np.array([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, -0.3, 0.0]])
        a, b, M = np.array([1.0, 0.0, 2.0]), np.array([1.0, 2.0, 0.5]), 1.0
    for fun, grad in [(S.spr_value, S.spr_grad), (S.bigm_value, S.bigm_grad)]:
        wt = torch.tensor(w, dtype=D, requires_grad=True)
        ta, tb, tM = (torch.as_tensor(x, dtype=D) for x in (a, b, M))
        fun(wt, ta, tb, tM).sum().backward()
        assert torch.isfinite(wt.grad).all()
        np.testing.assert_allclose(wt.grad.numpy(), grad(w, a, b, M), rtol=1e-12, atol=1e-14)
        # the closed form evaluated on torch tensors is the numpy closed form
        np.testing.assert_allclose(grad(wt.detach(), ta, tb, tM).numpy(), grad(w, a, b, M),
                                   rtol=1e-14, atol=0)


GRADCHECK_POINTS = [  # (w, a, b, M): one per case, singleton, sparse, random
    ([0.3, 0.4, -0.1], 1.0, 1.0, 1.0),  # C2
    ([3.0, 4.0, 1.0], 1.0, 4.0, 5.0),  # C1
    ([0.4, 0.3, 0.05], 1.0, 16.0, 0.5),  # C3
    ([0.7], 1.0, 4.0, 1.0),  # C3 singleton
    ([0.0, 0.2, 0.0, 0.15], 0.5, 0.5, 3.0),  # C2 with zeros
    ([2.5, 0.0, 0.0, 0.1], 1.0, 100.0, 2.0),  # beyond the box (C1 extension)
]


@pytest.mark.parametrize("w,a,b,M", GRADCHECK_POINTS)
def test_gradcheck(w, a, b, M):
    wt = torch.tensor(w, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: S.spr_value(x, a, b, M), (wt,),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_random_batch():
    w, a, b, M = _random_points(2, n=80)
    keep = _off_kinks(w, a, b, M, tol=1e-3)
    w, a, b, M = (torch.tensor(x[keep], dtype=D) for x in (w, a, b, M))
    wt = w.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: S.spr_value(x, a, b, M), (wt,),
                                    eps=1e-7, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("a,b", [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0), (1e-8, 1e8)])
def test_gradient_at_zero_is_exactly_zero(a, b):
    w = np.zeros((2, 3))
    w[1] = [0.2, -0.1, 0.0]  # a non-zero neighbour row in the same batch
    g = S.spr_grad(w, a, b, 0.5)
    assert np.all(g[0] == 0.0)
    assert float(S.spr_value(w, a, b, 0.5)[0]) == 0.0
    wt = torch.tensor(w, dtype=D, requires_grad=True)
    S.spr_value(wt, a, b, 0.5).sum().backward()
    assert torch.isfinite(wt.grad).all()
    assert torch.all(wt.grad[0] == 0.0)
    np.testing.assert_allclose(wt.grad.numpy(), g, rtol=1e-12)
    wt.grad = None
    S.bigm_value(wt, a, b, 0.5).sum().backward()
    assert torch.all(wt.grad[0] == 0.0) and torch.isfinite(wt.grad).all()


@pytest.mark.parametrize("dtype,x", [(torch.float64, 1e-200), (torch.float64, 1e-300),
                                     (torch.float32, 1e-30)])
def test_tiny_nonzero_weights_do_not_underflow(dtype, x):
    """w = x [3, 4, 0], a = 2, b = 0.5, M = 1: c = 2, t = 5x, m = 4x, u = 4x <= c t = 10x < 1, so C2
    with value 2 sqrt(ab) t = 2 * 5x = 10x and gradient 2 sqrt(ab) w / t = [1.2, 1.6, 0] -- at every
    scale (C2 is a cone).  Here x^2 underflows to 0 while ||w||_inf does not."""
    w = torch.tensor([3.0 * x, 4.0 * x, 0.0], dtype=dtype, requires_grad=True)
    r = S.spr(w, 2.0, 0.5, 1.0)
    assert int(r.case) == S.C2
    assert float(r.value.detach()) == pytest.approx(10 * x, rel=1e-5)
    g = S.spr_grad(w.detach(), 2.0, 0.5, 1.0)
    assert torch.isfinite(g).all()
    np.testing.assert_allclose(g.numpy(), [1.2, 1.6, 0.0], rtol=1e-5)
    r.value.backward()
    np.testing.assert_allclose(w.grad.numpy(), [1.2, 1.6, 0.0], rtol=1e-5)
    if dtype == torch.float64:  # numpy takes the same path
        wn = np.array([3.0 * x, 4.0 * x, 0.0])
        assert np.all(np.isfinite(S.spr_grad(wn, 2.0, 0.5, 1.0)))
        assert int(S.spr(wn, 2.0, 0.5, 1.0).case) == S.C2


def test_autograd_finite_exactly_on_boundaries():
    rows = [_c1c2(0.0), _c2c3(0.0), _c1c3(0.0)]
    for w, M in rows:
        wt = torch.tensor(w, dtype=D, requires_grad=True)
        S.spr_value(wt, A, B, M).backward()
        assert torch.isfinite(wt.grad).all()
        np.testing.assert_allclose(wt.grad.numpy(), S.spr_grad(w, A, B, M), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# structure: BerHu, convexity, homogeneity, the group-lasso minorant
# ----------------------------------------------------------------------------------------------
def _berhu(x, delta):
    ax = np.abs(x)
    return np.where(ax <= delta, ax, (x * x + delta * delta) / (2 * delta))


@pytest.mark.parametrize("a,b,M", [(1.0, 1.0, 1.0), (1.0, 4.0, 2.5), (9.0, 1.0, 0.5),
                                   (0.2, 0.05, 10.0)])
def test_singleton_with_cM_ge_1_is_scaled_reverse_huber(a, b, M):
    c = math.sqrt(a / b)
    assert c * M >= 1
    x = np.linspace(-3.0, 3.0, 1201)  # includes 0, +-delta for these parameters, and |x| > M
    v = S.spr_value(x[:, None], a, b, M)
    np.testing.assert_allclose(v, 2 * math.sqrt(a * b) * _berhu(x, 1 / c), rtol=1e-12, atol=1e-15)
    dberhu = np.where(np.abs(x) <= 1 / c, np.sign(x), c * x)
    np.testing.assert_allclose(S.spr_grad(x[:, None], a, b, M)[:, 0],
                               2 * math.sqrt(a * b) * dberhu, rtol=1e-12, atol=1e-15)
    assert set(np.asarray(S.spr(x[:, None], a, b, M).case)) == {S.C1, S.C2}  # no C3 when cM >= 1


def test_singleton_with_cM_lt_1_is_not_reverse_huber():
    # a=1, b=4, M=1: c = 0.5, cM = 0.5; x = 0.5 is C3 with value 2.5 (fixture above),
    # while 2 sqrt(ab) BerHu_2(0.5) = 4 * 0.5 = 2.0
    assert float(S.spr_value(np.array([0.5]), 1.0, 4.0, 1.0)) == pytest.approx(2.5)
    assert 2 * 2 * _berhu(0.5, 2.0) == pytest.approx(2.0)


def test_midpoint_convex_on_the_box():
    rng = np.random.default_rng(3)
    n, k = 20000, 3
    a, b = 10 ** rng.uniform(-2, 1, n), 10 ** rng.uniform(-2, 1, n)
    M = 10 ** rng.uniform(-1, 1, n)
    size = 10 ** rng.uniform(-2, 0, (n, 1))  # many pairs near 0, where C2/C3 live
    x = M[:, None] * rng.uniform(-1, 1, (n, k)) * size
    y = M[:, None] * rng.uniform(-1, 1, (n, k)) * np.where(rng.random((n, 1)) < 0.5, size, 1.0)
    fx, fy, fm = (S.spr_value(p, a, b, M) for p in (x, y, (x + y) / 2))
    assert np.all(fm <= (fx + fy) / 2 + 1e-12 * (np.abs(fx) + np.abs(fy)) + 1e-15)
    cx, cy = np.asarray(S.spr(x, a, b, M).case), np.asarray(S.spr(y, a, b, M).case)
    for c1, c2 in [(1, 2), (1, 3), (2, 3)]:  # pairs that straddle each boundary were drawn
        assert np.sum(((cx == c1) & (cy == c2)) | ((cx == c2) & (cy == c1))) >= 25


def test_extension_beyond_box_convex_iff_cM_ge_1():
    """Outside the box SPR is extended with C1.  With c M >= 1 there is no C3 region, so SPR is
    2 sqrt(ab) BerHu(t) on all of R^k: convex.  With c M < 1 the C3 -> C1 step at u = 1 is a
    concave kink (slope drops from aM + b/M to 2aM for singletons): not convex."""
    x = np.linspace(-5.0, 5.0, 2001)[:, None]
    for a, b, M in [(1.0, 1.0, 2.0), (1.0, 4.0, 2.0), (4.0, 1.0, 0.5)]:  # c M = 2, 1, 1
        f = S.spr_value(x, a, b, M)
        assert np.min(f[:-2] + f[2:] - 2 * f[1:-1]) >= -1e-12
    # c M = 0.5: f(0.9) = 5*0.9 = 4.5 (C3, slope aM + b/M = 5), f(1.1) = 1.21 + 4 = 5.21 (C1),
    # f(1.0) = 5 > (4.5 + 5.21)/2 = 4.855
    f = S.spr_value(np.array([[0.9], [1.0], [1.1]]), 1.0, 4.0, 1.0)
    np.testing.assert_allclose(f, [4.5, 5.0, 5.21], rtol=1e-12)
    assert f[1] > (f[0] + f[2]) / 2 + 0.1


def test_positively_homogeneous_near_zero_and_group_lasso_slope():
    rng = np.random.default_rng(4)
    a, b = 0.3, 0.7
    c = math.sqrt(a / b)
    w2 = rng.standard_normal(6)
    w2 *= 0.5 / (c * np.linalg.norm(w2))  # c t = 0.5, M large -> C2
    w3 = np.array([1.0, 0.05, -0.02, 0.0, 0.03, 0.01])
    w3 *= 0.5 / (c * np.linalg.norm(w3))  # c t = 0.5, u = 0.9 -> C3
    for w, M, case in [(w2, 100.0, S.C2), (w3, np.abs(w3).max() / 0.9, S.C3)]:
        v = float(S.spr_value(w, a, b, M))
        for s in [0.9, 0.5, 1e-3, 1e-8, 1e-30]:
            r = S.spr(s * w, a, b, M)
            assert int(r.case) == case  # both C2 and C3 are cones
            assert float(r.value) == pytest.approx(s * v, rel=1e-13)
    # in C2 the value is 2 sqrt(ab) t exactly and the gradient has constant norm 2 sqrt(ab):
    # the slope does not vanish at 0, which is what drives whole groups to exact zeros
    for s in [1.0, 1e-4, 1e-12]:
        w = s * w2
        assert float(S.spr_value(w, a, b, 100.0)) / (s * 0.5 / c) == pytest.approx(
            2 * math.sqrt(a * b), rel=1e-13)
        assert np.linalg.norm(S.spr_grad(w, a, b, 100.0)) == pytest.approx(2 * math.sqrt(a * b),
                                                                           rel=1e-13)


def test_group_lasso_minorant_and_ridge_majorant():
    """AM-GM: phi(z) >= 2 sqrt(ab) t for every z > 0, equality in C2; z = 1 is feasible so
    SPR <= a t^2 + b.  Hence the prox of SPR at ||v|| < 2 sqrt(ab) is exactly 0."""
    w, a, b, M = _random_points(5, n=2000)
    M = M * np.where(np.arange(len(M)) % 2 == 0, 1.0, 100.0)  # half of them deep in the box
    t = np.linalg.norm(w, axis=-1)
    r = S.spr(w, a, b, M)
    v, case = np.asarray(r.value), np.asarray(r.case)
    lasso = 2 * np.sqrt(a * b) * t
    assert np.all(v >= lasso * (1 - 1e-13))
    np.testing.assert_allclose(v[case == S.C2], lasso[case == S.C2], rtol=1e-13)
    assert np.all(v <= (a * t * t + b) * (1 + 1e-13))
    assert np.all(v[case != S.C2] > lasso[case != S.C2])


# ----------------------------------------------------------------------------------------------
# big-M relaxation
# ----------------------------------------------------------------------------------------------
def test_bigm_formula_and_bigm_below_spr():
    w, a, b, M = _random_points(6, n=3000)
    s = np.sum(w * w, -1)
    m = np.abs(w).max(-1)
    inside = m <= M
    assert 500 < inside.sum() < len(M)  # both sides drawn
    bm, sp = S.bigm_value(w, a, b, M), S.spr_value(w, a, b, M)
    np.testing.assert_allclose(bm[inside], (a * s + b * m / M)[inside], rtol=1e-14)
    np.testing.assert_allclose(bm[~inside], (a * s + b)[~inside], rtol=1e-14)
    # the perspective relaxation is tighter: a t^2/z + b z >= a t^2 + b u for z in [u, 1]
    assert np.all(sp[inside] >= bm[inside] * (1 - 1e-13))
    gap = sp[inside] - bm[inside]
    assert np.sum(gap > 1e-3 * sp[inside]) > 100  # and strictly tighter on many points
    np.testing.assert_allclose(sp[~inside], bm[~inside], rtol=1e-14)  # same C1 extension
    # hand fixture: a=1,b=16,M=0.5, w=[0.4,0.3]: 0.25 + 16*0.8 = 13.05 <= SPR 13.1125;
    # grad 2 a w + (b/M) e_0 = [0.8 + 32, 0.6]
    w0 = np.array([0.4, 0.3])
    assert float(S.bigm_value(w0, 1.0, 16.0, 0.5)) == pytest.approx(13.05, rel=1e-13)
    np.testing.assert_allclose(S.bigm_grad(w0, 1.0, 16.0, 0.5), [32.8, 0.6], rtol=1e-13)


# ----------------------------------------------------------------------------------------------
# batches, broadcasting, numpy == torch
# ----------------------------------------------------------------------------------------------
def test_batches_with_leading_dims_and_per_group_coefficients():
    rng = np.random.default_rng(7)
    k = 4
    w = rng.standard_normal((2, 3, k)) * 0.3
    w[0, 1] = 0.0
    a = rng.uniform(0.1, 2.0, (2, 3))  # per group
    b = rng.uniform(0.1, 2.0, (3,))  # broadcast over the first axis
    M = np.array([[0.5], [2.0]])  # broadcast over the second axis
    r = S.spr(w, a, b, M)
    assert r.value.shape == r.z.shape == r.case.shape == (2, 3)
    g = S.spr_grad(w, a, b, M)
    assert g.shape == w.shape
    ab, Mb = np.broadcast_arrays(a, b[None, :]), np.broadcast_to(M, (2, 3))
    for i in range(2):
        for j in range(3):
            args = (w[i, j], ab[0][i, j], ab[1][i, j], Mb[i, j])
            one = S.spr(*args)
            assert float(r.value[i, j]) == pytest.approx(float(one.value), rel=1e-15, abs=0)
            assert int(r.case[i, j]) == int(one.case)
            np.testing.assert_allclose(g[i, j], S.spr_grad(*args), rtol=1e-15, atol=0)
            assert float(S.bigm_value(w, a, b, M)[i, j]) == pytest.approx(
                float(S.bigm_value(*args)), rel=1e-15)
    v_num, z_num = S.spr_numeric(w, a, b, M)
    assert v_num.shape == (2, 3)
    np.testing.assert_allclose(r.value, v_num, rtol=1e-9, atol=1e-15)
    assert len(set(np.asarray(r.case).ravel())) >= 2


@pytest.mark.parametrize("coef_kind", ["torch", "numpy", "python"])
def test_numpy_and_torch_agree(coef_kind):
    w, a, b, M = _random_points(8, n=240, k=5)
    w = w.reshape(4, 60, 5)
    a, b, M = (x.reshape(4, 60) for x in (a, b, M))
    if coef_kind == "torch":
        ca, cb, cM = (torch.tensor(x, dtype=D) for x in (a, b, M))
    elif coef_kind == "numpy":
        ca, cb, cM = a, b, M
    else:
        a, b, M = 0.7, 0.2, 1.5
        ca, cb, cM = a, b, M
    wt = torch.tensor(w, dtype=D)
    rn, rt = S.spr(w, a, b, M), S.spr(wt, ca, cb, cM)
    assert isinstance(rt.value, torch.Tensor) and rt.value.dtype == D
    np.testing.assert_array_equal(rt.case.numpy(), rn.case)
    for x, y in [(rt.value, rn.value), (rt.z, rn.z), (S.spr_grad(wt, ca, cb, cM), S.spr_grad(w, a, b, M)),
                 (S.bigm_value(wt, ca, cb, cM), S.bigm_value(w, a, b, M)),
                 (S.bigm_grad(wt, ca, cb, cM), S.bigm_grad(w, a, b, M))]:
        np.testing.assert_allclose(x.numpy(), y, rtol=1e-14, atol=1e-300)
