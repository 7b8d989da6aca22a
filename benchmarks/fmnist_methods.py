"""Every pruning method of ``python -m nn train`` on full Fashion-MNIST, one table.

Runs ``python -m nn train --method M --model resnet20 --data fashion-mnist`` (the full 60k
training set, the full 10k test set) for ``dense``, ``spr``, ``bigm``, ``l1-filter`` and
``slimming`` (and ``variational`` when asked for) with the same training budget, then collects each run's ``report.json`` into
``benchmarks/results/<stem>.{json,csv,png}`` with the exact command of every run.

Budget: ``--epochs`` regularised (or plain) epochs + ``--finetune-epochs`` fine-tuning epochs for
the pruning methods; ``dense`` trains ``epochs + finetune_epochs`` epochs and is not pruned.  With
``--match-macs`` (default) ``l1-filter`` and ``slimming`` prune to the MAC fraction SPR reached
(so SPR runs first), which makes their accuracies comparable with SPR's.

Runs go to ``--runs/<method>``; an interrupted benchmark is resumed by running it again (finished
runs are only collected, unfinished ones continue with ``--resume``).  ``--jobs`` runs that many
pipelines at once, each with ``--threads`` torch threads (on 2 cores, two 1-thread jobs finish
sooner than one 2-thread job after another).  Latencies are re-measured after all runs, one model
at a time on a quiet machine (``--wait-load``), because the pipelines' own were taken while the
other job was running.

    python -m benchmarks.fmnist_methods --epochs 4 --finetune-epochs 2 --jobs 2 --threads 1

The variational pruner on the same budget, one lam per result file (``--extra`` goes to the run):

    python -m benchmarks.fmnist_methods --methods variational --extra "--lam 0.5" \
        --runs runs/fmnist-variational-0.5 --out benchmarks/results/fmnist_variational_lam05_cpu
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import _common

METHODS = ("spr", "dense", "bigm", "l1-filter", "slimming", "variational")


def command(method: str, args, mac_target: float | None = None) -> list[str]:
    """The ``python -m nn train`` argv of one run."""
    epochs = args.epochs + (args.finetune_epochs if method == "dense" else 0)
    argv = [sys.executable, "-m", "nn", "train", "--method", method, "--model", args.model,
            "--data", "fashion-mnist", "--epochs", str(epochs),
            "--finetune-epochs", str(0 if method == "dense" else args.finetune_epochs),
            "--threads", str(args.threads), "--seed", str(args.seed), "--no-progress",
            "--out", str(Path(args.runs) / method)]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if mac_target is not None:
        argv += ["--mac-target", f"{mac_target:.4f}"]
    return argv + shlex.split(args.extra)


def report_of(out: Path) -> dict | None:
    path = out / "report.json"
    return json.loads(path.read_text()) if path.exists() else None


def run(method: str, argv: list[str]) -> dict:
    """Run (or resume, or just read) one pipeline; its log goes to ``<out>.log`` beside the
    run folder (the pipeline refuses a new folder that holds other files)."""
    out = Path(argv[argv.index("--out") + 1])
    rep = report_of(out)
    if rep is not None:
        print(f"[{method}] done already: {out}/report.json", flush=True)
        return rep
    if (out / "config.json").exists():
        argv = argv + ["--resume"]
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"{out.name}.log"
    print(f"[{method}] {shlex.join(argv)}", flush=True)
    t0 = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=_common.REPO).returncode
    if rc != 0:
        raise SystemExit(f"[{method}] exit status {rc}; see {log_path}")
    print(f"[{method}] finished in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    return report_of(out)


def quiet_latency(out: Path, input_size, batches, repeats: int, wait_load: float) -> dict:
    """Median latency of the saved pruned model, measured alone (nothing else training)."""
    import torch

    from nn.complexity import measure_latency
    from nn.models import load_pruned

    model = load_pruned(out / "pruned.pt")
    res = {}
    for b in batches:
        _common.wait_for_load(wait_load)
        res[b] = measure_latency(model, tuple(input_size), b, "cpu", repeats=repeats)["median_ms"]
    res["threads"] = torch.get_num_threads()
    return res


def row(method: str, rep: dict, argv: list[str], lat: dict) -> dict:
    acc, cx, t = rep["accuracy"], rep["complexity"], rep["timings"]
    return {
        "method": method,
        "test_before_pruning": acc["test_before_pruning"],
        "test_after_pruning": acc["test_after_pruning"],
        "test_final": acc["test_final"],
        "test_reloaded": acc["test_reloaded"],
        "macs": cx["pruned"]["macs"], "params": cx["pruned"]["params"],
        "mac_reduction": cx["mac_reduction"], "param_reduction": cx["param_reduction"],
        "blocks_kept": rep["blocks_kept"], "blocks": len(rep["blocks"]),
        "lat_b1_ms": lat.get(1), "lat_b64_ms": lat.get(64),
        "train_min": t["train"] / 60, "select_min": t.get("select", 0) / 60,
        "finetune_min": t.get("finetune", 0) / 60,
        "command": shlex.join(["python"] + argv[1:]),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["macs"] / 1e6, 100 * r["test_final"], s=40)
        ax.annotate(r["method"], (r["macs"] / 1e6, 100 * r["test_final"]),
                    textcoords="offset points", xytext=(5, 4))
    ax.set_xlabel("MACs of the saved model (M)")
    ax.set_ylabel("test accuracy after fine-tuning (%)")
    ax.set_title("ResNet-20, Fashion-MNIST")
    ax.grid(alpha=0.3)
    _common.write_png(path, fig)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(m for m in METHODS if m != "variational"),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="pipelines run at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per pipeline")
    p.add_argument("--match-macs", action=argparse.BooleanOptionalAction, default=True,
                   help="l1-filter/slimming prune to SPR's MAC fraction")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--extra", default="", help="more options for every run (one string)")
    p.add_argument("--runs", default="runs/fmnist-methods")
    p.add_argument("--latency-repeats", type=int, default=30)
    p.add_argument("--wait-load", type=float, default=1.0)
    p.add_argument("--out", default=None, help="result stem (default results/fmnist_methods_cpu)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        p.error(f"--methods takes a comma-separated subset of {','.join(METHODS)}, got "
                f"{args.methods!r}")
    if args.epochs < 1 or args.finetune_epochs < 0 or args.jobs < 1 or args.threads < 1:
        p.error("--epochs, --jobs and --threads must be >= 1, --finetune-epochs >= 0")

    matched = [m for m in methods if m in ("l1-filter", "slimming") and args.match_macs]
    first = [m for m in methods if m not in matched]
    if matched and "spr" not in methods and report_of(Path(args.runs) / "spr") is None:
        p.error("--match-macs needs the spr run: add spr to --methods or pass --no-match-macs")
    argvs: dict[str, list[str]] = {}
    reports: dict[str, dict] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {}
        for m in first:
            argvs[m] = command(m, args)
            futures[m] = pool.submit(run, m, argvs[m])
        if matched:
            spr = futures["spr"].result() if "spr" in futures else report_of(Path(args.runs) / "spr")
            target = spr["complexity"]["macs_ratio"]
            for m in matched:
                argvs[m] = command(m, args, mac_target=target)
                futures[m] = pool.submit(run, m, argvs[m])
        for m, f in futures.items():
            reports[m] = f.result()

    info = _common.machine_info("cpu")
    rows = []
    for m in methods:
        rep = reports[m]
        lat = quiet_latency(Path(args.runs) / m, rep["data"]["input_size"], (1, 64),
                            args.latency_repeats, args.wait_load)
        rows.append(row(m, rep, argvs[m], lat))
    stem = _common.results_path(args.out, "fmnist_methods_cpu")
    _common.write_json(stem.with_suffix(".json"), {
        "machine": info, "settings": vars(args), "rows": rows,
        "note": "training ran with --jobs pipelines at once (each --threads threads); "
                "latencies re-measured afterwards one model at a time"})
    _common.write_csv(stem.with_suffix(".csv"), rows)
    plot(rows, stem.with_suffix(".png"))
    print(_common.format_machine(info))
    print(_common.table(rows, [
        ("method", "method", ""), ("test_before_pruning", "acc before", ".4f"),
        ("test_after_pruning", "acc pruned", ".4f"), ("test_final", "acc final", ".4f"),
        ("macs", "MACs", ",d"), ("mac_reduction", "-MACs", ".1%"),
        ("params", "params", ",d"), ("blocks_kept", "blocks", "d"),
        ("lat_b1_ms", "b1 ms", ".2f"), ("lat_b64_ms", "b64 ms", ".1f"),
        ("train_min", "train min", ".1f")]))
    for r in rows:
        print(f"{r['method']}: {r['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
