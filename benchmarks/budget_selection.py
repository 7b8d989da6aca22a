"""Budgeted selection on real hardware: does the selected network meet its latency budget when
measured, and does a MAC budget buy its share of latency?

For ResNet-56 (CIFAR shape, random initialisation: scores are the L1 norms of its filters, so
the numbers are about cost, not accuracy) on one device with ``--threads``, for each batch size
of ``--batches``:

* **latency budgets** (``--latency``): ``python -m nn train --budget latency=F --remove-blocks
  --granularity G``'s selection (:func:`nn.budget.select_to_budget`, with the latency table of
  that batch measured or read from the cache; ``--depth value``: at random initialisation
  there is no accuracy to search the depth on), the network compressed and BN-folded, then the
  dense and every selected network timed together (:func:`nn.latency.measure_networks`:
  interleaved rounds, medians, warm-up excluded).  Reported: measured latency / dense against
  the budget (goal: within 10%).
* **MAC budgets** (``--macs``): the same with ``--budget macs=F``, once as the plain MAC-target
  rule selects (filters only, every width: what the pipeline did before budgets) and once with
  ``--remove-blocks --granularity G``.  Reported: realised speed-up (dense / pruned latency)
  over the MAC reduction (dense / pruned MACs) -- goal at least 0.8.

    python -m benchmarks.budget_selection                  # ResNet-56, CPU, 2 threads
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks import _common
from nn import build_model, compress, count_macs, prunable_structures
from nn.budget import select_to_budget
from nn.config import RunConfig
from nn.latency import inference_form, measure_networks
from nn.methods import Run, Training, get_method
from nn.selection import cut_points, first_at_most, prefix_masks, removal_order


def _fractions(text):
    return [float(x) for x in text.split(",") if x.strip()]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency", type=_fractions, default=_fractions("0.7,0.5"))
    p.add_argument("--macs", type=_fractions, default=_fractions("0.5,0.3"))
    p.add_argument("--granularity", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _run(model, structures, batch, args, selection):
    cfg = RunConfig(model={"name": args.model}, method={"name": "l1-filter"},
                    selection=selection,
                    runtime={"threads": args.threads, "latency_batches": (batch,),
                             "device": "cpu", "progress": False})
    fams = [f for f in structures if f.kind == "filter"]
    return Run(cfg, model, (3, 32, 32), structures, fams,
               {"macs": count_macs(model, (3, 32, 32))}, None, 0, 1, torch.device("cpu"), 1)


def _mac_target(run, method, scores, fraction):
    """The pre-budget rule: the first cut of the global order at or below the MAC target."""
    order = removal_order(scores, run.pruned, method.per_layer)
    cuts = cut_points(order, scores, method.per_layer)
    i, _, _ = first_at_most(cuts, lambda k: count_macs(compress(run.model, prefix_masks(
        run.pruned, order, k)), run.input_size), fraction * run.dense["macs"])
    return prefix_masks(run.pruned, order, cuts[i])


def main(argv=None) -> int:
    args = parse(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = build_model(args.model).eval()
    structures = prunable_structures(model, (3, 32, 32))
    method = get_method("l1-filter")
    info = _common.machine_info("cpu")
    print(_common.format_machine(info), flush=True)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        plans = []  # (label, kind, budget, masks, selection record)
        for f in args.latency:
            run = _run(model, structures, batch, args, {
                "budget": f"latency={f}", "remove_blocks": True, "depth": "value",
                "granularity": args.granularity})
            scores = method.scores(run, Training(model))
            masks, rec = select_to_budget(run, method, scores)
            plans.append((f"latency={f}", "latency", f, masks, rec))
        for f in args.macs:
            run = _run(model, structures, batch, args, {"budget": f"macs={f}"})
            scores = method.scores(run, Training(model))
            plans.append((f"mac-target {f} (before)", "macs", f,
                          _mac_target(run, method, scores, f), None))
            run = _run(model, structures, batch, args, {
                "budget": f"macs={f}", "remove_blocks": True, "depth": "value",
                "granularity": args.granularity})
            masks, rec = select_to_budget(run, method, scores)
            plans.append((f"macs={f} blocks g{args.granularity}", "macs", f, masks, rec))
        nets = [inference_form(compress(model, {}))] + [
            inference_form(compress(model, m)) for _, _, _, m, _ in plans]
        t0 = time.perf_counter()
        ms, res = measure_networks(nets, (3, 32, 32), batch, "cpu", "float32", args.threads,
                                   args.repeats, 3, args.seed, progress=True)
        dense_macs = count_macs(model, (3, 32, 32))
        for (label, kind, f, masks, rec), t, net in zip(plans, ms[1:], nets[1:]):
            macs = count_macs(compress(model, masks), (3, 32, 32))
            ratio = t / ms[0]
            row = {"batch": batch, "selection": label, "budget": f, "dense_ms": ms[0],
                   "pruned_ms": t, "latency_ratio": ratio, "mac_ratio": macs / dense_macs,
                   "speedup": ms[0] / t, "speedup_over_mac_reduction":
                       (ms[0] / t) / (dense_macs / macs),
                   "predicted_ratio": None if rec is None or kind != "latency"
                   else rec["cost_predicted"] / rec["dense_cost"],
                   "within_10pct": abs(ratio / f - 1) <= 0.10 if kind == "latency" else None,
                   "blocks_removed": len(rec["blocks_removed"]) if rec else 0,
                   "milp_gap": rec["gap"] if rec else None}
            rows.append(row)
        print(f"batch {batch}: timed {len(nets)} networks in {time.perf_counter() - t0:.0f} s "
              f"({res['quiet_rounds']} of {res['rounds']} rounds quiet)", flush=True)
    print(_common.table(rows, [("batch", "batch", ""), ("selection", "selection", ""),
                               ("latency_ratio", "latency/dense", ".3f"),
                               ("predicted_ratio", "predicted", ".3f"),
                               ("mac_ratio", "MACs/dense", ".3f"),
                               ("speedup_over_mac_reduction", "speed-up/MAC red.", ".2f"),
                               ("blocks_removed", "blocks removed", "")]))
    stem = _common.results_path(args.out, "budget_selection_cpu")
    _common.write_json(stem.with_suffix(".json"), {
        "benchmark": "budget_selection", "command": "python -m benchmarks.budget_selection "
        + " ".join(sys.argv[1:] if argv is None else argv), "config": vars(args),
        "machine": info, "rows": rows})
    _common.write_csv(stem.with_suffix(".csv"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
