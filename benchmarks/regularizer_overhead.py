"""Training-step overhead of the SPR regularizer.

One training step = forward + cross-entropy (+ SPR) + backward + SGD step, on a random batch
(``batch x 3 x 32 x 32``, random labels), model in train mode.  The variants run interleaved
round by round after a warm-up (order rotating every round), all on the same model and
optimizer, so drift of the machine affects them alike:

    none            plain step
    spr             SPRRegularizer.add_grad_() after the backward pass, as the training loop
                    does, on the device's default path (``path="auto"``: per-family on the
                    CPU, flat on a GPU)
    spr_flat        the same with ``path="flat"`` (nn.flat_penalty: every group at once)
    spr_per_family  the same with ``path="per-family"`` (mipprune.penalty.spr on each bucket of
                    equal-width groups, gradient by autograd)
    spr_autograd    loss + reg(): the default path as an autograd term (how training ran before
                    add_grad_: one gradient addition per parameter)
    spr_compiled    loss + torch.compile(reg.__call__) (``--no-compiled`` skips it)

Reported: median step times, the ratio to ``none`` (ratio of medians, median of per-round
ratios, bootstrap 95% interval), overhead % (target: < 3% CPU, < 1% GPU), and the penalty's own
forward + backward time in isolation (interleaved too), plus an operator profile of it.

    python -m benchmarks.regularizer_overhead                  # CPU, ResNet-56, batch 128
    python -m benchmarks.regularizer_overhead --device cuda    # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

from benchmarks import _common
from benchmarks.measure import interleaved_ms, kept_rounds, interleaved_rounds, launch_count, \
    op_profile, paired_ratio, regularizer_step, summarize, train_step
from nn import CostConfig, SPRConfig, SPRRegularizer, build_model, count_params

TARGET = {"cpu": 3.0, "cuda": 1.0}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=40, help="timed rounds (each times every "
                   "variant once)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--iso-repeats", type=int, default=60,
                   help="rounds for the penalty timed in isolation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--M-scale", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--wait-load", type=float, default=None, metavar="L",
                   help="first wait (up to 15 min) until the 1-min load average is below L")
    p.add_argument("--clean-threshold", type=float, default=0.05,
                   help="rounds where other processes used more than this share of the "
                   "machine's CPU are left out (unless fewer than 5 rounds remain)")
    p.add_argument("--no-compiled", action="store_true",
                   help="skip the torch.compile variant of the penalty")
    p.add_argument("--out", default=None, help="output stem (default: benchmarks/results/"
                   "regularizer_overhead_<device>)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    waited = _common.wait_for_load(args.wait_load) if args.wait_load is not None else None
    load_before = _common.load_average()

    model = build_model(args.model).to(device)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn((args.batch, 3, 32, 32), generator=g).to(device)
    y = torch.randint(0, model.fc.out_features, (args.batch,), generator=g).to(device)
    # every conv/BN parameter in a group (filters and streams), n_j from parameters: the
    # configuration the recorded results were measured with
    config = SPRConfig(lam=args.lam, alpha=args.alpha, M_scale=args.M_scale,
                       cost=CostConfig(macs=0, params=1), kinds=("filter", "stream"))
    reg = SPRRegularizer(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)

    with torch.no_grad():
        ce0 = float(torch.nn.functional.cross_entropy(model(x), y))
        pen0 = float(reg())
    cases = reg.case_stats()["all"]

    class OnPath:
        """``reg`` evaluated on one path (a regularizer with add_grad_ for train_step)."""

        def __init__(self, path):
            self.path = path

        def add_grad_(self, scale=None):
            before, reg.path = reg.path, self.path
            try:
                return reg.add_grad_(scale)
            finally:
                reg.path = before

    penalties = {"spr": reg, "spr_flat": OnPath("flat"), "spr_per_family": OnPath("per-family"),
                 "spr_autograd": reg.__call__}
    check = {}
    compile_s = None
    if not args.no_compiled:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = torch.compile(reg.__call__)
            t0 = time.perf_counter()
            v = compiled()
            v.backward()
            v = v.detach()
            compile_s = time.perf_counter() - t0
        grads_c = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        v_e = reg()
        v_e.backward()
        v_e = v_e.detach()
        grads_e = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        check = {"value_rel_diff": abs(float(v) - float(v_e)) / abs(float(v_e)),
                 "grad_max_rel_diff": max(float((a - b).abs().max() / b.abs().max().clamp_min(
                     1e-30)) for a, b in zip(grads_c, grads_e))}
        penalties["spr_compiled"] = compiled

    steps = {"none": train_step(model, opt, x, y)}
    for name, pen in penalties.items():
        steps[name] = train_step(model, opt, x, y, pen)
    t_run = time.perf_counter()
    rounds = interleaved_rounds(steps, args.repeats, args.warmup, device)
    t_steps = time.perf_counter() - t_run
    foreign = rounds["foreign_cpu"]
    keep, clean, step_ms = kept_rounds(rounds, args.clean_threshold)

    iso = {name: (pen.add_grad_ if hasattr(pen, "add_grad_") else regularizer_step(pen))
           for name, pen in penalties.items()}
    iso["spr_forward_only"] = lambda: reg().detach()
    iso_ms = interleaved_ms(iso, args.iso_repeats, 5, device)
    prof = op_profile(reg.add_grad_) if device.type == "cpu" else None
    launches = {name: launch_count(iso[name])
                for name in ("spr_flat", "spr_per_family", "spr_autograd")}
    model.zero_grad(set_to_none=True)

    base = step_ms["none"]
    target = TARGET.get(device.type, 3.0)
    rows = []
    for name, ms in step_ms.items():
        s = summarize(ms)
        row = {"variant": name, "median_step_ms": s["median_ms"], "q1_ms": s["q1_ms"],
               "q3_ms": s["q3_ms"], "n": s["n"]}
        if name != "none":
            r = paired_ratio(base, ms, seed=args.seed)
            iso_med = statistics.median(iso_ms[name])
            row.update({"ratio": r["ratio_of_medians"],
                        "median_paired_ratio": r["median_paired_ratio"],
                        "overhead_pct": 100 * (r["ratio_of_medians"] - 1),
                        "ci95_low_pct": 100 * (r["ci95"][0] - 1),
                        "ci95_high_pct": 100 * (r["ci95"][1] - 1),
                        "penalty_fwd_bwd_ms": iso_med,
                        "predicted_overhead_pct": 100 * iso_med / statistics.median(base),
                        "target_pct": target,
                        "meets_target": 100 * (r["ratio_of_medians"] - 1) < target})
        rows.append(row)

    info = _common.machine_info(args.device)
    info["load_average_before_run"] = load_before
    info["waited_for_load_s"] = waited
    result = {
        "benchmark": "regularizer_overhead",
        "config": {**vars(args), "spr_config": {k: getattr(config, k) for k in (
            "lam", "alpha", "M_scale", "kinds", "beyond_M", "penalty")}
            | {"cost": config.cost.to_dict()},
            "optimizer": f"SGD(lr={args.lr}, momentum=0.9, weight_decay=5e-4)",
            "order": "interleaved rounds, order rotating each round"},
        "machine": info,
        "model": {"name": args.model, "params": count_params(model),
                  "regularized_groups": cases["n"], "families": len(reg.families)},
        "initial": {"cross_entropy": ce0, "penalty": pen0, "penalty_over_ce": pen0 / ce0,
                    "cases": cases},
        "compiled": {"compile_s": compile_s, **check} if compile_s is not None else None,
        "rows": rows,
        "isolated_penalty_ms": {k: summarize(v) for k, v in iso_ms.items()},
        "penalty_op_profile": prof,
        "launches_per_step": {k: {"cpu_ops": v["cpu_ops"], "cuda_kernels": v["cuda_kernels"]}
                              for k, v in launches.items()},
        "rounds": {"timed": len(foreign), "used": len(keep),
                   "used_only_clean": clean,
                   "foreign_cpu_share_per_round": foreign},
        "wall_s": {"steps": t_steps},
        "raw_step_ms": rounds["ms"],
    }
    stem = _common.results_path(args.out, f"regularizer_overhead_{device.type}")
    _common.write_json(stem.with_suffix(".json"), result)
    _common.write_csv(stem.with_suffix(".csv"),
                      [r | {"device": str(device), "threads": torch.get_num_threads(),
                            "batch": args.batch, "load_1min_before": (load_before or [None])[0]}
                       for r in rows])

    print(_common.format_machine(info))
    print(f"model {args.model} ({count_params(model)} params), batch {args.batch}, "
          f"device {device}, threads {torch.get_num_threads()}; SPR lam={args.lam} "
          f"alpha={args.alpha} M_scale={args.M_scale}: penalty/CE at start "
          f"{pen0 / ce0:.3f}, cases C1/C2/C3 {cases['C1']:.2f}/{cases['C2']:.2f}/"
          f"{cases['C3']:.2f} of {cases['n']} groups")
    fs = [f for f in foreign if f is not None]
    print(f"{args.repeats} interleaved rounds after {args.warmup} warm-up rounds; "
          f"{len(keep)} used ({'clean only' if clean else 'ALL: too few clean rounds'}; "
          f"other processes' CPU share per round: median "
          f"{statistics.median(fs) if fs else float('nan'):.2f}, max "
          f"{max(fs) if fs else float('nan'):.2f})")
    print(_common.table(rows, [("variant", "variant", ""), ("median_step_ms", "step ms", ".1f"),
                               ("q1_ms", "q1", ".1f"), ("q3_ms", "q3", ".1f"),
                               ("ratio", "ratio", ".4f"),
                               ("median_paired_ratio", "paired", ".4f"),
                               ("overhead_pct", "overhead %", ".2f"),
                               ("ci95_low_pct", "CI lo", ".2f"), ("ci95_high_pct", "CI hi", ".2f"),
                               ("penalty_fwd_bwd_ms", "pen f+b ms", ".2f"),
                               ("predicted_overhead_pct", "pen/step %", ".2f"),
                               ("meets_target", f"< {target}%", "")]))
    print("penalty in isolation (median ms): " + ", ".join(
        f"{k} {statistics.median(v):.2f}" for k, v in iso_ms.items()))
    if compile_s is not None:
        print(f"torch.compile of the penalty: {compile_s:.1f} s first call; value rel diff "
              f"{check['value_rel_diff']:.1e}, grad max rel diff {check['grad_max_rel_diff']:.1e}")
    if prof:
        print(f"penalty fwd+bwd profile: {prof['kernel_ops_per_call']:.0f} kernel-like aten "
              f"ops ({prof['ops_per_call']:.0f} profiler events) per call; top "
              + ", ".join(f"{t['op']} {t['self_cpu_ms']:.2f} ms" for t in prof["top"][:6]))
    print("kernel launches per penalty step (torch.profiler; CPU ops, CUDA kernels): " + ", ".join(
        f"{k} {v['cpu_ops']:.0f}, {v['cuda_kernels']}" for k, v in launches.items()))
    print(f"load average now {_common.load_average()} (before: {load_before})")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
