"""Realised speed-up of physically pruned ResNets: MACs vs measured latency.

Models (all from one dense, randomly initialised network; pruning patterns drawn with ``--seed``):

    dense          the dense network
    filters30/50/70  30/50/70% of the free filters (kind "filter": conv1 of every BasicBlock)
                   removed in every family (``round(p * size)`` each; at random, or by smallest
                   L1 norm with ``--selection l1``)
    filtersXX_rK   the same, kept counts rounded to a multiple of K (``--round``, default
                   16: oneDNN's fp32 AVX-512 output-channel block; only when that changes
                   them; at least K kept per family)
    blocks33       1/3 of the removable blocks removed (at random)
    blocks33+f50   both

Each is compressed with :func:`nn.compress`, its MACs (:func:`nn.count_macs`) and parameters
counted, then every model is timed under every inference variant (``--variants``; see
:func:`benchmarks.measure.inference_variant`): all (variant, model) pairs interleaved round by
round after a warm-up, eval mode, ``torch.inference_mode``.  Reported per pair: MAC ratio
(dense / pruned), latency ratio (dense / pruned, same variant), their quotient (target >= 0.8 at
batch 64 on CPU) and the speed-up over the dense eager model.  A per-shape convolution table
(``--conv-table``) shows the convolution library's efficiency (GMAC/s) at the channel counts the
pruned models use.

    python -m benchmarks.pruning_speedup                    # CPU, batch 64
    python -m benchmarks.pruning_speedup --device cuda      # GPU, batch 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

from benchmarks import _common
from benchmarks.measure import VARIANTS, block_masks, kept_rounds, conv_shapes, conv_timings, \
    fraction_masks, inference_variant, interleaved_rounds, max_logit_diff, merge_masks, \
    padded_macs, round_masks, summarize
from nn import build_model, compress, count_macs, count_params, prunable_structures


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--batch", type=int, default=None, help="default 64 on CPU, 256 on CUDA")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (each times every "
                   "model under every variant once)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--block-fraction", type=float, default=1 / 3)
    p.add_argument("--combo-fraction", type=float, default=0.5,
                   help="filter fraction combined with the block removal")
    p.add_argument("--selection", choices=("random", "l1"), default="random")
    p.add_argument("--round", type=int, nargs="*", default=[16], help="also round kept "
                   "counts to these multiples (none: don't; e.g. --round 8 16)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--conv-table", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--target", type=float, default=0.8)
    p.add_argument("--clean-threshold", type=float, default=0.05,
                   help="rounds where other processes used more than this share of the "
                   "machine's CPU are left out (unless fewer than 5 rounds remain)")
    p.add_argument("--block", type=int, default=16, help="output-channel block of the cost "
                   "model 'padded MACs' (oneDNN fp32 AVX-512: 16)")
    p.add_argument("--wait-load", type=float, default=None, metavar="L",
                   help="first wait (up to 15 min) until the 1-min load average is below L")
    p.add_argument("--out", default=None, help="output stem (default: benchmarks/results/"
                   "pruning_speedup_<device>)")
    return p.parse_args(argv)


def build_models(args, dense):
    fams = prunable_structures(dense)
    masks = {"dense": {}}
    for p in args.fractions:
        masks[f"filters{round(100 * p)}"] = fraction_masks(fams, p, args.seed,
                                                           selection=args.selection, model=dense)
    for k in args.round:
        for p in args.fractions:
            m = masks[f"filters{round(100 * p)}"]
            r = round_masks(fams, m, k, args.seed)
            if any(int(r[f].sum()) != int(m[f].sum()) for f in m):
                masks[f"filters{round(100 * p)}_r{k}"] = r
    if args.block_fraction > 0:
        b = block_masks(fams, args.block_fraction, args.seed)
        tag = f"blocks{round(100 * args.block_fraction)}"
        masks[tag] = b
        if args.combo_fraction > 0:
            masks[f"{tag}+f{round(100 * args.combo_fraction)}"] = merge_masks(
                b, fraction_masks(fams, args.combo_fraction, args.seed,
                                  selection=args.selection, model=dense))
    models = {name: (dense if not m else compress(dense, m)) for name, m in masks.items()}
    kept = {}
    for name, m in masks.items():
        filt = [int(v.sum()) for k, v in m.items() if not k.startswith("block.")]
        kept[name] = {"filters_kept": sum(filt) if filt else None,
                      "blocks_removed": sum(int(~v[0]) for k, v in m.items()
                                            if k.startswith("block."))}
    n_filters = sum(f.size for f in fams if f.kind == "filter")
    n_blocks = sum(1 for f in fams if f.kind == "block")
    return models, kept, n_filters, n_blocks


def main(argv=None):
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available")
    batch = args.batch or (256 if device.type == "cuda" else 64)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    waited = _common.wait_for_load(args.wait_load) if args.wait_load is not None else None
    load_before = _common.load_average()
    t_start = time.perf_counter()

    dense = build_model(args.model).eval()
    models, kept, n_filters, n_blocks = build_models(args, dense)
    counts = {n: {"macs": count_macs(m), "params": count_params(m),
                  "padded_macs": padded_macs(m, block=args.block)} for n, m in models.items()}
    models = {n: m.to(device) for n, m in models.items()}
    x = torch.randn((batch, 3, 32, 32), generator=torch.Generator().manual_seed(args.seed)
                    ).to(device)

    fns, exact, build_s = {}, {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for v in args.variants:
            t0 = time.perf_counter()
            for name, m in models.items():
                f, xv = inference_variant(m, v, x)
                with torch.inference_mode():
                    f(xv)  # first call: tracing / compilation
                exact[(v, name)] = max_logit_diff(m, f, x, xv)
                fns[(v, name)] = (lambda f=f, xv=xv: f(xv))
            build_s[v] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.inference_mode():
            rounds = interleaved_rounds(fns, args.repeats, args.warmup, device)
        timing_s = time.perf_counter() - t0
    foreign = rounds["foreign_cpu"]
    keep, clean, ms = kept_rounds(rounds, args.clean_threshold)

    convs, conv_s, conv_sum = None, None, {}
    if args.conv_table:
        per_model = {n: conv_shapes(m) for n, m in models.items()}
        shapes = {}
        for sh in per_model.values():
            for *k, n in sh:
                shapes[tuple(k)] = shapes.get(tuple(k), 0) + n
        t0 = time.perf_counter()
        convs = conv_timings([(*k, n) for k, n in shapes.items()], batch,
                             repeats=max(5, args.repeats), warmup=2, device=device,
                             clean_threshold=args.clean_threshold)
        conv_s = time.perf_counter() - t0
        by_shape = {tuple(c[k] for k in ("in_c", "out_c", "kernel", "stride", "hw")): c
                    for c in convs}
        conv_sum = {n: sum(cnt * by_shape[(ci, co, k, st, h)]["median_ms"]
                           for (ci, co, k, st, pad, h, w, cnt) in sh)
                    for n, sh in per_model.items()}

    rows = []
    ref = statistics.median(ms[(args.variants[0], "dense")])
    for v in args.variants:
        dense_ms = statistics.median(ms[(v, "dense")])
        for name in models:
            s = summarize(ms[(v, name)])
            mac_ratio = counts["dense"]["macs"] / counts[name]["macs"]
            lat_ratio = dense_ms / s["median_ms"]
            rows.append({"variant": v, "model": name, **kept[name], **counts[name],
                         "mac_ratio": mac_ratio,
                         "param_ratio": counts["dense"]["params"] / counts[name]["params"],
                         "padded_mac_ratio": counts["dense"]["padded_macs"]
                         / counts[name]["padded_macs"],
                         "median_ms": s["median_ms"], "q1_ms": s["q1_ms"], "q3_ms": s["q3_ms"],
                         "conv_sum_ms": conv_sum.get(name),
                         "conv_sum_ratio": conv_sum["dense"] / conv_sum[name] if conv_sum
                         else None,
                         "latency_ratio": lat_ratio, "efficiency": lat_ratio / mac_ratio,
                         "efficiency_padded": lat_ratio * counts[name]["padded_macs"]
                         / counts["dense"]["padded_macs"],
                         "meets_target": None if name == "dense" else
                         lat_ratio >= args.target * mac_ratio,
                         "speedup_vs_dense_eager": ref / s["median_ms"],
                         "images_per_s": batch / s["median_ms"] * 1e3,
                         **exact[(v, name)]})

    info = _common.machine_info(args.device)
    info["load_average_before_run"] = load_before
    info["waited_for_load_s"] = waited
    result = {
        "benchmark": "pruning_speedup",
        "config": {**vars(args), "batch": batch,
                   "free_filters": n_filters, "removable_blocks": n_blocks,
                   "order": "all (variant, model) pairs interleaved, order rotating each round",
                   "latency": "median ms of one forward pass, eval(), torch.inference_mode"},
        "machine": info,
        "rows": rows,
        "conv_table": convs,
        "rounds": {"timed": len(foreign), "used": len(keep), "used_only_clean": clean,
                   "foreign_cpu_share_per_round": foreign},
        "wall_s": {"total": time.perf_counter() - t_start, "build": build_s,
                   "timing": timing_s, "conv_table": conv_s},
        "raw_ms": {f"{v}|{n}": t for (v, n), t in rounds["ms"].items()},
    }
    stem = _common.results_path(args.out, f"pruning_speedup_{device.type}")
    _common.write_json(stem.with_suffix(".json"), result)
    _common.write_csv(stem.with_suffix(".csv"),
                      [r | {"device": str(device), "batch": batch,
                            "threads": torch.get_num_threads(),
                            "load_1min_before": (load_before or [None])[0]} for r in rows])
    png = _plot(rows, args, batch, device, stem.with_suffix(".png"))

    print(_common.format_machine(info))
    print(f"{args.model}, batch {batch}, device {device}, threads {torch.get_num_threads()}; "
          f"{n_filters} free filters, {n_blocks} removable blocks; selection "
          f"{args.selection}, seed {args.seed}; {args.repeats} interleaved rounds after "
          f"{args.warmup} warm-up rounds")
    fs = [f for f in foreign if f is not None]
    print(f"{len(keep)} rounds used ({'clean only' if clean else 'ALL: too few clean rounds'}; "
          f"other processes' CPU share per round: median "
          f"{statistics.median(fs) if fs else float('nan'):.2f}, max "
          f"{max(fs) if fs else float('nan'):.2f})")
    print(_common.table(rows, [
        ("variant", "variant", ""), ("model", "model", ""), ("macs", "MACs", ","),
        ("params", "params", ","), ("mac_ratio", "MAC x", ".2f"),
        ("median_ms", "ms", ".1f"), ("q1_ms", "q1", ".1f"), ("q3_ms", "q3", ".1f"),
        ("padded_mac_ratio", "padMAC x", ".2f"), ("conv_sum_ratio", "convsum x", ".2f"),
        ("latency_ratio", "lat x", ".2f"), ("efficiency", "lat/MAC", ".2f"),
        ("efficiency_padded", "lat/padMAC", ".2f"),
        ("meets_target", f">= {args.target}", ""),
        ("speedup_vs_dense_eager", "vs dense eager", ".2f"),
        ("max_rel_diff", "rel diff", ".1e")]))
    if convs:
        print(f"\nconvolutions alone (bias, eager, batch {batch}; {convs[0]['rounds_used']} "
              f"rounds used); convsum x = dense / model sum of these over the model's convs:")
        print(_common.table(convs, [("shape", "shape", ""), ("count", "uses", "d"),
                                    ("median_ms", "ms", ".3f"),
                                    ("gmacs_per_s", "GMAC/s", ".1f")]))
    print("\nbuild+first call s: " + ", ".join(f"{k} {v:.1f}" for k, v in build_s.items())
          + f"; timing {timing_s:.1f} s; total {time.perf_counter() - t_start:.1f} s")
    print(f"load average now {_common.load_average()} (before: {load_before})")
    print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.csv')}"
          + (f", {png}" if png else ""))


def _plot(rows, args, batch, device, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 5.5))
    top = max(r["mac_ratio"] for r in rows) * 1.1
    ax.plot([1, top], [1, top], "k-", lw=1, label="latency ratio = MAC ratio")
    ax.plot([1, top], [args.target, args.target * top], "k--", lw=1,
            label=f"{args.target} x MAC ratio (target)")
    markers = "osD^vP*X"
    for i, v in enumerate(args.variants):
        pts = [r for r in rows if r["variant"] == v and r["model"] != "dense"]
        ax.scatter([r["mac_ratio"] for r in pts], [r["latency_ratio"] for r in pts],
                   marker=markers[i % len(markers)], label=v, s=36)
        if i == 0:
            for r in pts:
                ax.annotate(r["model"], (r["mac_ratio"], r["latency_ratio"]), fontsize=7,
                            xytext=(4, -9), textcoords="offset points")
    ax.set_xlabel("MAC ratio (dense / pruned)")
    ax.set_ylabel("latency ratio (dense / pruned, same variant)")
    ax.set_title(f"{args.model}: realised speed-up, batch {batch}, {device}, "
                 f"{torch.get_num_threads()} threads", fontsize=10)
    ax.set_xlim(1, top)
    ax.set_ylim(bottom=min(0.9, min(r["latency_ratio"] for r in rows) * 0.95))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _common.write_png(path, fig)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
