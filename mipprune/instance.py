"""A structured-pruning instance: the data of the MIP (P), validated and immutable.

One concept: the instance and everything that checks or derives from its data (validation,
objective, the Lipschitz constant, the seeded generators); the solvers live elsewhere.

    (P)  min  1/2 w^T Q w + c^T w + const + sum_j ( a_j ||w_j||^2 + b_j z_j )
         s.t. |w_i| <= M_j z_j   for i in group j,     z in {0,1}^G

Groups partition the variable indices ``0..n-1``.  ``const`` is an optional offset (least squares
keeps ``||Y||^2/(2n)`` there so objectives are the true loss); it is written to JSON only when
non-zero, so the JSON form is exactly ``{"Q", "c", "groups", "a", "b", "M"}`` otherwise.

Every number must be finite and of magnitude at most ``MAX_ABS = 1e15`` (HiGHS' largest matrix
value; beyond about 1e20 it reads costs and bounds as infinite).  Within it, the objective at
any point of the box ``|w_i| <= M_j`` stays far below the float range, so no solver overflows:
``c = 1e308`` or ``Q = 1e200 I`` are rejected here, naming the entry, not reported as
``-inf ... optimal`` later.  Booleans and strings are not numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Instance", "least_squares_instance", "random_instance"]

_PSD_TOL = 1e-9
MAX_ABS = 1e15  # largest magnitude of a number in an instance (module docstring)
_NUMBERS = (int, float, np.integer, np.floating)


def _bad_entry(x, at=()):
    """Index and value of the first entry of ``x`` (nested lists or arrays) that is not a
    number -- booleans and strings are not -- or None when every entry is one."""
    if isinstance(x, np.ndarray):
        return None if x.dtype.kind in "iuf" else (at, x)
    if isinstance(x, (list, tuple)):
        if all(issubclass(t, _NUMBERS) and not issubclass(t, (bool, np.bool_)) for t in set(map(type, x))):
            return None
        for i, v in enumerate(x):
            bad = _bad_entry(v, at + (i,))
            if bad is not None:
                return bad
        return None
    return None if isinstance(x, _NUMBERS) and not isinstance(x, (bool, np.bool_)) else (at, x)


def _array(name, x, ndim):
    """``x`` as a read-only float array of ``ndim`` dimensions; ``ValueError`` naming the first
    bad entry: not a number, not finite, or of magnitude above ``MAX_ABS``."""
    bad = _bad_entry(x)
    if bad is not None:
        at, v = bad
        if not at:
            raise ValueError(f"{name} must be numeric, got {x!r:.80}")
        raise ValueError(f"{name}[{', '.join(map(str, at))}] must be a number, got {v!r:.60}")
    try:
        arr = np.array(x, dtype=float)
    except OverflowError:
        raise ValueError(f"{name} has an integer too large for a float (the numbers of an "
                         f"instance must lie in [-{MAX_ABS:g}, {MAX_ABS:g}])") from None
    except (TypeError, ValueError) as exc:  # ragged nesting
        raise ValueError(f"{name} must be a {ndim}-dimensional array of numbers, got {x!r:.80}") from exc
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} has a non-finite entry {arr[idx]} at index {idx}")
    big = np.abs(arr) > MAX_ABS
    if big.any():
        idx = tuple(int(i) for i in np.argwhere(big)[0])
        raise ValueError(f"{name} has an entry {arr[idx]:g} at index {idx}: the numbers of an "
                         f"instance must lie in [-{MAX_ABS:g}, {MAX_ABS:g}]")
    arr.setflags(write=False)
    return arr


def _scalar(name, x, of: str = "an instance") -> float:
    """``x`` as a float: a number (not a boolean or a string), finite, of magnitude <= MAX_ABS
    (the messages say it is one of the numbers ``of``)."""
    if isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind in "iuf":
        x = x[()]
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, _NUMBERS):
        raise ValueError(f"{name} must be a number, got {x!r:.60}")
    try:
        x = float(x)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if abs(x) > MAX_ABS:
        raise ValueError(f"{name} = {x:g} is too large: the numbers of {of} must lie in "
                         f"[-{MAX_ABS:g}, {MAX_ABS:g}]")
    return x


def _check_psd(Q) -> None:
    """``ValueError`` unless Q is positive semidefinite up to ``_PSD_TOL * max(1, max|Q|)``:
    a Cholesky factorisation of ``Q + tol I`` (a third of an eigendecomposition's work) decides,
    the smallest eigenvalue is computed only to name it."""
    n = Q.shape[0]
    if not n:
        return
    tol = _PSD_TOL * max(1.0, float(np.abs(Q).max()))
    try:
        np.linalg.cholesky(Q + tol * np.eye(n))
        return
    except np.linalg.LinAlgError:
        pass
    lam = float(np.linalg.eigvalsh(Q).min())
    if lam < -tol:
        raise ValueError(f"Q must be positive semidefinite, smallest eigenvalue {lam:.3g}")


@dataclass(frozen=True, eq=False)
class Instance:
    """Data of (P).  Construction validates everything and raises ``ValueError`` naming the
    bad value; arrays are stored read-only."""

    Q: np.ndarray
    c: np.ndarray
    groups: tuple
    a: np.ndarray
    b: np.ndarray
    M: np.ndarray
    const: float = 0.0
    index: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        set_ = object.__setattr__
        Q = _array("Q", self.Q, 2)
        c = _array("c", self.c, 1)
        n = c.shape[0]
        if Q.shape != (n, n):
            raise ValueError(f"Q must have shape ({n}, {n}) to match c, got {Q.shape}")
        asym = np.abs(Q - Q.T).max() if n else 0.0
        if asym > 1e-9 * max(1.0, np.abs(Q).max()):
            raise ValueError(f"Q must be symmetric, max |Q - Q^T| = {asym:.3g}")
        Q = _array("Q", (Q + Q.T) / 2, 2)
        _check_psd(Q)
        groups = self._check_groups(self.groups, n)
        G = len(groups)
        vals = {}
        for name in ("a", "b", "M"):
            x = getattr(self, name)
            if np.ndim(x) == 0:  # one number for every group
                x = np.broadcast_to(_array(name, x, 0), (G,))
            arr = _array(name, x, 1)
            if arr.shape != (G,):
                raise ValueError(f"{name} must have one entry per group ({G}), got {arr.shape[0]}")
            vals[name] = arr
        for name in ("a", "b"):
            if (vals[name] < 0).any():
                j = int(np.argmin(vals[name]))
                raise ValueError(f"{name} must be >= 0, got {name}[{j}] = {vals[name][j]}")
        if (vals["M"] <= 0).any():
            j = int(np.argmin(vals["M"]))
            raise ValueError(f"M must be > 0, got M[{j}] = {vals['M'][j]}")
        const = _scalar("const", self.const)
        kmax = max(len(g) for g in groups) if groups else 0
        index = np.full((G, kmax), -1, dtype=np.int64)
        for j, g in enumerate(groups):
            index[j, : len(g)] = g
        index.setflags(write=False)
        set_(self, "Q", Q)
        set_(self, "c", c)
        set_(self, "groups", groups)
        set_(self, "const", const)
        set_(self, "index", index)
        for name, arr in vals.items():
            set_(self, name, arr)

    @staticmethod
    def _check_groups(groups, n):
        if isinstance(groups, (str, bytes)) or not hasattr(groups, "__iter__"):
            raise ValueError(f"groups must be lists of integer indices, got {groups!r:.80}")
        checked = []
        for j, g in enumerate(groups):
            if isinstance(g, (str, bytes)) or not hasattr(g, "__iter__"):
                raise ValueError(f"groups must be lists of integer indices, got group {j} = {g!r:.80}")
            bad = [i for i in g if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
            if bad:
                raise ValueError(f"group {j} has a non-integer index {bad[0]!r}")
            checked.append(tuple(int(i) for i in g))
        groups = tuple(checked)
        seen = np.zeros(n, dtype=int)
        for j, g in enumerate(groups):
            if not g:
                raise ValueError(f"group {j} is empty")
            for i in g:
                if not 0 <= i < n:
                    raise ValueError(f"group {j} has index {i}, outside 0..{n - 1}")
                seen[i] += 1
        if (seen > 1).any():
            raise ValueError(f"groups must partition the variables: index {int(np.argmax(seen > 1))} "
                             "is in more than one group")
        if (seen == 0).any():
            raise ValueError(f"groups must partition the variables: index {int(np.argmin(seen))} "
                             "is in no group")
        return groups

    @property
    def lipschitz(self) -> float:
        """The largest eigenvalue of Q (at least 1e-12): the Lipschitz constant of grad f.
        Exact (LAPACK) up to 500 variables, Lanczos beyond (a Ritz value, converged to machine
        precision); computed once."""
        cached = self.__dict__.get("_lipschitz")
        if cached is None:
            n = self.n
            if n <= 500:
                lam = float(np.linalg.eigvalsh(self.Q).max()) if n else 0.0
            else:
                from scipy.sparse.linalg import eigsh

                v0 = np.random.default_rng(0).standard_normal(n)  # deterministic start
                lam = float(eigsh(self.Q, k=1, which="LA", v0=v0, return_eigenvectors=False)[0])
            cached = max(lam, 1e-12)
            object.__setattr__(self, "_lipschitz", cached)
        return cached

    # ---- sizes and group views -------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.c.shape[0]

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def padded(self, w) -> np.ndarray:
        """``w`` as a ``(G, kmax)`` array of its groups, zero-padded (for the batched formulas)."""
        w = np.asarray(w, float)
        return np.where(self.index >= 0, w[np.maximum(self.index, 0)], 0.0)

    def group_of(self) -> np.ndarray:
        """Group number of every variable."""
        out = np.empty(self.n, dtype=np.int64)
        for j, g in enumerate(self.groups):
            out[list(g)] = j
        return out

    # ---- objective ---------------------------------------------------------------------------
    def f(self, w) -> float:
        """Smooth part  1/2 w^T Q w + c^T w + const."""
        w = np.asarray(w, float)
        return float(0.5 * w @ self.Q @ w + self.c @ w + self.const)

    def objective(self, w, z) -> float:
        """Objective of (P) at ``(w, z)`` (z may be fractional; no feasibility check)."""
        wp = self.padded(w)
        z = np.asarray(z, float)
        return self.f(w) + float(self.a @ np.sum(wp * wp, axis=1) + self.b @ z)

    def violation(self, w, z) -> float:
        """Largest violation of ``|w_i| <= M_j z_j`` (0 when feasible)."""
        m = np.max(np.abs(self.padded(w)), axis=1)
        return float(np.max(np.maximum(m - self.M * np.asarray(z, float), 0.0), initial=0.0))

    def with_b(self, b) -> "Instance":
        """A copy with another keep-cost vector (sweeps over ``b``)."""
        return Instance(self.Q, self.c, self.groups, self.a, b, self.M, self.const)

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"Q": self.Q.tolist(), "c": self.c.tolist(), "groups": [list(g) for g in self.groups],
             "a": self.a.tolist(), "b": self.b.tolist(), "M": self.M.tolist()}
        if self.const:
            d["const"] = self.const
        return d

    @classmethod
    def from_dict(cls, d) -> "Instance":
        if not isinstance(d, dict):
            raise ValueError(f"an instance must be a JSON object, got {type(d).__name__}")
        missing = [k for k in ("Q", "c", "groups", "a", "b", "M") if k not in d]
        if missing:
            raise ValueError(f"instance is missing key(s) {missing}")
        extra = sorted(set(d) - {"Q", "c", "groups", "a", "b", "M", "const"})
        if extra:
            raise ValueError(f"instance has unknown key(s) {extra}")
        return cls(d["Q"], d["c"], d["groups"], d["a"], d["b"], d["M"], d.get("const", 0.0))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path) -> "Instance":
        """The instance in JSON file ``path`` (``"-"``: standard input); every way of failing to
        read, parse or validate it is a one-line ``ValueError`` (:func:`jsonio.read_json`)."""
        from .jsonio import read_json

        return cls.from_dict(read_json(str(path), "instance file"))


_BYTES_PER_ENTRY = 128  # a dense n x n instance: Q and its copies while validated, then its JSON


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux: MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory(n: int, what: str) -> None:
    """``ValueError`` before allocating when a dense instance of ``n`` variables (its Q, the
    copies made while validating it, and its JSON text) cannot fit in the memory available."""
    need = _BYTES_PER_ENTRY * n * n
    avail = _available_memory()
    if avail is not None and need > avail:
        raise ValueError(f"{what} make {n} variables: a dense instance of that size needs about "
                         f"{need / 2**30:.3g} GiB, more than the {avail / 2**30:.3g} GiB of "
                         "memory available")


def least_squares_instance(X, Y, a, b, M, groups: str = "inputs") -> Instance:
    """Prune the input units (``groups="inputs"``: rows of W) or output units (``"outputs"``:
    columns of W) of one linear layer so that ``X W`` reconstructs ``Y``:

        f(W) = ||Y - X W||_F^2 / (2 n_samples)
             = 1/2 vec(W)^T (X^T X / n ⊗ I_k) vec(W) - vec(X^T Y / n)^T vec(W) + ||Y||^2 / (2n)

    with ``vec`` row-major (``w[i*k + o] = W[i, o]``).
    """
    X = _array("X", X, 2)
    Y = _array("Y", Y, 2)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must have the same number of rows, got {X.shape[0]} and {Y.shape[0]}")
    ns, p = X.shape
    k = Y.shape[1]
    Q = np.kron(X.T @ X / ns, np.eye(k))
    c = -(X.T @ Y / ns).ravel()
    const = float(np.sum(Y * Y) / (2 * ns))
    if groups == "inputs":
        gs = [list(range(i * k, (i + 1) * k)) for i in range(p)]
    elif groups == "outputs":
        gs = [list(range(o, p * k, k)) for o in range(k)]
    else:
        raise ValueError(f"groups must be 'inputs' or 'outputs', got {groups!r}")
    return Instance(Q, c, gs, a, b, M, const)


def random_instance(n_groups: int, group_size: int = 3, seed: int = 0,
                    kind: str = "least_squares", ridge: float = 0.1, rho: float = 0.5) -> Instance:
    """A seeded random instance with a non-trivial keep/drop decision.

    ``least_squares``: correlated Gaussian design with ``n_groups`` input units and
    ``group_size`` outputs, a planted W with about half of its rows zero, noisy targets;
    ``a_j = ridge * (X^T X / n)_jj`` (the ridge relative to the curvature of the loss: the
    perspective bound's advantage over big-M grows with it; ``ridge -> 0`` makes them equal),
    ``b`` scaled to the loss reduction one row brings, ``M = 2 max|W_ls|``, design correlation
    ``rho^|i-j|`` (higher is harder).
    ``quadratic``: a random positive definite Q with a planted sparse optimum, groups of
    ``group_size`` consecutive variables.
    """
    for name, val, lo in (("n_groups", n_groups, 1), ("group_size", group_size, 1)):
        if not isinstance(val, (int, np.integer)) or val < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {val!r}")
    if not (np.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if not (0 <= rho < 1):
        raise ValueError(f"rho must be in [0, 1), got {rho}")
    _check_memory(int(n_groups) * int(group_size), f"{n_groups} groups of {group_size}")
    rng = np.random.default_rng(seed)
    G, k = int(n_groups), int(group_size)
    if kind == "least_squares":
        ns = max(3 * G, 20)
        cov = rho ** np.abs(np.subtract.outer(np.arange(G), np.arange(G)))
        X = rng.standard_normal((ns, G)) @ np.linalg.cholesky(cov).T
        W = rng.standard_normal((G, k)) * (rng.random(G) < 0.5)[:, None]
        Y = X @ W + 0.5 * rng.standard_normal((ns, k))
        W_ls = np.linalg.lstsq(X, Y, rcond=None)[0]
        loss0 = np.sum(Y * Y) / (2 * ns)
        b = rng.uniform(0.5, 1.5, G) * 0.3 * loss0 / G
        a = ridge * np.sum(X * X, axis=0) / ns
        return least_squares_instance(X, Y, a, b, 2.0 * np.abs(W_ls).max(), "inputs")
    if kind == "quadratic":
        n = G * k
        A = rng.standard_normal((n, n))
        Q = A @ A.T / n + 0.1 * np.eye(n)
        w_star = rng.standard_normal(n) * np.repeat(rng.random(G) < 0.5, k)
        c = -Q @ w_star
        groups = [list(range(j * k, (j + 1) * k)) for j in range(G)]
        b = rng.uniform(0.05, 0.3, G)
        return Instance(Q, c, groups, rng.uniform(0.01, 0.1, G), b, 2.0 * np.abs(w_star).max() + 1.0)
    raise ValueError(f"kind must be 'least_squares' or 'quadratic', got {kind!r}")
