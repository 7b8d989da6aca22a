"""How scores become masks: the order of removal, the masks of a prefix of that order, and the
two rules that choose the prefix (bisection on the training-accuracy drop, a MAC target).

Order: ascending score over all structures (``global``), or per layer (``per_layer``): filters
leave each family lowest score first, and the next one always comes from the family with the
smallest removed fraction after the removal (ties: family order) -- a uniform pruning ratio
over layers, one filter at a time.  A *cut* ``k`` removes the first ``k`` of the order; with a
global order only cuts between distinct scores are thresholds (``tau`` = score of the first
kept structure: "remove every structure with score < tau").  Families that compress requires
non-empty (every stream, the ResNet-50 stem family ``conv1``) keep their last-ordered channel,
so the removed sets of successive cuts are nested.

Rules: :func:`bisect_threshold` -- the largest candidate whose accuracy drop stays within the
tolerance, by bisection (assumes accuracy non-increasing in the threshold: ⌈log2 n⌉ + 1
evaluations); :func:`first_at_most` -- the first cut whose MACs are at most a target (MACs are
non-increasing along the order, so bisection is exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from nn.complexity import count_macs
from nn.evaluation import evaluate
from nn.models import Family, apply_masks, compress

__all__ = ["protected", "removal_order", "cut_points", "threshold_of", "prefix_masks",
           "bisect_largest", "bisect_threshold", "first_at_most", "select_by_scores",
           "summary", "percent"]


def protected(families: Sequence[Family]) -> set[str]:
    """Families that must keep at least one channel (compress forbids emptying them)."""
    return {f.name for f in families if f.kind == "stream" or f.name == "conv1"}


def removal_order(scores: dict[str, torch.Tensor], families: Sequence[Family],
                  per_layer: bool = False) -> list[tuple[str, int]]:
    """``(family, index)`` of every structure, first removed first (module docstring)."""
    fams = [f for f in families if f.name in scores]
    if not per_layer:
        rows = [(float(scores[f.name][j]), i, j) for i, f in enumerate(fams) for j in range(f.size)]
        return [(fams[i].name, j) for _, i, j in sorted(rows)]
    queues = {f.name: torch.argsort(scores[f.name], stable=True).tolist() for f in fams}
    removed = {f.name: 0 for f in fams}
    order = []
    for _ in range(sum(f.size for f in fams)):
        f = min((f for f in fams if removed[f.name] < f.size),
                key=lambda f: (removed[f.name] + 1) / f.size)
        order.append((f.name, queues[f.name][removed[f.name]]))
        removed[f.name] += 1
    return order


def cut_points(order: list[tuple[str, int]], scores: dict[str, torch.Tensor],
               per_layer: bool = False) -> list[int]:
    """Increasing cuts ``k`` (0 and ``len(order)`` included); with a global order only the
    thresholds: cuts between distinct scores."""
    if per_layer:
        return list(range(len(order) + 1))
    vals = [float(scores[n][j]) for n, j in order]
    return [0] + [k for k in range(1, len(vals)) if vals[k] > vals[k - 1]] + [len(vals)]


def threshold_of(order, scores, k: int) -> float | None:
    """``tau`` of cut ``k``: the score of the first kept structure (None when all go: any
    threshold above the largest score)."""
    return float(scores[order[k][0]][order[k][1]]) if k < len(order) else None


def prefix_masks(families: Sequence[Family], order: list[tuple[str, int]],
                 k: int) -> dict[str, torch.Tensor]:
    """Masks (True = keep) removing the first ``k`` structures of ``order``; a protected family
    that would be emptied keeps its last-ordered channel."""
    masks = {f.name: torch.ones(f.size, dtype=torch.bool) for f in families}
    for name, j in order[:k]:
        masks[name][j] = False
    last = {name: j for name, j in order}
    for name in protected(families):
        if name in masks and not masks[name].any():
            masks[name][last[name]] = True
    return masks


def bisect_largest(ok: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest ``i`` in ``[lo, hi]`` with ``ok(i)``, given ``ok(lo)`` (not evaluated) and
    ``ok`` monotone (True up to some index, False after).  Evaluates ``ok(hi)`` first, then
    halves: at most ⌈log2(hi - lo)⌉ + 1 calls."""
    if hi <= lo or ok(hi):
        return max(lo, hi)
    while hi - lo > 1:  # invariant: ok(lo), not ok(hi)
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def bisect_threshold(candidates: Sequence, accuracy: Callable, base: float,
                     tolerance: float) -> tuple[int, list[dict]]:
    """Index of the largest of the increasing ``candidates`` (thresholds or cuts) whose
    accuracy drop ``base - accuracy(c)`` is at most ``tolerance`` (same units as the
    accuracies), by bisection.  ``candidates[0]`` removes nothing and is taken as feasible
    without evaluation.  Returns the index and the trace of evaluations, in call order."""
    if not candidates:
        raise ValueError("candidates is empty")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    trace = []

    def ok(i):
        acc = float(accuracy(candidates[i]))
        trace.append({"candidate": candidates[i], "acc": acc, "drop": base - acc,
                      "ok": base - acc <= tolerance})
        return trace[-1]["ok"]

    return bisect_largest(ok, 0, len(candidates) - 1), trace


def first_at_most(candidates: Sequence, value: Callable, target: float
                  ) -> tuple[int, list[dict], bool]:
    """Index of the first of ``candidates`` with ``value(c) <= target`` for a non-increasing
    ``value`` (e.g. the MACs after a cut), the trace of evaluations, and whether the target was
    reached (else the last index)."""
    trace = []

    def above(i):
        v = value(candidates[i])
        trace.append({"candidate": candidates[i], "value": v, "ok": v <= target})
        return v > target

    if not above(0):
        return 0, trace, True
    i = bisect_largest(above, 0, len(candidates) - 1)
    if i == len(candidates) - 1:
        return i, trace, False
    return i + 1, trace, True


def select_by_scores(run, method, scores: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Masks and the selection record of a scored ``method`` on ``run``
    (:class:`nn.methods.Run`): the removal order of ``scores``, then bisection on the accuracy
    of the masked model over the calibration images (eval mode, unaugmented), or the first cut
    reaching the MAC target (MACs counted on the compressed model).  Every rank calls it (the
    evaluations are collective); the bisection shows its evaluations (:meth:`Run.progress`)."""
    cfg, model, fams = run.config.selection, run.model, run.pruned
    rule = cfg.rule if cfg.rule != "auto" else "budget" if cfg.budget else method.rule
    if rule == "budget":
        from nn.budget import select_to_budget

        return select_to_budget(run, method, scores)
    per_layer = method.per_layer
    order = removal_order(scores, fams, per_layer)
    cuts = cut_points(order, scores, per_layer)
    sel = {"rule": rule, "score": method.score_name(run),
           "order": "per-layer" if per_layer else "global", "structures": len(order),
           "candidates": len(cuts)}

    def macs(k):
        return count_macs(compress(model, prefix_masks(fams, order, k)), run.input_size)

    if rule == "bisection":
        sub = run.calibration()
        images = min(cfg.bisect_images, run.bundle.num_train)
        evals = 1 + (math.ceil(math.log2(len(cuts) - 1)) + 1 if len(cuts) > 1 else 0)
        with run.progress(evals, f"selection: bisection over {len(cuts)} cuts, at most {evals} "
                                 f"evaluations on {images} calibration images") as bar:
            def accuracy(k):
                acc = evaluate(apply_masks(model, prefix_masks(fams, order, k), run.structures),
                               sub, run.world)
                bar.set_postfix(removed=k, acc=f"{100 * acc:.2f}%")
                bar.update()
                return acc

            base = evaluate(model, sub, run.world)
            bar.update()
            i, trace = bisect_threshold(cuts, accuracy, base, cfg.tolerance / 100)
        pick = [t["acc"] for t in trace if t["candidate"] == cuts[i]]
        sel.update(tolerance_pp=cfg.tolerance, train_subset_images=images,
                   train_acc_unpruned=base, train_acc_pruned=pick[0] if pick else base)
    else:
        i, trace, reached = first_at_most(cuts, macs, cfg.mac_target * run.dense["macs"])
        prev = [t["value"] for t in trace if i and t["candidate"] == cuts[i - 1]]
        sel.update(mac_target=cfg.mac_target, target_reached=reached,
                   macs_previous_cut=prev[0] if prev else None)
    k = cuts[i]
    masks = prefix_masks(fams, order, k)
    for t in trace:
        t["tau"] = None if per_layer else threshold_of(order, scores, t["candidate"])
    sel.update(cut=k, tau=None if per_layer else threshold_of(order, scores, k), trace=trace,
               removed={n: int((~m).sum()) for n, m in masks.items()},
               macs_at_cut=macs(k))
    sel["summary"] = summary(sel)
    return masks, sel


def summary(sel: dict) -> str:
    """The one-line account of a scored selection record (the report's table prints it)."""
    if sel["rule"] == "bisection":
        return (f"bisection on {sel['train_subset_images']} training images, tolerance "
                f"{sel['tolerance_pp']} pp, score {sel['score']}: removed {sel['cut']} of "
                f"{sel['structures']} structures (tau {sel['tau']}); train acc "
                f"{percent(sel['train_acc_unpruned'])} -> {percent(sel['train_acc_pruned'])} in "
                f"{len(sel['trace'])} evaluations")
    return (f"MAC target {sel['mac_target']} of dense "
            f"({'reached' if sel['target_reached'] else 'NOT reached'}), score {sel['score']}, "
            f"{sel['order']} order: removed {sel['cut']} of {sel['structures']} structures")


def percent(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"
