"""The depth of a budgeted selection, chosen on data: the exact selection (:mod:`nn.budget`)
once per number of removable blocks, the optimum most accurate on the calibration images
kept (``--depth search``)."""

from __future__ import annotations

import torch

from nn.budget import widths_to_masks

__all__ = ["depth_search"]


def _solve(sp):
    from mipprune.select import solve_selection

    return solve_selection(sp)


def depth_search(run, sp, families, scores: dict[str, torch.Tensor],
                 block_carriers: dict[str, str]) -> tuple[object, list[dict]]:
    """The exact selection at every depth, the depth chosen on data.

    The value model (summed scores) cannot say what a whole block is worth: scores of filters
    in different stages are not comparable, and a block's filters may be individually weak
    while the block matters.  So the blocks are ranked by the calibration accuracy of the
    network with that block alone removed (least harm first), the MILP is solved once per
    prefix of that ranking (only the first ``m`` blocks may go, ``m = 0 .. n``), and of the
    distinct feasible optima the one whose masked network is most accurate on the calibration
    images wins (ties: the larger value).  Returns the winner's result and the search's record
    (each block's accuracy alone removed, the ranking, one candidate per ``m``).  Its
    evaluations and solves show as a progress bar (:meth:`nn.methods.Run.progress`)."""
    from nn.evaluation import evaluate
    from nn.models import apply_masks

    if run.bundle is None:
        raise ValueError("the depth search evaluates candidates on calibration images and this "
                         "run has no data: use depth 'value'")
    sub = run.calibration()

    def accuracy(masks):
        return evaluate(apply_masks(run.model, masks, run.structures), sub, run.world)

    n = len(block_carriers)
    with run.progress(2 * n + 1, f"selection: depth search over {n} removable blocks (each "
                                 f"block's accuracy alone removed, then {n + 1} MILPs)") as bar:
        alone = {}
        for b in block_carriers:
            alone[b] = accuracy({b: torch.tensor([False])})
            bar.set_postfix(block=b, acc=f"{100 * alone[b]:.2f}%")
            bar.update()
        ranked = sorted(block_carriers, key=lambda b: -alone[b])
        nonzero = {c: [int(w) for w in sp.families[sp.index[c]].widths if w > 0]
                   for c in block_carriers.values()}
        trace, seen, best = [], {}, None
        for m in range(len(ranked) + 1):
            res = _solve(sp.restricted({block_carriers[b]: nonzero[block_carriers[b]]
                                        for b in ranked[m:]}))
            rec = {"removable": ranked[:m], "status": res.status, "value": res.value,
                   "cost": res.cost, "gap": res.gap}
            if res.widths is not None:
                key = tuple(sorted(res.widths.items()))
                if key not in seen:
                    seen[key] = accuracy(widths_to_masks(families, scores, res.widths,
                                                         block_carriers))
                rec.update(blocks_removed=sorted(b for b, c in block_carriers.items()
                                                 if res.widths[c] == 0),
                           calibration_acc=seen[key])
                if best is None or (seen[key], res.value) > (best[0], best[1].value):
                    best = (seen[key], res, m)
                bar.set_postfix(removable=m, acc=f"{100 * seen[key]:.2f}%")
            trace.append(rec)
            bar.update()
    if best is None:  # infeasible at every depth: the caller reports it
        return res, None
    return best[1], {"accuracy_without": alone, "ranked": ranked, "candidates": trace,
                     "chosen": best[2], "calibration_acc": best[0]}
