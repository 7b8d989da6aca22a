"""The data of width selection under a budget, validated and immutable.

Families f = 1..F each take exactly one width from their own list W_f (a removable block is a
family with widths {0, 1}; a family with one width is fixed).  With k_f the index of the
chosen width:

    value(k) = sum_f v_f[k_f] + sum_{(a,b)} V_ab[k_a, k_b]
    cost(k)  = constant + sum_f u_f[k_f] + sum_{(a,b)} C_ab[k_a, k_b]
    maximise value(k)  subject to  cost(k) <= budget

u_f is the sum of every unary term that names f; C_ab and V_ab are the sums of every pairwise
term on the pair {a, b} (a term written as (b, a) enters transposed).  Widths need not be sorted;
they must be distinct non-negative integers.

Values, costs, the budget and the constant must be finite with magnitude at most
``instance.MAX_ABS`` (1e15), so that no sum of them overflows and HiGHS, which reads costs
beyond about 1e20 as infinite, sees them as they are.

Feasibility allows round-off only: ``cost <= budget + tol`` with ``tol = 1e-9 * scale`` and
``scale = max(|budget|, |constant| + sum_f max|u_f| + sum_ab max|C_ab|)`` (the largest cost any
choice can reach), so the exact MILP, brute force and greedy agree on which choices fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from ..instance import MAX_ABS, _scalar

__all__ = ["Family", "Unary", "Pairwise", "SelectionProblem", "FEAS_RTOL"]

FEAS_RTOL = 1e-9  # cost <= budget + FEAS_RTOL * scale (round-off only; see the module docstring)


def _number(where, x) -> float:
    return _scalar(where, x, "a problem")


def _floats(where, x, ndim) -> np.ndarray:
    """A read-only finite float array of ``ndim`` dimensions (booleans and strings rejected)."""
    arr = np.asarray(x, dtype=object) if not isinstance(x, np.ndarray) else x
    if arr.dtype == object:
        if arr.ndim != ndim:  # ragged lists become 1-d object arrays
            raise ValueError(f"{where} must be a {ndim}-dimensional array of numbers, "
                             f"got {x!r:.80}")
        for idx, v in np.ndenumerate(arr):
            _number(f"{where}{list(idx)}", v)
    elif arr.dtype.kind not in "iuf":
        raise ValueError(f"{where} must be numbers, got dtype {arr.dtype}")
    arr = np.array(arr, dtype=float)
    if arr.ndim != ndim:
        raise ValueError(f"{where} must be {ndim}-dimensional, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = [int(i) for i in np.argwhere(bad)[0]]
        raise ValueError(f"{where}{idx} must be finite, got {arr[tuple(idx)]}")
    big = np.abs(arr) > MAX_ABS
    if big.any():
        idx = [int(i) for i in np.argwhere(big)[0]]
        raise ValueError(f"{where}{idx} = {arr[tuple(idx)]:g} is too large: the numbers of a "
                         f"problem must lie in [-{MAX_ABS:g}, {MAX_ABS:g}]")
    arr.setflags(write=False)
    return arr


def _name(where, x) -> str:
    if not isinstance(x, str) or not x:
        raise ValueError(f"{where} must be a non-empty string, got {x!r:.80}")
    return x


@dataclass(frozen=True, eq=False)
class Family:
    """One prunable family: its candidate widths and the value (importance kept) of each."""

    name: str
    widths: np.ndarray
    value: np.ndarray

    def __post_init__(self):
        name = _name("family name", self.name)
        ws = list(self.widths) if hasattr(self.widths, "__iter__") and not isinstance(
            self.widths, (str, bytes, dict)) else None
        if ws is None:
            raise ValueError(f"family {name!r}: widths must be a list of integers, got {self.widths!r:.80}")
        if not ws:
            raise ValueError(f"family {name!r}: widths is empty")
        for w in ws:
            if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or not 0 <= w < 2**62:
                raise ValueError(f"family {name!r}: widths must be integers in [0, 2**62), "
                                 f"got {w!r:.80}")
        widths = np.array(ws, dtype=np.int64)
        uniq, counts = np.unique(widths, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"family {name!r}: width {int(uniq[counts > 1][0])} appears more than once")
        value = _floats(f"family {name!r}: value", self.value, 1)
        if value.shape[0] != widths.shape[0]:
            raise ValueError(f"family {name!r}: value has {value.shape[0]} entries, "
                             f"widths has {widths.shape[0]}")
        widths.setflags(write=False)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "value", value)


@dataclass(frozen=True, eq=False)
class Unary:
    """A cost that depends on one family's width: ``cost[k]`` at its k-th width."""

    family: str
    cost: np.ndarray

    def __post_init__(self):
        fam = _name("unary family", self.family)
        object.__setattr__(self, "family", fam)
        object.__setattr__(self, "cost", _floats(f"unary term on {fam!r}: cost", self.cost, 1))


@dataclass(frozen=True, eq=False)
class Pairwise:
    """A cost and/or value that depends on two coupled families: ``[k_a, k_b]``."""

    a: str
    b: str
    cost: np.ndarray | None = None
    value: np.ndarray | None = None

    def __post_init__(self):
        a, b = _name("pairwise a", self.a), _name("pairwise b", self.b)
        if a == b:
            raise ValueError(f"pairwise term couples family {a!r} with itself")
        if self.cost is None and self.value is None:
            raise ValueError(f"pairwise term ({a!r}, {b!r}) has neither cost nor value")
        what = f"pairwise term ({a!r}, {b!r})"
        cost = None if self.cost is None else _floats(f"{what}: cost", self.cost, 2)
        value = None if self.value is None else _floats(f"{what}: value", self.value, 2)
        if cost is not None and value is not None and cost.shape != value.shape:
            raise ValueError(f"{what}: cost has shape {cost.shape}, value {value.shape}")
        for k, v in (("a", a), ("b", b), ("cost", cost), ("value", value)):
            object.__setattr__(self, k, v)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.cost if self.cost is not None else self.value).shape


@dataclass(frozen=True, eq=False)
class SelectionProblem:
    """Choose one width per family maximising value subject to cost <= budget (module docstring).

    Construction validates everything (a ``ValueError`` names the bad entry) and merges the
    terms: ``unary_cost[f]`` is u_f, ``pairs`` holds one ``(i, j, C, V)`` per coupled pair with
    ``i < j`` (family indices) and full (K_i, K_j) arrays (zeros where no term gave one);
    ``cost_scale`` and ``tol`` are the scale and the round-off tolerance of the module docstring.
    """

    families: tuple
    budget: float
    unary: tuple = ()
    pairwise: tuple = ()
    constant: float = 0.0
    index: MappingProxyType = field(init=False, repr=False)
    unary_cost: tuple = field(init=False, repr=False)
    pairs: tuple = field(init=False, repr=False)
    cost_scale: float = field(init=False, repr=False)
    tol: float = field(init=False, repr=False)

    def __post_init__(self):
        set_ = object.__setattr__
        fams, un, pw = (tuple(getattr(self, k)) for k in ("families", "unary", "pairwise"))
        for kind, items, cls in (("families", fams, Family), ("unary", un, Unary),
                                 ("pairwise", pw, Pairwise)):
            for i, t in enumerate(items):
                if not isinstance(t, cls):
                    raise ValueError(f"{kind}[{i}] must be a {cls.__name__}, got {type(t).__name__}")
        if not fams:
            raise ValueError("families is empty: there is nothing to select")
        index = {}
        for i, f in enumerate(fams):
            if f.name in index:
                raise ValueError(f"duplicate family name {f.name!r}")
            index[f.name] = i
        sizes = [f.widths.shape[0] for f in fams]

        def lookup(where, name):
            if name not in index:
                raise ValueError(f"{where} names unknown family {name!r}")
            return index[name]

        ucost = [np.zeros(k) for k in sizes]
        for t, u in enumerate(un):
            i = lookup(f"unary[{t}]", u.family)
            if u.cost.shape[0] != sizes[i]:
                raise ValueError(f"unary[{t}]: cost has {u.cost.shape[0]} entries, family "
                                 f"{u.family!r} has {sizes[i]} widths")
            ucost[i] = ucost[i] + u.cost
        merged = {}
        for t, p in enumerate(pw):
            i, j = lookup(f"pairwise[{t}] a", p.a), lookup(f"pairwise[{t}] b", p.b)
            if p.shape != (sizes[i], sizes[j]):
                raise ValueError(f"pairwise[{t}]: arrays have shape {p.shape}, families "
                                 f"({p.a!r}, {p.b!r}) have {sizes[i]} x {sizes[j]} widths")
            C = np.zeros(p.shape) if p.cost is None else p.cost
            V = np.zeros(p.shape) if p.value is None else p.value
            if i > j:
                i, j, C, V = j, i, C.T, V.T
            C0, V0 = merged.get((i, j), (0.0, 0.0))
            merged[(i, j)] = (C0 + C, V0 + V)
        pairs = []
        for (i, j), (C, V) in sorted(merged.items()):
            C, V = np.array(C, dtype=float), np.array(V, dtype=float)
            C.setflags(write=False)
            V.setflags(write=False)
            pairs.append((i, j, C, V))
        for u in ucost:
            u.setflags(write=False)
        budget = _number("budget", self.budget)
        constant = _number("constant", self.constant)
        scale = max(abs(budget), abs(constant) + sum(float(np.abs(u).max()) for u in ucost)
                    + sum(float(np.abs(C).max()) for _, _, C, _ in pairs))
        for k, v in (("families", fams), ("unary", un), ("pairwise", pw), ("budget", budget),
                     ("constant", constant), ("index", MappingProxyType(index)),
                     ("unary_cost", tuple(ucost)), ("pairs", tuple(pairs)),
                     ("cost_scale", scale), ("tol", FEAS_RTOL * scale)):
            set_(self, k, v)

    # ---- sizes and evaluation ----------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.families)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(f.widths.shape[0] for f in self.families)

    @property
    def combinations(self) -> int:
        return math.prod(self.sizes)

    def evaluate(self, choice) -> tuple[float, float]:
        """``(value, cost)`` of width indices ``choice`` (one index per family), in numpy."""
        k = np.asarray(choice, dtype=np.int64)
        value = sum(float(f.value[k[i]]) for i, f in enumerate(self.families))
        cost = self.constant + sum(float(u[k[i]]) for i, u in enumerate(self.unary_cost))
        for i, j, C, V in self.pairs:
            value += float(V[k[i], k[j]])
            cost += float(C[k[i], k[j]])
        return value, cost

    def fits(self, cost: float) -> bool:
        """``cost <= budget`` up to round-off (``tol``, module docstring)."""
        return cost <= self.budget + self.tol

    def widths_of(self, choice) -> dict[str, int]:
        return {f.name: int(f.widths[k]) for f, k in zip(self.families, choice)}

    def choice_of(self, widths: dict) -> np.ndarray:
        """Width indices of a ``{name: width}`` mapping (every family, known widths only)."""
        missing = [n for n in self.names if n not in widths]
        if missing:
            raise ValueError(f"widths lack family {missing[0]!r}")
        out = []
        for f in self.families:
            hit = np.flatnonzero(f.widths == widths[f.name])
            if hit.size == 0:
                raise ValueError(f"family {f.name!r} has no width {widths[f.name]!r}")
            out.append(int(hit[0]))
        return np.array(out, dtype=np.int64)

    def restricted(self, allowed: dict) -> "SelectionProblem":
        """The same problem with family ``name`` limited to the widths ``allowed[name]`` (an
        iterable of its widths, at least one); every term follows.  Families not named keep
        all their widths.  ``ValueError`` for an unknown family or width, or an empty set."""
        keep = {}
        for name, widths in allowed.items():
            if name not in self.index:
                raise ValueError(f"restricted: unknown family {name!r}")
            f, ws = self.families[self.index[name]], sorted(set(widths))
            bad = [w for w in ws if w not in set(f.widths.tolist())]
            if bad or not ws:
                raise ValueError(f"restricted: family {name!r} has widths {f.widths.tolist()}, "
                                 f"got {sorted(set(widths))}")
            keep[name] = np.flatnonzero(np.isin(f.widths, ws))

        def rows(name):
            return keep.get(name, slice(None))

        fams = tuple(Family(f.name, f.widths[rows(f.name)], f.value[rows(f.name)])
                     for f in self.families)
        un = tuple(Unary(u.family, u.cost[rows(u.family)]) for u in self.unary)
        pw = tuple(Pairwise(p.a, p.b, *(None if m is None else m[rows(p.a)][:, rows(p.b)]
                                        for m in (p.cost, p.value)))
                   for p in self.pairwise)
        return SelectionProblem(fams, self.budget, un, pw, self.constant)

    # ---- JSON ---------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, d) -> "SelectionProblem":
        """From ``{"families": [{"name", "widths", "value"}], "unary": [{"family", "cost"}],
        "pairwise": [{"a", "b", "cost"?, "value"?}], "constant"?, "budget"}``."""
        obj = _keys("the problem", d, ("families", "budget"), ("unary", "pairwise", "constant"))
        fams = [Family(**_keys(f"families[{i}]", f, ("name", "widths", "value")))
                for i, f in enumerate(_list("families", obj["families"]))]
        un = [Unary(**_keys(f"unary[{i}]", u, ("family", "cost")))
              for i, u in enumerate(_list("unary", obj.get("unary", [])))]
        pw = [Pairwise(**_keys(f"pairwise[{i}]", p, ("a", "b"), ("cost", "value")))
              for i, p in enumerate(_list("pairwise", obj.get("pairwise", [])))]
        return cls(tuple(fams), obj["budget"], tuple(un), tuple(pw), obj.get("constant", 0.0))

    def to_json(self) -> dict:
        pw = []
        for p in self.pairwise:
            d = {"a": p.a, "b": p.b}
            for k in ("cost", "value"):
                if getattr(p, k) is not None:
                    d[k] = getattr(p, k).tolist()
            pw.append(d)
        return {"families": [{"name": f.name, "widths": f.widths.tolist(), "value": f.value.tolist()}
                             for f in self.families],
                "unary": [{"family": u.family, "cost": u.cost.tolist()} for u in self.unary],
                "pairwise": pw, "constant": self.constant, "budget": self.budget}


def _list(where, x) -> list:
    if not isinstance(x, (list, tuple)):
        raise ValueError(f"{where} must be a list, got {type(x).__name__}")
    return list(x)


def _keys(where, d, required, optional=()) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{where} is missing key(s) {missing}")
    extra = sorted(set(d) - set(required) - set(optional))
    if extra:
        raise ValueError(f"{where} has unknown key(s) {extra}")
    return d
