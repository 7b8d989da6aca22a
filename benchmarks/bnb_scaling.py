"""Exact solve time and node count vs number of groups, side by side in one run.

Methods: branch and bound with perspective node bounds, with big-M node bounds, brute-force
enumeration (while feasible), and SCIP through PySCIPOpt (the external peer; PR formulation
with rotated cones, on which SCIP applies perspective cuts itself, and the plain big-M MIQP).
Also the share of the big-M integrality gap that the PR root bound closes.

    python benchmarks/bnb_scaling.py                      # full run (about 15 min on 2 cores)
    python benchmarks/bnb_scaling.py --groups 4,8 --seeds 1 --scip-max-groups 8   # smoke
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks._common import (format_machine, machine_info, results_path, table, write_csv,
                                write_json, write_png)

from mipprune import random_instance
from mipprune.bnb import branch_and_bound
from mipprune.enumerate import enumerate_solve
from mipprune.relax import pr_bound_closed_form
from mipprune.scip import scip_available, scip_solve


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", default="4,8,12,16,20,24,30,35,40")
    p.add_argument("--group-size", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3, help="instances per size (seeds 0..S-1)")
    p.add_argument("--ridge", type=float, default=0.1)
    p.add_argument("--gap-tol", type=float, default=1e-6)
    p.add_argument("--time-limit", type=float, default=120.0, help="per solve, seconds")
    p.add_argument("--enumerate-max-groups", type=int, default=16)
    p.add_argument("--scip-max-groups", type=int, default=30)
    p.add_argument("--out", default=None, help="result stem (default benchmarks/results/bnb_scaling)")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON")
    return p.parse_args()


def run(args):
    sizes = [int(x) for x in args.groups.split(",")]
    have_scip = scip_available()
    # compile numba kernels outside the timings
    branch_and_bound(random_instance(4, args.group_size, 0, ridge=args.ridge))
    rows = []
    for G in sizes:
        for seed in range(args.seeds):
            inst = random_instance(G, args.group_size, seed, ridge=args.ridge)
            base = dict(groups=G, seed=seed, variables=inst.n)
            runs = {}
            for bounds in ("perspective", "bigm"):
                r = branch_and_bound(inst, bounds, args.gap_tol, args.time_limit)
                runs[f"bnb-{bounds}"] = dict(seconds=r.seconds, nodes=r.nodes, objective=r.objective,
                                             gap=r.gap, status=r.status, root_bound=r.root_bound)
            if G <= args.enumerate_max_groups:
                e = enumerate_solve(inst, max_groups=args.enumerate_max_groups)
                runs["enumerate"] = dict(seconds=e.seconds, nodes=e.patterns, objective=e.value,
                                         gap=0.0, status="optimal")
            if have_scip and G <= args.scip_max_groups:
                for form in ("pr", "bigm"):
                    s = scip_solve(inst, form, args.gap_tol, args.time_limit)
                    runs[f"scip-{form}"] = dict(seconds=s.seconds, nodes=s.nodes, objective=s.objective,
                                                gap=s.gap, status=s.status, wall_seconds=s.wall_seconds)
            best = min(v["objective"] for v in runs.values())
            pr_root = pr_bound_closed_form(inst).lower_bound
            bigm_root = pr_bound_closed_form(inst, "bigm").lower_bound
            closed = (pr_root - bigm_root) / (best - bigm_root) if best - bigm_root > 1e-9 else None
            for method, v in runs.items():
                rows.append(dict(base, method=method, **v, best_objective=best,
                                 rel_error=(v["objective"] - best) / max(abs(best), 1e-10),
                                 bigm_root=bigm_root, pr_root=pr_root, gap_closed=closed))
            print(f"G={G:>2} seed={seed}: " + "  ".join(
                f"{m} {v['seconds']:.2f}s/{v['nodes']}" for m, v in runs.items()), flush=True)
    return rows


def summarise(rows, sizes):
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for G in sizes:
        sub = [r for r in rows if r["groups"] == G]
        row = {"groups": G}
        for m in methods:
            rs = [r for r in sub if r["method"] == m]
            if rs:
                row[f"{m} s"] = float(np.median([r["seconds"] for r in rs]))
                row[f"{m} nodes"] = float(np.median([r["nodes"] for r in rs]))
        gc = [r["gap_closed"] for r in sub if r["method"] == "bnb-perspective" and r["gap_closed"] is not None]
        row["gap closed %"] = 100 * float(np.median(gc)) if gc else None
        p = [r["nodes"] for r in sub if r["method"] == "bnb-perspective"]
        b = [r["nodes"] for r in sub if r["method"] == "bnb-bigm"]
        row["node ratio"] = float(np.median(np.array(b) / np.array(p)))
        out.append(row)
    return methods, out


def targets(rows):
    def pick(G, m):
        return [r for r in rows if r["groups"] == G and r["method"] == m]

    res = {}
    p30 = pick(30, "bnb-perspective")
    if p30:
        res["30 groups solved to gap in < 30 s (max over seeds)"] = (
            max(r["seconds"] for r in p30), all(r["seconds"] < 30 and r["status"] == "optimal" for r in p30))
    p20, b20 = pick(20, "bnb-perspective"), pick(20, "bnb-bigm")
    if p20 and b20:
        ratios = [b["nodes"] / p["nodes"] for p, b in zip(p20, b20)]
        res[">= 3x fewer nodes than big-M at 20 groups (min over seeds)"] = (min(ratios), min(ratios) >= 3)
    s30 = pick(30, "scip-pr") or pick(30, "scip-bigm")
    if p30 and s30:
        fastest = {}
        for r in rows:
            if r["groups"] == 30 and r["method"].startswith("scip"):
                fastest[r["seed"]] = min(fastest.get(r["seed"], np.inf), r["seconds"])
        ratios = [fastest[p["seed"]] / p["seconds"] for p in p30]
        res["faster than SCIP at 30 groups (min speed-up over seeds)"] = (min(ratios), min(ratios) > 1)
    return res


def plot(rows, methods, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for m in methods:
        sizes = sorted({r["groups"] for r in rows if r["method"] == m})
        med = lambda key: [np.median([r[key] for r in rows if r["method"] == m and r["groups"] == G]) for G in sizes]  # noqa: E731
        axes[0].plot(sizes, med("seconds"), "o-", label=m, color=colors[m])
        if m != "enumerate":  # its "nodes" are patterns
            axes[1].plot(sizes, med("nodes"), "o-", label=m, color=colors[m])
    for ax, lab in zip(axes[:2], ("solve time [s] (median)", "nodes (median)")):
        ax.set_yscale("log")
        ax.set_xlabel("groups")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    gc = [(r["groups"], 100 * r["gap_closed"]) for r in rows
          if r["method"] == "bnb-perspective" and r["gap_closed"] is not None]
    axes[2].scatter(*zip(*gc), s=14)
    axes[2].set_xlabel("groups")
    axes[2].set_ylabel("% of big-M root gap closed by PR")
    axes[2].set_ylim(0, 105)
    axes[2].grid(alpha=0.3)
    fig.suptitle("Exact solves of (P): branch and bound vs enumeration vs SCIP")
    write_png(path, fig)


def main():
    args = parse()
    if args.replot:  # redraw the figure of an earlier run from its JSON (no re-measurement)
        import json

        stem = results_path(args.out, "bnb_scaling")
        data = json.loads(stem.with_suffix(".json").read_text())
        plot(data["rows"], list(dict.fromkeys(r["method"] for r in data["rows"])), stem.with_suffix(".png"))
        return
    info = machine_info()
    print(format_machine(info), flush=True)
    t0 = time.perf_counter()
    rows = run(args)
    sizes = [int(x) for x in args.groups.split(",")]
    methods, summary = summarise(rows, sizes)
    cols = [("groups", "G", "")]
    for m in methods:
        cols += [(f"{m} s", f"{m} [s]", ".3f"), (f"{m} nodes", "nodes", ".0f")]
    cols += [("node ratio", "bigM/PR nodes", ".1f"), ("gap closed %", "PR closes %", ".0f")]
    print()
    print(table(summary, cols))
    tg = targets(rows)
    print()
    for k, (v, ok) in tg.items():
        print(f"target: {k}: measured {v:.3g} -> {'met' if ok else 'MISSED'}")
    stem = results_path(args.out, "bnb_scaling")
    write_json(stem.with_suffix(".json"), {"config": vars(args), "machine": info, "rows": rows,
                                          "summary": summary,
                                          "targets": {k: {"measured": v, "met": ok} for k, (v, ok) in tg.items()},
                                          "total_seconds": time.perf_counter() - t0})
    write_csv(stem.with_suffix(".csv"), rows)
    plot(rows, methods, stem.with_suffix(".png"))
    print(f"\nwrote {stem}.json/.csv/.png")


if __name__ == "__main__":
    main()
