"""Trade-off curve of the variational pruner: a sweep of lam, compared with SPR at matched MACs.

Every point is one ``python -m nn train`` run from scratch (``--quick`` budget by default:
Fashion-MNIST, 15k-image training subset, 5 epochs + 2 fine-tuning epochs, full test set):
``--method variational --lam L`` for each L of ``--lams``, and ``--method spr --lam L`` for each
L of ``--spr-lams``.  Collected per run: test accuracy (final, i.e. after fine-tuning, and before
fine-tuning), MACs and parameters of the saved model, blocks kept, per-epoch training time and,
for the variational runs, the MACs of the deterministic network per epoch.

Reported: the curve (monotone in lam within noise?), each variational point's accuracy against
SPR's interpolated linearly in MACs between its two neighbouring SPR points (None outside SPR's
range), and the time per epoch as the gates prune (wall-clock of the training epochs).
Runs go to ``--runs/<method>-<lam>`` and are resumable like ``fmnist_methods.py``; two 1-thread
jobs at once by default.  Plot: accuracy vs MACs, and training time per epoch.

    python -m benchmarks.variational_sweep      # the recorded run: lams 0.1,0.25,0.5,1; SPR 4.5,9,15
"""

from __future__ import annotations

import argparse
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import _common
from benchmarks.fmnist_methods import run


def lams(text: str) -> list[float]:
    try:
        out = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if any(v < 0 for v in out):
        raise argparse.ArgumentTypeError(f"lam must be >= 0, got {text!r}")
    return out


def command(method: str, lam: float, args) -> list[str]:
    return [sys.executable, "-m", "nn", "train", "--quick", "--method", method, "--lam",
            f"{lam:g}", "--seed", str(args.seed), "--threads", str(args.threads),
            "--no-progress", "--latency-batches", "",
            "--out", str(Path(args.runs) / f"{method}-{lam:g}")] + shlex.split(args.extra)


def row(method: str, lam: float, rep: dict, argv: list[str]) -> dict:
    acc, cx = rep["accuracy"], rep["complexity"]
    hist = rep["history"]["train"]
    r = {"method": method, "lam": lam, "test_final": acc["test_final"],
         "test_before_finetune": acc["test_after_pruning"],
         "macs": cx["pruned"]["macs"], "mac_reduction": cx["mac_reduction"],
         "params": cx["pruned"]["params"], "blocks_kept": rep["blocks_kept"],
         "blocks": len(rep["blocks"]), "train_min": rep["timings"]["train"] / 60,
         "epoch_train_s": [h["train_time"] for h in hist],
         "command": shlex.join(["python"] + argv[1:])}
    if method == "variational":
        r["epoch_det_macs"] = [h["gates_det_macs"] for h in hist]
        r["epoch_live_macs"] = [h["gates_live_macs"] if "gates_live_macs" in h else
                                live_macs(rep, h["theta"]) for h in hist]
        r["rounded"] = {k: rep["selection"][k] for k in ("rounded_up", "rounded_down")}
    return r


def live_macs(rep: dict, theta: dict) -> float:
    """MACs of the live network (gates with theta > 0) from an epoch's theta dump, for runs
    logged before the metrics carried ``gates_live_macs``."""
    import torch

    from nn import GatedResNet, build_model

    c = rep["config"]
    size = tuple(rep["data"]["input_size"])
    net = build_model(c["model"], rep["data"]["num_classes"], size[0], c["width"], c["shortcut"])
    gated = GatedResNet(net, size)
    alive = torch.cat([torch.tensor(theta[g.name]) > 0 for g in gated.gates])
    return float(gated.expected(alive.double())["macs"])


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of ``y`` at ``x`` between the neighbouring points (sorted by x)."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def plot(rows: list[dict], path: Path, info: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, marker in (("variational", "o-"), ("spr", "s--")):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["macs"])
        if not rs:
            continue
        a1.plot([r["macs"] / 1e6 for r in rs], [100 * r["test_final"] for r in rs], marker,
                label=method)
        for r in rs:
            a1.annotate(f"lam {r['lam']:g}, {r['blocks_kept']}/{r['blocks']} blocks",
                        (r["macs"] / 1e6, 100 * r["test_final"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    a1.set(xlabel="MACs of the saved model (M)", ylabel="test accuracy after fine-tuning (%)",
           title="ResNet-20, Fashion-MNIST (quick budget)")
    a1.grid(alpha=0.3)
    a1.legend()
    for r in rows:
        if r["method"] == "variational":
            a2.plot([m / 1e6 for m in r["epoch_live_macs"]], r["epoch_train_s"], "o-",
                    label=f"variational lam {r['lam']:g}")
    a2.set(xlabel="MACs of the live network during the epoch (M; from its end)",
           ylabel="training wall-clock of the epoch (s)",
           title="time per epoch as the gates prune")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.text(0.01, -0.12, info, fontsize=7, family="monospace")
    _common.write_png(path, fig)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lams", type=lams, default=lams("0.1,0.25,0.5,1"))
    p.add_argument("--spr-lams", type=lams, default=lams("4.5,9,15"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extra", default="", help="more options for every run (one string)")
    p.add_argument("--runs", default="runs/variational-sweep")
    p.add_argument("--out", default=None, help="result stem (default results/variational_sweep)")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    plan = [("variational", lam) for lam in args.lams] + [("spr", lam) for lam in args.spr_lams]
    argvs = {key: command(*key, args) for key in plan}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {key: pool.submit(run, f"{key[0]} lam {key[1]:g}", argvs[key])
                   for key in plan}
        reports = {key: f.result() for key, f in futures.items()}
    rows = [row(m, lam, reports[(m, lam)], argvs[(m, lam)]) for m, lam in plan]
    spr_pts = [(r["macs"], r["test_final"]) for r in rows if r["method"] == "spr"]
    for r in rows:
        if r["method"] == "variational":
            s = interpolate(spr_pts, r["macs"])
            r["spr_at_same_macs"] = s
            r["minus_spr_pp"] = None if s is None else 100 * (r["test_final"] - s)
    var = sorted((r for r in rows if r["method"] == "variational"), key=lambda r: r["lam"])
    monotone = all(a["macs"] >= b["macs"] for a, b in zip(var, var[1:]))
    info = _common.machine_info("cpu")
    stem = _common.results_path(args.out, "variational_sweep")
    _common.write_json(stem.with_suffix(".json"), {
        "machine": info, "settings": vars(args), "rows": rows,
        "macs_nonincreasing_in_lam": monotone,
        "note": "--jobs runs at once, each --threads torch threads; epoch times are wall-clock "
                "under that load"})
    _common.write_csv(stem.with_suffix(".csv"), [
        {k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in rows])
    plot(rows, stem.with_suffix(".png"), _common.format_machine(info))
    print(_common.format_machine(info))
    print(_common.table(rows, [
        ("method", "method", ""), ("lam", "lam", "g"), ("test_final", "acc", ".4f"),
        ("test_before_finetune", "acc pre-FT", ".4f"), ("macs", "MACs", ",d"),
        ("mac_reduction", "-MACs", ".1%"), ("params", "params", ",d"),
        ("blocks_kept", "blocks", "d"), ("spr_at_same_macs", "SPR@MACs", ".4f"),
        ("minus_spr_pp", "vs SPR pp", "+.2f"), ("train_min", "train min", ".1f")]))
    print(f"MACs non-increasing in lam: {monotone}")
    for r in var:
        print(f"lam {r['lam']:g}: epoch train s " + ", ".join(f"{t:.0f}" for t in
                                                            r["epoch_train_s"])
              + " | live MACs (M) " + ", ".join(f"{m / 1e6:.1f}" for m in r["epoch_live_macs"])
              + " | det MACs (M) " + ", ".join(f"{m / 1e6:.1f}" for m in r["epoch_det_macs"]))
    for r in rows:
        print(f"{r['method']} {r['lam']:g}: {r['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
