"""Training-step cost of the variational gates: overhead at theta = 1, saving once pruned.

One training step = forward + cross-entropy (+ the gates' exact cost term) + backward + the gate
update (estimate, projected SGD) + SGD step on the weights, on a fixed random batch.  Variants,
timed interleaved round by round after a warm-up (order rotating each round):

    plain            the dense ResNet, no gates (the reference)
    E@1              GatedResNet with every theta = 1, estimator E: nothing pruned (target:
                     < 10% over plain; with ``st`` this is the price of the gates alone)
    E:unitsP         P% of the units of every unit family dead (sliced out), blocks alive
    E:blocksQ        Q% of the removable blocks dead (skipped)
    E:both           both
    compact:...      the same structures physically removed (nn.compress), trained plainly:
                     what a pruned step can cost at best

The theta step size is tiny (1e-9) so no gate dies or moves during timing.  Reported: median
step ms, the ratio to ``plain`` (ratio of medians, bootstrap 95% interval), the MAC ratio of the
live network, and for the pruned variants the speed-up the gates realise against the compact
model's.  Rounds where other processes used > 5% of the CPU are dropped when enough clean ones
remain (``benchmarks.measure.kept_rounds``).

    python -m benchmarks.gate_overhead --wait-load 1.0     # CPU, ResNet-20, 1x28x28, st + flip
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import torch
import torch.nn.functional as F

from benchmarks import _common
from benchmarks.measure import interleaved_rounds, kept_rounds, paired_ratio, summarize, \
    train_step
from nn import build_model, compress, count_macs
from nn.methods.variational import ESTIMATORS, GatedResNet, VariationalOptions, hooks


def gated_step(gated: GatedResNet, opt, x, y, after_backward):
    gated.train()

    def step():
        opt.zero_grad(set_to_none=True)
        ce = F.cross_entropy(gated(x), y)
        loss = ce + gated.penalty()
        loss.backward()
        after_backward(gated, ce.detach(), x, y)
        opt.step()
        return loss.detach()

    return step


def kill(gated: GatedResNet, unit_frac: float, block_frac: float, seed: int) -> None:
    """Mark a seeded random share of every unit family's units and of the blocks dead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gated.gates:
            n = min(round(unit_frac * gate.size), gate.size - 1) if gate.kind == "unit" else 0
            if n:
                gated.alive[gate.start + torch.randperm(gate.size, generator=g)[:n]] = False
        blocks = [gt for gt in gated.gates if gt.kind == "block"]
        nb = round(block_frac * len(blocks))
        for i in torch.randperm(len(blocks), generator=g)[:nb].tolist():
            gated.alive[blocks[i].start] = False
            gated.alive[gated._block_units[blocks[i].start]] = False
        gated.theta.mul_(gated.alive)


def estimators(text: str) -> list[str]:
    out = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in out if v not in ESTIMATORS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"estimators must be among {', '.join(ESTIMATORS)}, "
                                         f"got {text!r}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--input", default="1,28,28", help="channels,height,width")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--units", type=float, default=0.5, help="share of units killed")
    p.add_argument("--blocks", type=float, default=1 / 3, help="share of blocks killed")
    p.add_argument("--estimators", type=estimators, default=estimators("st,flip"),
                   help="comma-separated, of " + ", ".join(ESTIMATORS))
    p.add_argument("--flip-units", type=int, default=VariationalOptions.flip_units,
                   help="unit gates flipped per step by flip and batched")
    p.add_argument("--flip-blocks", type=int, default=VariationalOptions.flip_blocks,
                   help="block gates flipped per step by flip and batched")
    p.add_argument("--flip-samples", type=int, default=VariationalOptions.flip_samples,
                   help="ghost batch of the batched estimator")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-load", type=float, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.input.split(","))
    if len(shape) != 3 or min(shape) < 1:
        p.error(f"--input must be channels,height,width, got {args.input!r}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    waited = _common.wait_for_load(args.wait_load) if args.wait_load is not None else None

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn((args.batch, *shape), generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    plans = {"@1": (0.0, 0.0), f":units{round(100 * args.units)}": (args.units, 0.0),
             f":blocks{round(100 * args.blocks)}": (0.0, args.blocks),
             ":both": (args.units, args.blocks)}
    steps, macs = {}, {}
    base = build_model(args.model, 10, shape[0])
    dense_macs = count_macs(base, shape)
    steps["plain"] = train_step(base, torch.optim.SGD(base.parameters(), lr=1e-3,
                                                      momentum=0.9), x, y)
    macs["plain"] = dense_macs
    for est, (suffix, (uf, bf)) in itertools.product(args.estimators, plans.items()):
        vcfg = VariationalOptions(theta_lr=1e-9, gate_warmup_epochs=0, estimator=est,
                                  flip_units=args.flip_units, flip_blocks=args.flip_blocks,
                                  flip_samples=args.flip_samples)
        name = est + suffix
        net = build_model(args.model, 10, shape[0])
        net.load_state_dict(base.state_dict())
        gated = GatedResNet(net, shape, lam=1.0, estimator=est, flip_units=args.flip_units,
                            flip_blocks=args.flip_blocks, flip_samples=args.flip_samples)
        kill(gated, uf, bf, args.seed)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        steps[name] = gated_step(gated, opt, x, y, hooks(gated, vcfg, 1)["after_backward"])
        macs[name] = float(gated.expected(gated.deterministic_keep().double())["macs"])
        compact = "compact" + suffix
        if (uf or bf) and compact not in steps:
            small = compress(net, gated.deterministic_masks())
            steps[compact] = train_step(
                small, torch.optim.SGD(small.parameters(), lr=1e-3, momentum=0.9), x, y)
            macs[compact] = count_macs(small, shape)
    rounds = interleaved_rounds(steps, args.repeats, args.warmup)
    keep, clean, ms = kept_rounds(rounds)
    rows = []
    for name, t in ms.items():
        s = summarize(t)
        row = {"variant": name, "median_step_ms": s["median_ms"], "q1_ms": s["q1_ms"],
               "q3_ms": s["q3_ms"], "mac_ratio": macs[name] / dense_macs}
        if name != "plain":
            r = paired_ratio(ms["plain"], t, seed=args.seed)
            row.update(time_ratio=r["ratio_of_medians"], ci95_low=r["ci95"][0],
                       ci95_high=r["ci95"][1])
        if ":" in name and not name.startswith("compact:"):
            compact = ms["compact:" + name.split(":")[1]]
            row["vs_compact"] = statistics.median(t) / statistics.median(compact)
        rows.append(row)
    over = {r["variant"][:-2]: r for r in rows if r["variant"].endswith("@1")}
    info = _common.machine_info("cpu")
    info["waited_for_load_s"] = waited
    result = {"benchmark": "gate_overhead", "config": vars(args), "machine": info,
              "rows": rows,
              "overhead_pct_at_theta_1": {e: 100 * (r["time_ratio"] - 1) for e, r in over.items()},
              "meets_target_10pct": {e: r["time_ratio"] < 1.10 for e, r in over.items()},
              "rounds": {"timed": args.repeats, "used": len(keep), "clean_only": clean,
                         "foreign_cpu_share": rounds["foreign_cpu"]},
              "raw_step_ms": rounds["ms"]}
    stem = _common.results_path(args.out, "gate_overhead_cpu")
    _common.write_json(stem.with_suffix(".json"), result)
    _common.write_csv(stem.with_suffix(".csv"), rows)
    print(_common.format_machine(info))
    print(f"{args.model} {shape} batch {args.batch}, estimators {','.join(args.estimators)}, "
          f"{len(keep)}/{args.repeats} rounds used ({'clean only' if clean else 'all'})")
    print(_common.table(rows, [("variant", "variant", ""), ("median_step_ms", "step ms", ".1f"),
                               ("q1_ms", "q1", ".1f"), ("q3_ms", "q3", ".1f"),
                               ("mac_ratio", "MACs/dense", ".3f"),
                               ("time_ratio", "time/plain", ".3f"),
                               ("ci95_low", "ci lo", ".3f"), ("ci95_high", "ci hi", ".3f"),
                               ("vs_compact", "time/compact", ".3f")]))
    for e in over:
        print(f"overhead at theta = 1 with {e}: {result['overhead_pct_at_theta_1'][e]:+.1f}% "
              f"(target < 10%: {'met' if result['meets_target_10pct'][e] else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
