"""The two references the MILP is measured against: brute force (exact, small problems) and the
greedy knapsack heuristic (what pruning methods usually do); and the local search
(:func:`improve`) that turns greedy's choice into the MILP's starting incumbent.

Brute force evaluates value and cost on the whole grid of width combinations at once: the grid
arrays are sums of broadcast terms, v_f along axis f and V_ab, C_ab along axes (a, b), so the
memory is one float per combination.  Fixed families (one width) get no axis: their terms are
constants and their pairwise terms become unary terms of the partner.

Greedy (HALP-style, by marginal rate): start from every family's largest width; while the cost
exceeds the budget, among all single-family decreases k -> k' (any smaller width of one family,
the others held) that save cost, take the one with the smallest

    rate = (value lost) / (cost saved) = (g_f(k) - g_f(k')) / (h_f(k) - h_f(k'))

where g_f, h_f are family f's value and cost as functions of its own width with the other
families held (its unary terms plus its pairwise terms at the partners' current widths); ties
go to the larger saving.  It reports ``infeasible`` when no decrease saves cost and the budget
still does not hold, which can happen on problems the MILP solves.
"""

from __future__ import annotations

import time

import numpy as np

from .problem import SelectionProblem
from .result import SelectionResult

__all__ = ["brute_force", "greedy", "improve", "grid", "MAX_COMBINATIONS"]

MAX_COMBINATIONS = 1_000_000


def brute_force(problem: SelectionProblem, max_combinations: int = MAX_COMBINATIONS) -> SelectionResult:
    """The optimum by evaluating every combination of widths (status ``optimal`` or
    ``infeasible``, gap 0).  Refuses problems with more than ``max_combinations``."""
    n = problem.combinations
    if n > max_combinations:
        raise ValueError(f"brute force would enumerate {n} combinations, more than "
                         f"max_combinations={max_combinations}")
    t0 = time.perf_counter()
    value, cost, free = grid(problem)
    ok = cost <= problem.budget + problem.tol
    if not ok.any():
        return SelectionResult("infeasible", None, None, None, None, None, time.perf_counter() - t0)
    flat = int(np.argmax(np.where(ok, value, -np.inf)))
    pos = np.unravel_index(flat, value.shape) if value.ndim else ()
    choice = np.zeros(len(problem.families), dtype=np.int64)
    for f, k in zip(free, pos):
        choice[f] = k
    v, c = problem.evaluate(choice)
    return SelectionResult("optimal", problem.widths_of(choice), v, c, 0.0, v,
                           time.perf_counter() - t0)


def grid(problem: SelectionProblem) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``(value, cost, free)``: value and cost of every combination, one axis per family with
    more than one width (``free``, in family order)."""
    sizes = problem.sizes
    free = [f for f, k in enumerate(sizes) if k > 1]
    axis = {f: a for a, f in enumerate(free)}
    shape = tuple(sizes[f] for f in free)

    def place(arr, fams):
        """``arr`` (one dimension per family in ``fams``) broadcast over the grid."""
        arr = np.asarray(arr)[tuple(slice(None) if f in axis else 0 for f in fams)]
        out = [1] * len(free)
        for f in fams:
            if f in axis:
                out[axis[f]] = sizes[f]
        return arr.reshape(out)

    value = np.zeros(shape)
    cost = np.full(shape, problem.constant)
    for f, fam in enumerate(problem.families):
        value = value + place(fam.value, [f])
        cost = cost + place(problem.unary_cost[f], [f])
    for i, j, C, V in problem.pairs:
        value = value + place(V, [i, j])
        cost = cost + place(C, [i, j])
    return value, cost, free


def _own_terms(problem: SelectionProblem, f: int, choice, incident) -> tuple[np.ndarray, np.ndarray]:
    """g_f, h_f of the module docstring: family f's value and cost per width, others held."""
    g = problem.families[f].value.copy()
    h = problem.unary_cost[f].copy()
    for i, j, C, V in incident[f]:
        if i == f:
            g += V[:, choice[j]]
            h += C[:, choice[j]]
        else:
            g += V[choice[i], :]
            h += C[choice[i], :]
    return g, h


def _best_move(problem, f, choice, incident):
    """``(rate, -saving, k')`` of family f's best decrease, or None if none saves cost."""
    g, h = _own_terms(problem, f, choice, incident)
    w = problem.families[f].widths
    k = choice[f]
    saved = h[k] - h
    cand = np.flatnonzero((w < w[k]) & (saved > 0))
    if cand.size == 0:
        return None
    rate = (g[k] - g[cand]) / saved[cand]
    best = min(zip(rate.tolist(), (-saved[cand]).tolist(), cand.tolist()))
    return best


def greedy(problem: SelectionProblem) -> SelectionResult:
    """The greedy knapsack heuristic of the module docstring (status ``heuristic`` or
    ``infeasible``; ``gap`` and ``bound`` unknown)."""
    t0 = time.perf_counter()
    fams = problem.families
    choice = np.array([int(np.argmax(f.widths)) for f in fams], dtype=np.int64)
    incident = [[] for _ in fams]
    for p in problem.pairs:
        incident[p[0]].append(p)
        incident[p[1]].append(p)
    moves = [_best_move(problem, f, choice, incident) for f in range(len(fams))]
    value, cost = problem.evaluate(choice)
    while not problem.fits(cost):
        cands = [(m, f) for f, m in enumerate(moves) if m is not None]
        if not cands:
            return SelectionResult("infeasible", None, None, None, None, None,
                                   time.perf_counter() - t0)
        (_, _, k), f = min(cands)
        choice[f] = k
        # only f and its partners see their own terms change
        for g in {f, *(p[0] for p in incident[f]), *(p[1] for p in incident[f])}:
            moves[g] = _best_move(problem, g, choice, incident)
        value, cost = problem.evaluate(choice)
    return SelectionResult("heuristic", problem.widths_of(choice), value, cost, None, None,
                           time.perf_counter() - t0)


def improve(problem: SelectionProblem, choice, max_rounds: int = 100,
            max_pair_work: float = 2e7) -> np.ndarray:
    """Local search from a feasible ``choice``: repeatedly apply the best value-increasing move
    that keeps the budget, among every single-family change and every simultaneous change of
    two families not coupled by a pairwise term (their changes then add up exactly).  Pair
    moves are skipped when one round would look at more than ``max_pair_work`` pairs of widths.
    Used as the MILP's starting point."""
    choice = np.array(choice, dtype=np.int64)
    F, K = len(problem.families), max(problem.sizes)
    incident = [[] for _ in range(F)]
    coupled = np.eye(F, dtype=bool)
    for p in problem.pairs:
        incident[p[0]].append(p)
        incident[p[1]].append(p)
        coupled[p[0], p[1]] = coupled[p[1], p[0]] = True
    pair_moves = F * F * K * K / 2 <= max_pair_work
    value, cost = problem.evaluate(choice)
    for _ in range(max_rounds):
        slack = problem.budget + problem.tol - cost
        dv, dc = np.full((F, K), -np.inf), np.full((F, K), np.inf)  # padding never fits
        for f in range(F):
            g, h = _own_terms(problem, f, choice, incident)
            dv[f, :g.shape[0]], dc[f, :h.shape[0]] = g - g[choice[f]], h - h[choice[f]]
        gain = np.where(dc <= slack, dv, -np.inf)
        f, k = np.unravel_index(int(np.argmax(gain)), gain.shape)
        best, move = max(gain[f, k], 1e-12 * max(1.0, abs(value))), ((int(f), int(k)),)
        if gain[f, k] < best:
            move = None
        for f in range(F - 1) if pair_moves else ():
            others = np.flatnonzero(~coupled[f, f + 1:]) + f + 1
            if others.size == 0:
                continue
            gain = np.where(dc[f][None, :, None] + dc[others][:, None, :] <= slack,
                            dv[f][None, :, None] + dv[others][:, None, :], -np.inf)
            o, kf, kg = np.unravel_index(int(np.argmax(gain)), gain.shape)
            if gain[o, kf, kg] > best:
                best, move = gain[o, kf, kg], ((f, int(kf)), (int(others[o]), int(kg)))
        if move is None:
            break
        for f, k in move:
            choice[f] = k
        value, cost = problem.evaluate(choice)
    return choice
