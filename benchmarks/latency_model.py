"""Accuracy of the latency cost model: predicted vs measured latency of random pruned networks.

For each batch size (``--batches``, default 1 and 64), on one device with ``--threads``:

1. measure the dense model's latency table (:func:`nn.latency.measure_table`: every unit of
   the inference form at every candidate width, multiples of ``--granularity``);
2. draw ``--fit-networks`` networks to fit its scale and constant on
   (:func:`nn.latency.fit_configs`: dense + random, seed ``--seed + 1``) and ``--networks``
   *other* random pruned networks to compare (seed ``--seed + 2``), in four kinds
   taken in turn: ``filters`` (random filter widths, streams dense), ``widths`` (every family
   random), ``blocks`` (dense widths, each removable block removed with a probability drawn in
   [0.2, 0.6]) and ``all`` (both); each is compressed (:func:`nn.compress`), BN-folded
   (:func:`nn.latency.inference_form`) and all are timed whole together
   (:func:`nn.latency.measure_networks`: interleaved, shuffled rounds, median over quiet
   rounds, warm-up excluded); then the table is timed again: a batch is measured again (up to
   ``--attempts``) when other processes disturbed it or the dense sum moved by more than
   ``--max-drift`` (this kind of virtual machine changes speed by up to 1.7x from one minute
   to the next);
3. fit the scale and constant on the fit networks (:func:`nn.latency.fit_table`) and compare
   each other network with :func:`nn.latency.predict`: relative error ``predicted / measured
   - 1``.

Reported per batch: median and max absolute error of the model as fitted (``scale x sum +
constant``), of the constant alone (scale 1, constant refitted on the same fit networks), of
the raw sum, and -- the baseline a latency table must beat -- of MACs (``a x MACs + c`` fitted
on the same fit networks).  Goal: median absolute error <= 10%.

    python -m benchmarks.latency_model                        # ResNet-56, CPU, 2 threads
    python -m benchmarks.latency_model --allocator as-is      # glibc's defaults kept
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from benchmarks import _common
from nn import build_model, compress, count_macs
from nn.latency import (fit_configs, fit_line, fit_table, inference_form, layer_families,
                        measure_networks, measure_table, network_layers, predict, random_config,
                        width_masks)

KINDS = ("filters", "widths", "blocks", "all")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--shortcut", choices=("A", "B"), default=None)
    p.add_argument("--input", default="3,32,32", help="C,H,W")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--granularity", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per table point")
    p.add_argument("--net-repeats", type=int, default=20, help="timed calls per network")
    p.add_argument("--fit-networks", type=int, default=8)
    p.add_argument("--networks", type=int, default=24, help="networks compared (>= 20)")
    p.add_argument("--allocator", choices=("steady", "as-is"), default="steady")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-load", type=float, default=None, metavar="L",
                   help="before each batch wait (up to 15 min) until the 1-min load average is "
                   "below L")
    p.add_argument("--attempts", type=int, default=3, help="measure a batch again (after "
                   "waiting, with --wait-load) while other processes disturbed it or the "
                   "machine drifted")
    p.add_argument("--max-drift", type=float, default=0.05, help="largest change of the "
                   "dense sum between the tables timed before and after the networks")
    p.add_argument("--out", default=None, help="output stem (default: benchmarks/results/"
                   "latency_model_<device>[_asis])")
    return p.parse_args(argv)


def draw(layers, n: int, granularity: int, seed: int) -> list[tuple[str, dict, dict]]:
    """``n`` random pruned networks ``(kind, widths, blocks_kept)``, kinds in turn."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        drop = rng.uniform(0.2, 0.6) if kind in ("blocks", "all") else 0.0
        widths, kept = random_config(layers, granularity, rng, drop,
                                     streams=kind in ("widths", "all"))
        out.append((kind, {} if kind == "blocks" else widths, kept))
    return out


def _errors(pred, meas):
    e = [p / m - 1 for p, m in zip(pred, meas)]
    a = [abs(x) for x in e]
    return {"median_abs": statistics.median(a), "max_abs": max(a), "mean": statistics.fmean(e)}


def run_batch(args, model, size, layers, batch):
    """Table, then fit and compared networks timed together (interleaved), then the table
    again: how far the machine drifted while timing (``drift``: dense sum after / before)."""
    steady = args.allocator == "steady"
    g = args.granularity
    t0 = time.perf_counter()
    table = measure_table(model, size, batch, args.device, args.dtype, args.threads, g,
                          args.repeats, seed=args.seed, steady=steady)
    table_s = time.perf_counter() - t0
    fit_cfg = fit_configs(layers, g, args.fit_networks, args.seed + 1)
    test = draw(layers, args.networks, g, args.seed + 2)
    configs = fit_cfg + [(w, b) for _, w, b in test]
    pruned = [compress(model, width_masks(layers, w, b)) for w, b in configs]
    macs = [count_macs(p, size) for p in pruned]
    t0 = time.perf_counter()
    measured, res = measure_networks([inference_form(p) for p in pruned], size, batch,
                                     args.device, args.dtype, args.threads, args.net_repeats,
                                     seed=args.seed + 2, steady=steady)
    nets_s = time.perf_counter() - t0
    again = measure_table(model, size, batch, args.device, args.dtype, args.threads, g,
                          args.repeats, seed=args.seed + 3, steady=steady)
    nf = len(fit_cfg)
    table = fit_table(table, layers, fit_cfg, measured[:nf], scale=True)
    fit = table.meta["fit"]
    const = fit_line(fit["sum_ms"], fit["measured_ms"], False)
    mac_line = fit_line(macs[:nf], measured[:nf], True)  # the MAC baseline, same networks
    raw, dense = table.with_fit(0.0, 1.0), layer_families(layers)
    drift = predict(again, layers) / predict(raw, layers)

    rows = []
    for (kind, w, b), m, meas in zip(test, macs[nf:], measured[nf:]):
        s = predict(raw, layers, w, b)
        pred = table.scale * s + table.constant_ms
        rows.append({"batch": batch, "kind": kind,
                     "blocks_removed": sum(not v for v in b.values()),
                     "families_pruned": sum(w[f] < d for f, d in dense.items() if f in w),
                     "macs": m, "sum_ms": s, "predicted_ms": pred, "measured_ms": meas,
                     "error": pred / meas - 1,
                     "error_constant_only": (s + const[1]) / meas - 1,
                     "error_sum_only": s / meas - 1,
                     "error_macs": (mac_line[0] * m + mac_line[1]) / meas - 1})
    test_ms = measured[nf:]
    summary = {
        "batch": batch, "table_points": table.meta["points"], "table_s": table_s,
        "table_quiet_rounds": table.meta["quiet_rounds"], "table_rounds": table.meta["rounds"],
        "networks_s": nets_s, "scale": table.scale, "constant_ms": table.constant_ms,
        "constant_only_ms": const[1],
        "macs_line": {"ms_per_gmac": mac_line[0] * 1e9, "constant_ms": mac_line[1]},
        "fit_median_abs_error": fit["median_abs_error"],
        "net_quiet_rounds": res["quiet_rounds"], "net_rounds": res["rounds"],
        "drift": drift,
        "disturbed": bool(table.meta["disturbed"] or again.meta["disturbed"]
                          or res["disturbed"]),
        "fitted": _errors([r["predicted_ms"] for r in rows], test_ms),
        "constant_only": _errors([r["sum_ms"] + const[1] for r in rows], test_ms),
        "sum_only": _errors([r["sum_ms"] for r in rows], test_ms),
        "macs": _errors([mac_line[0] * r["macs"] + mac_line[1] for r in rows], test_ms),
        "dense_measured_ms": measured[0],
        "load_average_after": _common.load_average(),
    }
    return table, rows, summary


def main(argv=None):
    args = parse(argv)
    if args.networks < 1 or args.fit_networks < 1:
        sys.exit("error: --networks and --fit-networks must be >= 1")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available")
    size = tuple(int(v) for v in args.input.split(","))
    torch.manual_seed(args.seed)
    waited = _common.wait_for_load(args.wait_load) if args.wait_load is not None else None
    load_before = _common.load_average()
    t_start = time.perf_counter()
    model = build_model(args.model, in_channels=size[0], shortcut=args.shortcut).eval()
    layers = network_layers(model, size)
    rows, summaries, keys = [], [], {}
    for batch in args.batches:
        for attempt in range(1, args.attempts + 1):
            if args.wait_load is not None:
                _common.wait_for_load(args.wait_load)
            table, r, s = run_batch(args, model, size, layers, batch)
            s["attempt"] = attempt
            if not s["disturbed"] and abs(s["drift"] - 1) <= args.max_drift:
                break
            print(f"batch {batch}, attempt {attempt}: disturbed {s['disturbed']}, machine "
                  f"drift {s['drift']:.3f}; again")
        rows += r
        summaries.append(s)
        keys[batch] = table.to_dict()["key"]

    info = _common.machine_info(args.device)
    info["load_average_before_run"] = load_before
    info["waited_for_load_s"] = waited
    result = {"benchmark": "latency_model",
              "config": {**vars(args), "input": list(size), "kinds": KINDS,
                         "latency": "median ms of one forward pass of the BN-folded compressed "
                                    "network, eval(), torch.inference_mode, quiet rounds",
                         "error": "predicted / measured - 1"},
              "machine": info, "table_keys": keys, "summary": summaries, "rows": rows,
              "wall_s": time.perf_counter() - t_start}
    suffix = "" if args.allocator == "steady" else "_asis"
    stem = _common.results_path(args.out, f"latency_model_{torch.device(args.device).type}"
                                          f"{suffix}")
    _common.write_json(stem.with_suffix(".json"), result)
    _common.write_csv(stem.with_suffix(".csv"), rows)
    png = _plot(rows, summaries, args, stem.with_suffix(".png"))

    print(_common.format_machine(info))
    print(f"{args.model} {size}, {args.device}, {args.threads} threads, {args.dtype}, "
          f"allocator {args.allocator}, granularity {args.granularity}; {args.networks} "
          f"networks compared, {args.fit_networks} fit networks")
    print(_common.table(summaries, [
        ("batch", "batch", "d"), ("table_points", "points", "d"), ("table_s", "table s", ".1f"),
        ("scale", "scale", ".3f"), ("constant_ms", "const ms", ".3f"),
        ("dense_measured_ms", "dense ms", ".2f"), ("drift", "drift", ".3f"),
        ("attempt", "attempt", "d")]))
    print()
    err_rows = [{"batch": s["batch"], "model": name,
                 **{k: 100 * v for k, v in s[name].items()}}
                for s in summaries for name in ("fitted", "constant_only", "sum_only", "macs")]
    print(_common.table(err_rows, [("batch", "batch", "d"), ("model", "model", ""),
                                   ("median_abs", "median |err| %", ".1f"),
                                   ("max_abs", "max |err| %", ".1f"),
                                   ("mean", "mean err %", "+.1f")]))
    print("\nquiet rounds (table / networks): " + ", ".join(
        f"batch {s['batch']}: {s['table_quiet_rounds']}/{s['table_rounds']}, "
        f"{s['net_quiet_rounds']}/{s['net_rounds']}{' DISTURBED' if s['disturbed'] else ''}"
        for s in summaries))
    print(f"load average now {_common.load_average()} (before: {load_before}); "
          f"total {time.perf_counter() - t_start:.1f} s")
    print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.csv')}"
          + (f", {png}" if png else ""))


def _plot(rows, summaries, args, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    fig, axes = plt.subplots(1, len(summaries), figsize=(5.5 * len(summaries), 5),
                             squeeze=False)
    for ax, s in zip(axes[0], summaries):
        pts = [r for r in rows if r["batch"] == s["batch"]]
        top = max(max(r["measured_ms"], r["predicted_ms"]) for r in pts) * 1.05
        ax.plot([0, top], [0, top], "k-", lw=1, label="predicted = measured")
        for kind, marker in zip(KINDS, "osD^"):
            k = [r for r in pts if r["kind"] == kind]
            ax.scatter([r["measured_ms"] for r in k], [r["predicted_ms"] for r in k],
                       marker=marker, s=30, label=kind)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel("measured latency (ms)")
        ax.set_ylabel("predicted latency (ms)")
        ax.set_title(f"{args.model}, batch {s['batch']}, {args.threads} threads: median |err| "
                     f"{100 * s['fitted']['median_abs']:.1f}%, max "
                     f"{100 * s['fitted']['max_abs']:.1f}%", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out = _common.write_png(path, fig)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
