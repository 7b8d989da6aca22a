"""Seeded selection problems: small random ones (tests, brute force) and ResNet-shaped ones.

``random_selection`` draws families of 1..``max_widths`` widths with random values, unary
costs and pairwise cost *and* value terms (some on the same pair, some written (b, a)), of
either sign unless ``monotone``.  The budget sits at ``budget_fraction`` of the way from the
cheapest to the dearest combination's cost (both computed exactly by brute force when the
problem is small, else from unary minima and maxima), so a negative fraction makes it
infeasible and 0 makes it tight.

``resnet_selection`` mimics CIFAR ResNet-(6n+2) with option-A shortcuts: three stages of
``n`` basic blocks at 16/32/64 channels.  Each block's inner family (the output filters of its
first convolution) takes widths {g, 2g, ..., C} of granularity g, plus 0 (block removed) for
every block but each stage's first; with ``streams`` the three stage streams (the channels the
residual adds) are families too, widths {g, ..., C}.  Costs are MACs at the stage's spatial size
H x H (32, 16, 8), with per-layer noise standing in for a latency table:

    block (inner width k, stream width s):   9 H^2 (s k + k s)  -> a pairwise term (k, s)
                                             (unary 9 H^2 * 2 * C k when streams are fixed)
    stream s of stage t:                      the stem (27 H^2 s), the classifier (10 s)

and values are the sorted cumulative sums of random channel importances (value(0) = 0; a
stream's, which every block of its stage reads, times n).
"""

from __future__ import annotations

import numpy as np

from .baselines import MAX_COMBINATIONS, grid
from .problem import Family, Pairwise, SelectionProblem, Unary

__all__ = ["random_selection", "resnet_selection"]


def random_selection(n_families: int, max_widths: int = 4, seed: int = 0,
                     budget_fraction: float = 0.5, n_pairs: int | None = None,
                     monotone: bool = False) -> SelectionProblem:
    """A random problem with unary and pairwise cost and value terms (module docstring)."""
    if n_families < 1 or max_widths < 1:
        raise ValueError(f"n_families and max_widths must be >= 1, got {n_families}, {max_widths}")
    rng = np.random.default_rng(seed)
    fams, unary, pairwise = [], [], []
    for f in range(n_families):
        k = int(rng.integers(1, max_widths + 1))
        widths = np.sort(rng.choice(4 * max_widths, size=k, replace=False))
        value = np.cumsum(rng.uniform(0, 1, k)) if monotone else rng.normal(0, 1, k)
        fams.append(Family(f"f{f}", widths.tolist(), value))
        for _ in range(int(rng.integers(1, 3))):  # one or two unary terms on the family
            cost = np.cumsum(rng.uniform(0, 1, k)) if monotone else rng.normal(0, 1, k)
            unary.append(Unary(f"f{f}", cost))
    if n_families >= 2:
        n_pairs = int(rng.integers(1, n_families + 1)) if n_pairs is None else n_pairs
        for _ in range(n_pairs):
            a, b = rng.choice(n_families, size=2, replace=False)
            ka, kb = len(fams[a].widths), len(fams[b].widths)
            if monotone:
                cost = np.add.outer(np.arange(ka), np.arange(kb)) * rng.uniform(0, 0.3)
                value = np.zeros((ka, kb))
            else:
                cost, value = rng.normal(0, 1, (ka, kb)), rng.normal(0, 0.5, (ka, kb))
            which = rng.integers(3)  # cost only, value only, or both
            pairwise.append(Pairwise(f"f{a}", f"f{b}", None if which == 1 else cost,
                                     None if which == 0 else value))
    constant = float(rng.normal(0, 1))
    p = SelectionProblem(tuple(fams), 0.0, tuple(unary), tuple(pairwise), constant)
    lo, hi = _cost_range(p)
    return _with_budget(p, lo + budget_fraction * (hi - lo))


def resnet_selection(n: int = 9, granularity: int = 1, streams: bool = True,
                     budget_fraction: float = 0.5, seed: int = 0) -> SelectionProblem:
    """A ResNet-(6n+2)-shaped problem (module docstring); ``n=9`` is ResNet-56.  The budget is
    ``budget_fraction`` of the unpruned network's cost."""
    if n < 1 or granularity < 1:
        raise ValueError(f"n and granularity must be >= 1, got {n}, {granularity}")
    rng = np.random.default_rng(seed)
    fams, unary, pairwise = [], [], []
    full = 0.0
    for t, (C, H) in enumerate(((16, 32), (32, 16), (64, 8))):
        if C % granularity:
            raise ValueError(f"granularity {granularity} does not divide the stage width {C}")
        steps = np.arange(granularity, C + 1, granularity)
        stream = f"stage{t + 1}"
        if streams:
            imp = np.cumsum(np.sort(rng.exponential(1.0, C))[::-1])[steps - 1] * n
            fams.append(Family(stream, steps.tolist(), imp))
            ucost = (27 * H * H if t == 0 else 0) * steps + (10 * steps if t == 2 else 0)
            unary.append(Unary(stream, ucost * rng.uniform(0.9, 1.1)))
        for b in range(n):
            removable = b > 0
            widths = ([0] if removable else []) + steps.tolist()
            ks = np.array(widths)
            imp = np.concatenate([[0.0], np.cumsum(np.sort(rng.exponential(1.0, C))[::-1])])[ks]
            name = f"stage{t + 1}.block{b}"
            fams.append(Family(name, widths, imp))
            noise = rng.uniform(0.8, 1.2)
            if streams:
                macs = 9 * H * H * 2 * np.outer(ks, steps) * noise
                pairwise.append(Pairwise(name, stream, cost=macs))
            else:
                unary.append(Unary(name, 9 * H * H * 2 * C * ks * noise))
            full += 9 * H * H * 2 * C * C * noise
    p = SelectionProblem(tuple(fams), 0.0, tuple(unary), tuple(pairwise))
    top = p.evaluate([len(f.widths) - 1 for f in p.families])[1]
    return _with_budget(p, budget_fraction * top)


def _with_budget(p: SelectionProblem, budget: float) -> SelectionProblem:
    return SelectionProblem(p.families, float(budget), p.unary, p.pairwise, p.constant)


def _cost_range(p: SelectionProblem) -> tuple[float, float]:
    """Cheapest and dearest cost: exact (every combination) on problems brute force accepts,
    from unary minima and maxima otherwise."""
    if p.combinations <= MAX_COMBINATIONS:
        cost = grid(p)[1]
        return float(cost.min()), float(cost.max())
    lo = p.constant + sum(float(u.min()) for u in p.unary_cost)
    hi = p.constant + sum(float(u.max()) for u in p.unary_cost)
    return lo, hi
