"""At the same measured latency, which selection keeps more accuracy: a latency budget (blocks
removable, widths in multiples of G) or the MAC-target rule (free filters only)?

For every seed of ``--seeds``, SPR is trained once on Fashion-MNIST at the ``--quick`` budget
(``python -m nn train``); each selection then starts from that same trained network (its
``train/`` stage copied into the selection's run folder, the run resumed with the selection's
options) and is fine-tuned the same way:

* ``latency=F``: ``--budget latency=F --remove-blocks --granularity G`` (the depth searched:
  the exact optimum at every number of removed blocks, the most accurate on the calibration
  images chosen -- the default);
* ``latency=F depth=value``: the same budget, the one optimum of the value model (summed
  scores) -- the selection before the depth search;
* ``mac-target T`` for each T of ``--mac-targets``: ``--select mac-target --mac-target T``.

Runs are resumable (a finished run is read back).  Afterwards every saved model of a seed and
the dense network are timed together (BN folded, interleaved rounds, quiet rounds only:
:func:`nn.latency.measure_networks`) at each batch of ``--batches``; the table gives test
accuracy against measured latency per seed, and the mean and spread over seeds.

    python -m benchmarks.latency_vs_macs                     # 3 seeds, about 20 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
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
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--runs", default="runs/latency-vs-macs")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _argv(out: Path, seed: int, extra: list[str], args) -> list[str]:
    return [sys.executable, "-m", "nn", "train", "--method", "spr", "--model", "resnet20",
            "--data", "fashion-mnist", "--quick", "--finetune-epochs",
            str(args.finetune_epochs), "--threads", str(args.threads), "--seed", str(seed),
            "--no-progress", "--out", str(out), *extra]


def _branch(trained: Path, out: Path, argv: list[str]) -> None:
    """Start ``out`` from ``trained``'s finished training stage: its ``train/`` folder and a
    ``config.json`` of ``argv``'s configuration (the pipeline then resumes at the selection)."""
    from nn.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(argv[3:]))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(trained / "train", out / "train", dirs_exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))


def _run(name: str, seed: int, extra: list[str], trained: Path | None, args):
    out = Path(args.runs) / f"seed{seed}" / name.replace(" ", "-").replace("=", "-")
    argv = _argv(out, seed, extra, args)
    if not (out / "report.json").exists():
        if trained is not None and not (out / "train" / "done.json").exists():
            _branch(trained, out, argv)
        if (out / "config.json").exists():
            argv = argv + ["--resume"]
        print(f"[seed {seed}, {name}] {shlex.join(argv)}", flush=True)
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return out, argv, json.loads((out / "report.json").read_text())


def main(argv=None) -> int:
    args = parse(argv)
    lat = f"latency={args.latency:g}"
    budget = ["--budget", lat, "--granularity", str(args.granularity), "--remove-blocks"]
    runs = {lat: budget, f"{lat} depth=value": budget + ["--depth", "value"]}
    for t in (float(x) for x in args.mac_targets.split(",") if x.strip()):
        runs[f"mac-target {t:g}"] = ["--select", "mac-target", "--mac-target", f"{t:g}"]
    info = _common.machine_info("cpu")
    print(_common.format_machine(info), flush=True)
    torch.set_num_threads(args.threads)
    dense = inference_form(compress(build_model("resnet20", 10, 1), {}))
    rows = []
    for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
        reports, trained = {}, None
        for name, extra in runs.items():
            out, cmd, rep = _run(name, seed, extra, trained, args)
            reports[name] = (cmd, rep)
            trained = trained or out
        nets = [dense] + [inference_form(load_pruned(Path(r["files"]["model"])))
                          for _, r in reports.values()]
        for b in (int(x) for x in args.batches.split(",")):
            ms, res = measure_networks(nets, (1, 28, 28), b, "cpu", "float32", args.threads,
                                       args.repeats, progress=False)
            for (name, (cmd, r)), t in zip(reports.items(), ms[1:]):
                sel = r["selection"]
                rows.append({
                    "seed": seed, "batch": b, "selection": name,
                    "test_acc": r["accuracy"]["test_final"],
                    "test_acc_pruned": r["accuracy"]["test_after_pruning"],
                    "latency_ratio": t / ms[0], "speedup": ms[0] / t,
                    "mac_ratio": r["complexity"]["macs_ratio"],
                    "blocks_kept": r["blocks_kept"],
                    "blocks_removed": len(sel.get("blocks_removed", [])),
                    "dense_ms": ms[0], "pruned_ms": t, "quiet_rounds": res["quiet_rounds"],
                    "rounds": res["rounds"], "command": shlex.join(cmd)})
    summary = []
    for b in sorted({r["batch"] for r in rows}):
        for name in runs:
            sub = [r for r in rows if r["batch"] == b and r["selection"] == name]
            acc, lr = [r["test_acc"] for r in sub], [r["latency_ratio"] for r in sub]
            summary.append({"batch": b, "selection": name, "seeds": len(sub),
                            "test_acc_mean": statistics.fmean(acc),
                            "test_acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                            "latency_ratio_mean": statistics.fmean(lr),
                            "latency_ratio_std": statistics.stdev(lr) if len(lr) > 1 else 0.0,
                            "mac_ratio_mean": statistics.fmean(r["mac_ratio"] for r in sub)})
    print(_common.table(rows, [("seed", "seed", ""), ("batch", "batch", ""),
                               ("selection", "selection", ""), ("test_acc", "test acc", ".4f"),
                               ("test_acc_pruned", "before ft", ".4f"),
                               ("latency_ratio", "latency/dense", ".3f"),
                               ("mac_ratio", "MACs/dense", ".3f"),
                               ("blocks_kept", "blocks", "")]))
    print(_common.table(summary, [("batch", "batch", ""), ("selection", "selection", ""),
                                  ("seeds", "seeds", ""), ("test_acc_mean", "acc mean", ".4f"),
                                  ("test_acc_std", "acc std", ".4f"),
                                  ("latency_ratio_mean", "latency/dense", ".3f"),
                                  ("latency_ratio_std", "std", ".3f"),
                                  ("mac_ratio_mean", "MACs/dense", ".3f")]))
    stem = _common.results_path(args.out, "latency_vs_macs_fmnist_cpu")
    _common.write_json(stem.with_suffix(".json"), {
        "benchmark": "latency_vs_macs", "config": vars(args), "machine": info,
        "summary": summary, "rows": rows})
    _common.write_csv(stem.with_suffix(".csv"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
