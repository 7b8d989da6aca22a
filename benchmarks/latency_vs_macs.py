"""At the same measured latency, which selection keeps more accuracy: a latency budget (blocks
removable, widths in multiples of G) or the MAC-target rule (free filters only)?

Runs ``python -m nn train`` on Fashion-MNIST at the ``--quick`` budget (same training, seed and
threads for every run; only the selection differs): one run with ``--budget latency=F
--remove-blocks --granularity G`` and one per MAC target of ``--mac-targets`` with ``--select
mac-target``.  Runs are resumable (a finished run is read back).  Afterwards every saved model
and the dense network are timed together (BN folded, interleaved rounds, quiet rounds only:
:func:`nn.latency.measure_networks`) at each batch of ``--batches``, so the latencies are
comparable; the table gives test accuracy against measured latency.

    python -m benchmarks.latency_vs_macs
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import _common
from nn import build_model, compress, load_pruned
from nn.latency import inference_form, measure_networks


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency", type=float, default=0.5)
    p.add_argument("--granularity", type=int, default=8)
    p.add_argument("--mac-targets", default="0.25,0.15")
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--runs", default="runs/latency-vs-macs")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _run(name: str, extra: list[str], args) -> tuple[list[str], dict]:
    out = Path(args.runs) / name
    argv = [sys.executable, "-m", "nn", "train", "--method", "spr", "--model", "resnet20",
            "--data", "fashion-mnist", "--quick", "--finetune-epochs",
            str(args.finetune_epochs), "--threads", str(args.threads), "--no-progress",
            "--out", str(out), *extra]
    if not (out / "report.json").exists():
        if (out / "config.json").exists():
            argv.append("--resume")
        print(f"[{name}] {shlex.join(argv)}", flush=True)
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return argv, json.loads((out / "report.json").read_text())


def main(argv=None) -> int:
    args = parse(argv)
    runs = {f"latency={args.latency:g}": ["--budget", f"latency={args.latency:g}",
                                          "--granularity", str(args.granularity),
                                          "--remove-blocks"]}
    for t in (float(x) for x in args.mac_targets.split(",") if x.strip()):
        runs[f"mac-target {t:g}"] = ["--select", "mac-target", "--mac-target", f"{t:g}"]
    reports = {name: _run(name.replace(" ", "-").replace("=", "-"), extra, args)
               for name, extra in runs.items()}
    info = _common.machine_info("cpu")
    torch.set_num_threads(args.threads)
    dense = build_model("resnet20", 10, 1)
    nets = [inference_form(compress(dense, {}))] + [
        inference_form(load_pruned(Path(r["files"]["model"]))) for _, r in reports.values()]
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        ms, res = measure_networks(nets, (1, 28, 28), b, "cpu", "float32", args.threads,
                                   args.repeats, progress=False)
        for (name, (cmd, r)), t in zip(reports.items(), ms[1:]):
            rows.append({"batch": b, "selection": name, "test_acc": r["accuracy"]["test_final"],
                         "latency_ratio": t / ms[0], "speedup": ms[0] / t,
                         "mac_ratio": r["complexity"]["macs_ratio"],
                         "blocks_kept": r["blocks_kept"], "dense_ms": ms[0], "pruned_ms": t,
                         "quiet_rounds": res["quiet_rounds"], "rounds": res["rounds"],
                         "command": shlex.join(cmd)})
    print(_common.format_machine(info))
    print(_common.table(rows, [("batch", "batch", ""), ("selection", "selection", ""),
                               ("test_acc", "test acc", ".4f"),
                               ("latency_ratio", "latency/dense", ".3f"),
                               ("speedup", "speed-up", ".2f"), ("mac_ratio", "MACs/dense", ".3f"),
                               ("blocks_kept", "blocks", "")]))
    stem = _common.results_path(args.out, "latency_vs_macs_fmnist_cpu")
    _common.write_json(stem.with_suffix(".json"), {
        "benchmark": "latency_vs_macs", "config": vars(args), "machine": info, "rows": rows})
    _common.write_csv(stem.with_suffix(".csv"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
