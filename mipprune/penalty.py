"""The closed-form Structured Perspective Regularization (SPR), written once.

The module is named ``penalty``, not ``spr``: importing a submodule binds it on the package,
and ``mipprune.spr`` is the re-exported function.

One structure (group) has weights ``w`` (a vector), a ridge weight ``a >= 0``, a cost of keeping
it ``b >= 0`` and a bound ``M > 0``.  Its term in the perspective reformulation (PR) of the MIP is

    min_z  phi(z) = a ||w||^2 / z + b z      s.t.  u <= z <= 1,   u = ||w||_inf / M,

(0/0 := 0).  phi is convex with unconstrained minimiser z = c t (t = ||w||_2, c = sqrt(a/b),
from phi'(z) = -a t^2/z^2 + b = 0), so the constrained minimiser is the clip
z* = min{1, max{u, c t}} and substituting it back gives the three cases

    C1  max(u, c t) >= 1 :  SPR = a t^2 + b                  (z* = 1)
    C2  u <= c t < 1     :  SPR = 2 sqrt(a b) t              (z* = c t)
    C3  c t < u < 1      :  SPR = a M t^2 / m + b m / M      (z* = u, m = ||w||_inf)

Beyond the box (m > M) the MIP is infeasible; this function *extends with C1*
(``a t^2 + b``), which is what the first author's public code does.  When c M >= 1 there is
no C3 region (C3 needs c t M < m <= t) and the extension is convex: SPR is then
2 sqrt(ab) BerHu_{1/c}(t) everywhere.  When c M < 1 the C3 branch meets C1 at m = M with a
concave kink, so the extension is not convex.  Trainers that need convexity keep weights in
the box instead (see ``nn``).

Every function takes a batch: ``w`` has shape ``(..., k)`` (groups along the leading axes,
weights of a group along the last one; zero padding is harmless because it changes neither
``t`` nor ``m``) and ``a``, ``b``, ``M`` are scalars or arrays broadcastable to ``w.shape[:-1]``.
They are written against the array-API subset that numpy and torch share, so ``nn`` evaluates
this very code on torch tensors (autograd included) -- there is no second copy of the formula.
Case tests are done without dividing (``c t >= 1`` as ``sqrt(a) t >= sqrt(b)``), so ``a = 0``
or ``b = 0`` need no special code, and every branch is evaluated on safe operands
("double where") so gradients are finite at ``w = 0`` and on every case boundary.  Norms are
taken on ``w / m`` (t = m ||w/m||, r = t/m >= 1) so tiny non-zero weights do not underflow
(t^2 < 1e-308 would otherwise send C2 groups to C3 and the gradient to 0/0).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from array_api_compat import array_namespace

__all__ = [
    "C1",
    "C2",
    "C3",
    "SPR",
    "spr",
    "spr_value",
    "spr_grad",
    "bigm_value",
    "bigm_grad",
    "spr_numeric",
]

C1, C2, C3 = 1, 2, 3


class SPR(NamedTuple):
    """Value, optimal ``z*`` and case (1, 2 or 3) of every group."""

    value: object
    z: object
    case: object


def _xp(w):
    return array_namespace(w)


def _as(xp, x, like):
    """A scalar or array as an array of ``like``'s namespace, dtype and device."""
    if isinstance(x, (int, float)):
        return xp.asarray(float(x), dtype=like.dtype, device=getattr(like, "device", None))
    return xp.asarray(x, dtype=like.dtype, device=getattr(like, "device", None))


def _stats(w):
    """``(xp, t, m, r, ws, pos)``: norm t, max-abs m, r = t/m (1 where m = 0), ``ws = w/m``
    and ``m > 0``.  Scaling by m keeps tiny weights from underflowing; the double ``where``
    keeps gradients finite at w = 0 (``sqrt`` is never evaluated at 0)."""
    xp = _xp(w)
    m = xp.max(xp.abs(w), axis=-1)
    pos = m > 0
    one = xp.ones_like(m)
    ws = w / xp.where(pos, m, one)[..., None]
    q = xp.sum(ws * ws, axis=-1)
    r = xp.sqrt(xp.where(pos, q, one))
    t = xp.where(pos, m * r, xp.zeros_like(m))
    return xp, t, m, r, ws, pos


def _cases(xp, t, m, a, b, M):
    """Boolean masks of C1 and C2 (C3 is the rest), tested without division."""
    sa, sb = xp.sqrt(a), xp.sqrt(b)
    c1 = (m >= M) | (sa * t >= sb)  # max(u, c t) >= 1
    c2 = ~c1 & (m * sb <= M * sa * t)  # u <= c t
    return sa, sb, c1, c2


def spr(w, a, b, M) -> SPR:
    """Value, ``z*`` and case of the SPR penalty of each group of ``w`` (see module docstring).

    Differentiable by autograd when ``w`` is a torch tensor: the value is built from the
    case expressions with safe operands, so the gradient is the closed form of ``spr_grad``.
    """
    xp, t, m, r, _, _ = _stats(w)
    a, b, M = (_as(xp, x, t) for x in (a, b, M))
    sa, sb, c1, c2 = _cases(xp, t, m, a, b, M)
    one = xp.ones_like(t)
    sb_safe = xp.where(sb > 0, sb, one)
    v1 = a * t * t + b
    v2 = 2.0 * sa * sb * t
    v3 = a * M * t * r + b * m / M  # a M t^2/m with t/m = r
    value = xp.where(c1, v1, xp.where(c2, v2, v3))
    z = xp.where(c1, one, xp.where(c2, sa * t / sb_safe, m / M))
    ones = xp.ones_like(t, dtype=xp.int64)
    case = xp.where(c1, C1 * ones, xp.where(c2, C2 * ones, C3 * ones))
    return SPR(value, z, case)


def spr_value(w, a, b, M):
    """Per-group SPR value; shape ``w.shape[:-1]``."""
    return spr(w, a, b, M).value


def _argmax_share(xp, w, m):
    """Subgradient weights of ``||w||_inf``: ``sign(w_k)`` spread evenly over the tied maxima.

    This is the convex combination torch's ``amax`` backward uses, so the explicit gradient
    and autograd agree even on ties.
    """
    absw = xp.abs(w)
    hit = xp.astype(absw == m[..., None], w.dtype) * xp.astype(absw > 0, w.dtype)
    count = xp.sum(hit, axis=-1)
    count = xp.where(count > 0, count, xp.ones_like(count))
    return hit * xp.sign(w) / count[..., None]


def spr_grad(w, a, b, M):
    """Gradient of the summed SPR with respect to ``w`` (same shape as ``w``).

    C1: 2 a w.   C2: 2 sqrt(ab) w / t (0 at t = 0).
    C3: 2 a M w / m  +  e_k sign(w_k) (b/M - a M t^2 / m^2)   (k = arg max |w_i|; ties share).
    Continuous across the C1|C2 and C2|C3 boundaries (substitute ct = 1, resp. m = M c t).
    """
    xp, t, m, r, ws, _ = _stats(w)
    a, b, M = (_as(xp, x, t) for x in (a, b, M))
    sa, sb, c1, c2 = _cases(xp, t, m, a, b, M)
    g1 = 2.0 * a[..., None] * w
    g2 = (2.0 * sa * sb / r)[..., None] * ws  # w / t = (w/m) / r
    g3 = (2.0 * a * M)[..., None] * ws + (
        (b / M - a * M * r * r)[..., None] * _argmax_share(xp, w, m)  # t^2/m^2 = r^2
    )
    return xp.where(c1[..., None], g1, xp.where(c2[..., None], g2, g3))


def bigm_value(w, a, b, M):
    """The big-M-relaxation penalty  a ||w||^2 + b min(||w||_inf / M, 1)  (z projected out of
    the continuous big-M relaxation, z* = u; extended with z = 1 beyond the box, like SPR)."""
    xp, t, m, _, _, _ = _stats(w)
    a, b, M = (_as(xp, x, t) for x in (a, b, M))
    return a * t * t + b * xp.minimum(m / M, xp.ones_like(m))


def bigm_grad(w, a, b, M):
    """Gradient of the summed big-M penalty: 2 a w + (b/M) e_k sign(w_k) while m < M."""
    xp, t, m, _, _, _ = _stats(w)
    a, b, M = (_as(xp, x, t) for x in (a, b, M))
    inside = xp.astype(m < M, w.dtype)
    return 2.0 * a[..., None] * w + ((b / M) * inside)[..., None] * _argmax_share(xp, w, m)


def spr_numeric(w, a, b, M, xatol: float = 1e-13):
    """Re-derive SPR by minimising phi(z) = a t^2/z + b z over [u, 1] numerically (numpy only).

    Independent of the closed form: bounded Brent on each group, compared with both endpoints.
    Returns ``(value, z)`` arrays of shape ``w.shape[:-1]``.  Groups outside the box (u > 1)
    get the C1 extension ``a t^2 + b`` with z = 1, matching ``spr``.
    """
    from scipy.optimize import minimize_scalar

    w = np.asarray(w, dtype=float)
    shape = w.shape[:-1]
    s = np.sum(w * w, axis=-1).ravel()
    m = np.max(np.abs(w), axis=-1).ravel()
    a, b, M = (np.broadcast_to(np.asarray(x, dtype=float), shape).ravel() for x in (a, b, M))
    value = np.empty_like(s)
    z = np.empty_like(s)
    for g in range(s.size):
        u = m[g] / M[g]
        if u > 1.0:
            value[g], z[g] = a[g] * s[g] + b[g], 1.0
            continue

        def phi(zz, g=g):
            return (a[g] * s[g] / zz if s[g] > 0 else 0.0) + b[g] * zz

        cands = [(phi(1.0), 1.0)]
        if u > 0 or s[g] == 0:
            cands.append((phi(u) if u > 0 else 0.0, u))
        lo = max(u, 1e-300)
        if lo < 1.0:
            r = minimize_scalar(phi, bounds=(lo, 1.0), method="bounded", options={"xatol": xatol})
            cands.append((float(r.fun), float(r.x)))
        value[g], z[g] = min(cands)
    return value.reshape(shape), z.reshape(shape)
