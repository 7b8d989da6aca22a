"""Node relaxations of (P), solved fast in numpy with a valid lower bound at every iterate.

At a branch-and-bound node each group j is *out* (z_j = 0, so w_j = 0), *in* (z_j = 1) or *free*
(z_j relaxed to [0, 1]).  Projecting z out, the node relaxation is

    min_w  F(w) = f(w) + sum_j h_j(w_j),      f(w) = 1/2 w^T Q w + c^T w + const,

    out:   h = 0 on {w = 0}
    in:    h = a||w||^2 + b                     on the box ||w||_inf <= M
    free:  h = min_{z in [0,1], |w| <= M z}  a||w||^2/z + b z   = SPR(w)   (perspective)
      or   h = min_{z in [0,1], |w| <= M z}  a||w||^2   + b z   = a||w||^2 + b||w||_inf/M  (big-M)

Solver: accelerated proximal gradient (FISTA with gradient restart) on F with step 1/L,
L = lambda_max(Q).  Every h_j has an exact prox and an exact conjugate (below), so at any point
wbar, with g = grad f(wbar), convexity of f gives the valid lower bound

    F*  >=  f(wbar) - g^T wbar - sum_j h_j^*(-g_j)                                  (LB)

which tends to F* as wbar -> w*.  Branch and bound prunes as soon as LB beats the incumbent.

Prox of a free group (tau h, alpha = tau a, beta = tau b).  Writing w = w(z) for fixed z,
    perspective:  w_i(z) = sign(v_i) min(|v_i| z/(z + 2 alpha), M z)
    big-M:        w_i(z) = sign(v_i) min(|v_i| /(1 + 2 alpha), M z)
and the remaining 1-D function g(z) is convex with derivative (envelope theorem)
    perspective:  g'(z) = beta - sum_unclipped alpha v_i^2/(z + 2 alpha)^2
                               + sum_clipped (M (M z - |v_i|) + alpha M^2)
    big-M:        g'(z) = beta + sum_clipped M ((1 + 2 alpha) M z - |v_i|)
Both g' are increasing and concave on [0, 1] (a coordinate's slope drops when it unclips), so
Newton from z = 0 climbs monotonically to the root: z* = 0 if g'(0) >= 0 (the group is zeroed),
z* = 1 if g'(1) <= 0.

Conjugates.  With K(y) = sum_i huber_i,  huber = y^2/(4a) if |y| <= 2aM else M|y| - a M^2
(the value of sup_{|p|<=M} y p - a p^2):
    out: 0     in: K(y) - b     perspective free: max(0, K(y) - b)   (sup over w = z p is linear in z)
    big-M free: max_{z in [0,1]} sum_i H_i(z) - b z,  H_i(z) = sup_{|w|<=Mz} y_i w - a w^2,
                a concave maximisation solved with the same Newton scheme.

One concept, kept in one module although it is longer than most: the node relaxation.  Its
three parts -- per-group prox and conjugate (numba kernels), FISTA, and the certified bound
(LB) -- are one solver: (LB) is only valid with the conjugate of the very h_j whose prox FISTA
steps with, and the kernels call each other inside ``_fista``'s compiled loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numba import njit, objmode

from .deadline import Deadline
from .instance import Instance
from .penalty import spr

__all__ = ["OUT", "IN", "FREE", "BOUNDS", "NodeRelaxation", "RelaxResult", "pr_bound_closed_form"]

OUT, IN, FREE = 0, 1, 2
BOUNDS = ("perspective", "bigm")
_NEWTON_MAX = 100
_CLOCK_WORK = 4e6  # multiply-adds of FISTA between two readings of the clock


# ---- one group: prox and conjugate (numba kernels; v, y are the group's own entries) -----------
@njit(cache=True)
def _free_dprime(x, z, alpha, beta, M, persp):
    """g'(z) and g''(z) of the free-group prox (module docstring)."""
    d, dd = beta, 0.0
    if persp:
        den = z + 2.0 * alpha
        for xi in x:
            if xi > M * den:
                d += M * (M * z - xi) + alpha * M * M
                dd += M * M
            elif den > 0.0:  # xi <= M den: q <= alpha M^2 (xi / den first: den^2 may underflow)
                r = xi / den
                q = alpha * r * r
                d -= q
                dd += 2.0 * q / den
    else:
        s = 1.0 + 2.0 * alpha
        for xi in x:
            if xi > s * M * z:
                d += M * (s * M * z - xi)
                dd += s * M * M
    return d, dd


@njit(cache=True)
def _bigm_conj_d(z, x, a, b, M):
    """-q'(z), -q''(z) for the big-M conjugate (increasing, concave)."""
    dq, ddq = -b, 0.0
    for xi in x:
        if xi > 2.0 * a * M * z:
            dq += M * xi - 2.0 * a * M * M * z
            ddq -= 2.0 * a * M * M
    return -dq, -ddq


@njit(cache=True)
def _increasing_concave_root(x, p1, p2, M, mode, z0):
    """Root in (0, 1) of an increasing concave d(z), by Newton.  ``mode`` 0/1: the perspective /
    big-M prox derivative g' (p1 = alpha, p2 = beta); 2: minus the big-M conjugate's q'
    (p1 = a, p2 = b).

    A tangent lies above a concave function, so one step from any start lands left of the root
    and from there the iterates climb monotonically; a zero slope can only occur right of the
    root, where restarting at 0 is safe.
    """
    z = min(max(z0, 0.0), 1.0)
    for _ in range(_NEWTON_MAX):
        if mode == 2:
            d, dd = _bigm_conj_d(z, x, p1, p2, M)
        else:
            d, dd = _free_dprime(x, z, p1, p2, M, mode == 0)
        if dd <= 0.0:
            if d <= 0.0:
                return z
            z = 0.0
            continue
        zn = min(max(z - d / dd, 0.0), 1.0)
        if abs(zn - z) <= 1e-15 * max(1.0, zn):
            return zn
        z = zn
    return z


@njit(cache=True)
def _prox_group(v, out, tau, a, b, M, status, persp, zwarm):
    """Write prox of tau*h into ``out``; return (z, h(out)) with h from the z-form."""
    k = v.shape[0]
    alpha, beta = tau * a, tau * b
    if status == 0:
        for i in range(k):
            out[i] = 0.0
        return 0.0, 0.0
    if status == 1:
        s = 0.0
        for i in range(k):
            w = min(max(v[i] / (1.0 + 2.0 * alpha), -M), M)
            out[i] = w
            s += w * w
        return 1.0, a * s + b
    x = np.abs(v)
    d0, _ = _free_dprime(x, 0.0, alpha, beta, M, persp)
    d1, _ = _free_dprime(x, 1.0, alpha, beta, M, persp)
    if d0 >= 0.0:
        z = 0.0
    elif d1 <= 0.0:
        z = 1.0
    else:
        z = _increasing_concave_root(x, alpha, beta, M, 0 if persp else 1, zwarm)
    s = 0.0
    for i in range(k):
        if persp:
            den = z + 2.0 * alpha
            mag = min(x[i] * z / den, M * z) if den > 0.0 else 0.0
        else:
            mag = min(x[i] / (1.0 + 2.0 * alpha), M * z)
        out[i] = mag if v[i] >= 0.0 else -mag
        s += mag * mag
    if persp:
        h = (a * s / z if s > 0.0 else 0.0) + b * z
    else:
        h = a * s + b * z
    return z, h


@njit(cache=True)
def _conj_group(y, a, b, M, status, persp):
    """h^*(y) of one group (module docstring)."""
    if status == 0:
        return 0.0
    x = np.abs(y)
    K = 0.0
    for xi in x:
        if xi > 2.0 * a * M:
            K += M * xi - a * M * M
        elif xi > 0.0:  # (a = 0 leaves only xi = 0 here: its term is 0, not 0/0)
            K += xi * xi / (4.0 * a)
    if status == 1:
        return K - b
    if persp:
        return max(0.0, K - b)
    n0, _ = _bigm_conj_d(0.0, x, a, b, M)
    n1, _ = _bigm_conj_d(1.0, x, a, b, M)
    if n0 >= 0.0:
        return 0.0
    if n1 <= 0.0:
        z = 1.0
    else:
        z = _increasing_concave_root(x, a, b, M, 2, 0.0)
    q = -b * z
    for xi in x:
        if xi > 2.0 * a * M * z:
            q += M * z * xi - a * M * M * z * z
        elif xi > 0.0:
            q += xi * xi / (4.0 * a)
    return max(q, 0.0)


# ---- whole vectors ---------------------------------------------------------------------------
@njit(cache=True)
def _prox_all(v, out, zs, tau, idx, klen, a, b, M, status, persp):
    """Prox of every group; z per group in ``zs`` (also its warm start); returns sum of h."""
    kmax = idx.shape[1]
    buf_v = np.empty(kmax)
    buf_w = np.empty(kmax)
    total = 0.0
    for j in range(idx.shape[0]):
        k = klen[j]
        for i in range(k):
            buf_v[i] = v[idx[j, i]]
        z, h = _prox_group(buf_v[:k], buf_w[:k], tau, a[j], b[j], M[j], status[j], persp, zs[j])
        zs[j] = z
        total += h
        for i in range(k):
            out[idx[j, i]] = buf_w[i]
    return total


@njit(cache=True)
def _conj_all(y, idx, klen, a, b, M, status, persp):
    kmax = idx.shape[1]
    buf = np.empty(kmax)
    total = 0.0
    for j in range(idx.shape[0]):
        k = klen[j]
        for i in range(k):
            buf[i] = y[idx[j, i]]
        total += _conj_group(buf[:k], a[j], b[j], M[j], status[j], persp)
    return total


@njit(cache=True)
def _fista(Q, c, const, idx, klen, a, b, M, status, persp, x0, L, cutoff, rtol, max_iter, check_every,
           deadline):
    """FISTA on F from ``x0`` (``NodeRelaxation.solve``).  At every bound check it reads the
    clock (``time.perf_counter``, in object mode) once ``_CLOCK_WORK`` multiply-adds have passed
    since the last reading, and stops once ``deadline`` has passed: a few milliseconds of work
    between readings, whatever the size of Q."""
    n = c.shape[0]
    G = idx.shape[0]
    zs = np.full(G, 0.5)
    x = np.empty(n)
    h = _prox_all(x0, x, zs, 0.0, idx, klen, a, b, M, status, persp)
    y = x.copy()
    xn = np.empty(n)
    zn = zs.copy()
    t = 1.0
    step = 1.0 / L
    best_lb, best_val = -np.inf, np.inf
    best_x = x.copy()
    best_z = zs.copy()
    it = 0
    work = 0.0
    for it in range(1, max_iter + 1):
        work += n * n
        g = Q @ y + c
        hn = _prox_all(y - step * g, xn, zn, step, idx, klen, a, b, M, status, persp)
        if np.dot(y - xn, xn - x) > 0.0:  # gradient restart (O'Donoghue & Candes 2015)
            t = 1.0
            y[:] = xn
        else:
            tn = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
            y[:] = xn + ((t - 1.0) / tn) * (xn - x)
            t = tn
        x[:] = xn
        zs[:] = zn
        h = hn
        if it % check_every == 0 or it == max_iter:
            gx = Q @ x + c
            xg = np.dot(x, gx)
            f = 0.5 * xg + 0.5 * np.dot(c, x) + const
            val = f + h
            if val < best_val:
                best_val = val
                best_x[:] = x
                best_z[:] = zs
            lb = f - xg - _conj_all(-gx, idx, klen, a, b, M, status, persp)
            if lb > best_lb:
                best_lb = lb
            if best_lb >= cutoff:
                break
            if best_val - best_lb <= rtol * max(1.0, abs(best_val)):
                break
            if work >= _CLOCK_WORK:
                work = 0.0
                with objmode(now="float64"):
                    now = time.perf_counter()
                if now >= deadline:
                    break
    return best_lb, best_val, best_x, best_z, it


# ---- Python API --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RelaxResult:
    """Outcome of one node relaxation."""

    lower_bound: float   # valid lower bound on the node's relaxation (and so on its MIP)
    value: float         # F(w) at the returned point, closed form: upper estimate of the relaxation
    w: np.ndarray        # primal point (feasible for the node: box, out-groups zero)
    z: np.ndarray        # z paired with w by the prox (0/1 for out/in groups)
    iterations: int
    pruned: bool         # stopped because lower_bound >= cutoff


class NodeRelaxation:
    """Prox, conjugate and FISTA for the relaxations of one instance (built once, reused)."""

    def __init__(self, instance: Instance, bounds: str = "perspective"):
        if bounds not in BOUNDS:
            raise ValueError(f"bounds must be one of {BOUNDS}, got {bounds!r}")
        self.inst = instance
        self.bounds = bounds
        self.persp = bounds == "perspective"
        self.Q = np.ascontiguousarray(instance.Q)
        self.c = np.ascontiguousarray(instance.c)
        self.idx = np.ascontiguousarray(np.maximum(instance.index, 0))
        self.klen = np.array([len(g) for g in instance.groups], dtype=np.int64)
        self.a, self.b, self.M = (np.ascontiguousarray(x) for x in (instance.a, instance.b, instance.M))
        self.L = instance.lipschitz

    def _status(self, status):
        status = np.ascontiguousarray(status, dtype=np.int64)
        if status.shape != (self.inst.n_groups,) or not np.isin(status, (OUT, IN, FREE)).all():
            raise ValueError(f"status must hold one of 0 (out), 1 (in), 2 (free) per group, got {status}")
        return status

    def prox(self, v, tau, status):
        """argmin_w 1/(2 tau)||w - v||^2 + sum_j h_j(w_j) for a flat ``v``; returns (w, z, sum h)."""
        status = self._status(status)
        out = np.empty(self.inst.n)
        zs = np.full(self.inst.n_groups, 0.5)
        h = _prox_all(np.ascontiguousarray(v, dtype=float), out, zs, float(tau), self.idx, self.klen,
                      self.a, self.b, self.M, status, self.persp)
        return out, zs, h

    def conjugate(self, y, status):
        """sum_j h_j^*(y_j) (closed form)."""
        return _conj_all(np.ascontiguousarray(y, dtype=float), self.idx, self.klen, self.a, self.b,
                         self.M, self._status(status), self.persp)

    def closed_form_value(self, w, status):
        """F(w) = f(w) + sum_j h_j(w_j), free groups through the closed-form SPR (or big-M)."""
        status = self._status(status)
        wp = self.inst.padded(w)
        s = np.sum(wp * wp, axis=1)
        m = np.max(np.abs(wp), axis=1)
        if self.persp:
            free = spr(wp, self.a, self.b, self.M).value
        else:
            free = self.a * s + self.b * np.minimum(m / self.M, 1.0)
        h = np.where(status == IN, self.a * s + self.b, np.where(status == FREE, free, 0.0))
        bad = (m > self.M * (1 + 1e-12)) | ((status == OUT) & (m > 0))
        return float(self.inst.f(w) + np.where(bad, np.inf, h).sum())

    def lower_bound(self, w, status):
        """The linearisation bound (LB) at any ``w``."""
        g = self.Q @ w + self.c
        return self.inst.f(w) - float(g @ w) - self.conjugate(-g, status)

    def solve(self, status, w0=None, cutoff=np.inf, rtol=1e-9, max_iter=20000, check_every=5,
              deadline: Deadline | None = None):
        """FISTA with gradient restart from ``w0``; stops when the relative gap between value and
        best lower bound is below ``rtol``, the bound reaches ``cutoff``, or ``deadline`` passes
        (the bound returned is valid in every case, only weaker)."""
        status = self._status(status)
        x0 = np.zeros(self.inst.n) if w0 is None else np.ascontiguousarray(w0, dtype=float)
        end = np.inf if deadline is None else deadline.end
        lb, _, x, z, it = _fista(self.Q, self.c, self.inst.const, self.idx, self.klen, self.a, self.b,
                                 self.M, status, self.persp, x0, self.L, float(cutoff), float(rtol),
                                 int(max_iter), int(check_every), float(end))
        value = self.closed_form_value(x, status)
        return RelaxResult(float(lb), value, x, z, int(it), bool(lb >= cutoff))


def pr_bound_closed_form(instance: Instance, bounds: str = "perspective", rtol: float = 1e-10,
                         max_iter: int = 100000, time_limit: float | Deadline | None = None) -> RelaxResult:
    """The root relaxation: min_w f(w) + sum_j SPR_j(w_j) on the box (or the big-M penalty),
    i.e. the PR (big-M) relaxation with z projected out.  ``lower_bound`` is certified (also when
    ``time_limit``, seconds or a shared :class:`Deadline`, stops it early: it is then weaker);
    ``value`` is the closed form evaluated at the returned point."""
    return NodeRelaxation(instance, bounds).solve(np.full(instance.n_groups, FREE), rtol=rtol,
                                                   max_iter=max_iter, deadline=Deadline.of(time_limit))
