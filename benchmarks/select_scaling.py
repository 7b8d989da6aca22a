"""Width selection under a budget: the exact MILP (HiGHS) vs greedy vs brute force, by size.

Random problems of growing size (``monotone``: costs and values increase with width, the case
greedy is built for; ``signed``: terms of either sign) and ResNet-shaped problems (CIFAR
ResNet-20/32/44/56, filter and stream families, block removal, pairwise block-stream MACs) at
several budgets.  For each: MILP seconds (model building included) and certified gap, greedy
seconds and relative value shortfall ``(MILP - greedy) / |MILP|``, brute force seconds where
it has at most ``--brute-max`` combinations, and for ResNet-56 the Pyomo statement of the same
MILP (the reference formulation).

    python -m benchmarks.select_scaling                     # full run (about 2 min on 2 cores)
    python -m benchmarks.select_scaling --families 4,8 --seeds 1 --resnet 3   # smoke
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks._common import (format_machine, machine_info, results_path, table, wait_for_load,
                                write_csv, write_json)

from mipprune.select import (brute_force, greedy, milp_arrays, random_selection,
                             resnet_selection, solve_selection, solve_selection_pyomo)

RESNET_DEPTH = {3: 20, 5: 32, 7: 44, 9: 56}


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="4,6,8,12,16,24,32,48,64", help="random problem sizes")
    p.add_argument("--max-widths", type=int, default=8, help="widths per random family: 1..this")
    p.add_argument("--kinds", default="monotone,signed")
    p.add_argument("--fractions", default="0.2,0.5,0.8", help="random budgets (cheapest..dearest)")
    p.add_argument("--seeds", type=int, default=3, help="problems per size and budget")
    p.add_argument("--resnet", default="3,5,7,9", help="blocks per stage n (ResNet-(6n+2))")
    p.add_argument("--resnet-budgets", default="0.15,0.3,0.5,0.7,0.9",
                   help="fractions of the unpruned cost")
    p.add_argument("--resnet-seeds", type=int, default=2)
    p.add_argument("--granularities", default="1,4,8", help="ResNet-56 width granularities")
    p.add_argument("--gap", type=float, default=1e-6)
    p.add_argument("--time-limit", type=float, default=60.0, help="per MILP solve, seconds")
    p.add_argument("--brute-max", type=int, default=1_000_000)
    p.add_argument("--wait-load", type=float, default=None,
                   help="first wait until the 1-minute load average is below this")
    p.add_argument("--out", default=None, help="result stem (default benchmarks/results/select_scaling)")
    return p.parse_args()


def measure(problem, args, base, pyomo=False):
    """One row per method on ``problem``; the greedy shortfall is against the MILP."""
    t0 = time.perf_counter()
    arrays = milp_arrays(problem)
    build = time.perf_counter() - t0
    m = solve_selection(problem, time_limit=args.time_limit, gap=args.gap)
    g = greedy(problem)
    size = dict(base, families=len(problem.families), widths=int(sum(problem.sizes)),
                pairs=len(problem.pairs), columns=arrays["ncol"], rows=arrays["nrow"],
                combinations=float(problem.combinations))
    rows = [dict(size, method="milp", status=m.status, seconds=m.seconds, build_seconds=build,
                 value=m.value, gap=m.gap)]
    short = None
    if m.found and g.found:
        short = (m.value - g.value) / max(abs(m.value), 1e-12)
    rows.append(dict(size, method="greedy", status=g.status, seconds=g.seconds, value=g.value,
                     shortfall=short, greedy_failed=bool(m.found and not g.found)))
    if problem.combinations <= args.brute_max:
        b = brute_force(problem, args.brute_max)
        diff = None if not (b.found and m.found) else (b.value - m.value) / max(abs(b.value), 1e-12)
        rows.append(dict(size, method="brute", status=b.status, seconds=b.seconds, value=b.value,
                         milp_below_optimum=diff))
    if pyomo:
        r = solve_selection_pyomo(problem, time_limit=args.time_limit, gap=args.gap)
        rows.append(dict(size, method="milp-pyomo", status=r.status, seconds=r.seconds,
                         value=r.value, gap=r.gap))
    return rows


def run(args):
    rows = []
    measure(random_selection(3, 3, seed=0), args, {})  # load HiGHS/Pyomo outside the timings
    for kind in args.kinds.split(","):
        for F in (int(x) for x in args.families.split(",")):
            for frac in (float(x) for x in args.fractions.split(",")):
                for seed in range(args.seeds):
                    p = random_selection(F, args.max_widths, seed=seed, budget_fraction=frac,
                                         monotone=kind == "monotone")
                    rows += measure(p, args, dict(suite=f"random-{kind}", size=F, budget=frac,
                                                  seed=seed))
            print(f"random-{kind} F={F}: " + summary_line(
                [r for r in rows if r["suite"] == f"random-{kind}" and r["size"] == F]), flush=True)
    shapes = [(n, 1) for n in (int(x) for x in args.resnet.split(","))]
    if 9 in dict(shapes):
        shapes += [(9, g) for g in (int(x) for x in args.granularities.split(",")) if g != 1]
    for n, g in shapes:
        for streams in ((True, False) if (n, g) == (9, 1) else (True,)):
            suite = f"resnet{RESNET_DEPTH.get(n, 6 * n + 2)}-g{g}" + ("" if streams else "-nostreams")
            for frac in (float(x) for x in args.resnet_budgets.split(",")):
                for seed in range(args.resnet_seeds):
                    p = resnet_selection(n, g, streams, frac, seed)
                    pyomo = (n, g) == (9, 1) and streams and seed == 0 and frac == 0.5
                    rows += measure(p, args, dict(suite=suite, size=n, budget=frac, seed=seed),
                                    pyomo=pyomo)
            print(f"{suite}: " + summary_line([r for r in rows if r["suite"] == suite]), flush=True)
    return rows


def summary_line(rows):
    milp = [r for r in rows if r["method"] == "milp"]
    gr = [r["shortfall"] for r in rows if r["method"] == "greedy" and r["shortfall"] is not None]
    return (f"MILP max {max(r['seconds'] for r in milp):.3f} s, "
            f"max gap {max((r['gap'] or 0.0) for r in milp):.1e}; greedy shortfall "
            f"median {np.median(gr) if gr else float('nan'):.2%} max {max(gr) if gr else float('nan'):.2%}")


def summarise(rows):
    out = []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        for size in dict.fromkeys(r["size"] for r in rows if r["suite"] == suite):
            sub = [r for r in rows if r["suite"] == suite and r["size"] == size]
            milp = [r for r in sub if r["method"] == "milp"]
            gr = [r for r in sub if r["method"] == "greedy"]
            br = [r for r in sub if r["method"] == "brute"]
            py = [r for r in sub if r["method"] == "milp-pyomo"]
            sh = [r["shortfall"] for r in gr if r["shortfall"] is not None]
            out.append({
                "suite": suite, "size": size, "problems": len(milp),
                "widths": int(np.median([r["widths"] for r in milp])),
                "columns": int(np.median([r["columns"] for r in milp])),
                "milp median s": float(np.median([r["seconds"] for r in milp])),
                "milp max s": float(max(r["seconds"] for r in milp)),
                "build max s": float(max(r["build_seconds"] for r in milp)),
                "max gap": float(max((r["gap"] or 0.0) for r in milp if r["status"] != "infeasible")
                                 if any(r["status"] != "infeasible" for r in milp) else 0.0),
                "not optimal": sum(r["status"] not in ("optimal", "infeasible") for r in milp),
                "infeasible": sum(r["status"] == "infeasible" for r in milp),
                "greedy median s": float(np.median([r["seconds"] for r in gr])),
                "shortfall median %": 100 * float(np.median(sh)) if sh else None,
                "shortfall max %": 100 * float(max(sh)) if sh else None,
                "greedy failed": sum(r["greedy_failed"] for r in gr),
                "brute median s": float(np.median([r["seconds"] for r in br])) if br else None,
                "milp below brute max": float(max(r["milp_below_optimum"] or 0.0 for r in br))
                if br else None,
                "pyomo s": py[0]["seconds"] if py else None,
            })
    return out


def main():
    args = parse()
    waited = wait_for_load(args.wait_load) if args.wait_load is not None else 0.0
    info = machine_info()
    print(format_machine(info), flush=True)
    t0 = time.perf_counter()
    rows = run(args)
    summary = summarise(rows)
    print()
    print(table(summary, [("suite", "suite", ""), ("size", "size", ""), ("problems", "n", ""),
                          ("widths", "widths", ""), ("columns", "cols", ""),
                          ("build max s", "build [s]", ".3f"),
                          ("milp median s", "MILP med [s]", ".3f"),
                          ("milp max s", "MILP max [s]", ".3f"), ("max gap", "max gap", ".1e"),
                          ("not optimal", "time-lim", ""), ("infeasible", "infeas", ""),
                          ("greedy median s", "greedy [s]", ".4f"),
                          ("shortfall median %", "short med %", ".3f"),
                          ("shortfall max %", "short max %", ".3f"),
                          ("greedy failed", "greedy fail", ""),
                          ("brute median s", "brute [s]", ".4f"),
                          ("milp below brute max", "MILP<brute", ".1e"),
                          ("pyomo s", "Pyomo [s]", ".2f")]))
    stem = results_path(args.out, "select_scaling")
    write_json(stem.with_suffix(".json"), {"config": vars(args), "machine": info, "rows": rows,
                                          "summary": summary, "waited_for_load_s": waited,
                                          "total_seconds": time.perf_counter() - t0})
    write_csv(stem.with_suffix(".csv"), rows)
    print(f"\nwrote {stem}.json/.csv")


if __name__ == "__main__":
    main()
