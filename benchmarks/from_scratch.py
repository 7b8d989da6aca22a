"""The architectures pruning runs chose, trained again from a fresh init: is a gap between two
methods in the network they select or in how they train it?

For every run folder that an ``--arch LABEL=GLOB`` matches (a finished ``python -m nn train``
run: its ``config.json``, ``select/masks.pt`` and ``report.json``) and every offset of
``--seed-offsets``: the run's dense model is built as the run built it (its data, model and
width), seeded with the run's seed plus the offset; the run's pruned architecture is cut out of
that fresh copy (``nn.compress`` with the run's masks, so no trained weight survives) and
trained alone with the run's optimiser and schedule for ``--epochs`` (default: the run's
training plus fine-tuning epochs, what the dense baseline of ``benchmarks.pareto`` trains),
then tested, on the CPU.  One process per training, ``--jobs`` at once, ``--threads`` torch
threads each.  Every finished training is kept under ``--work`` (one JSON each, written
atomically), so an interrupted invocation resumes where it stopped.

Printed and written (``<out>.json``, ``<out>.csv``): per training the accuracy from scratch
next to the run's own final accuracy and the MACs of both (they must agree: the same
architecture), and per label the means, spreads and the mean of (scratch - run).  Liu et al.
(ICLR 2019, "Rethinking the value of network pruning") report that the structures of
structured pruning methods, trained from scratch, often match or beat the pruned-and-fine-tuned
networks; here that splits a gap between two methods into architecture and training.

    python -m benchmarks.from_scratch \\
        --arch spr='runs/pareto/t1/seed[0-2]/spr/macs-0.3' \\
        --arch variational='runs/pareto/t1/seed[0-2]/variational/macs-0.3'
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from benchmarks import _common

RUN_FILES = ("config.json", "report.json", "select/masks.pt")


def train_one(run: str, offset: int, epochs: int | None, threads: int) -> dict:
    """One training from scratch of ``run``'s pruned architecture (module docstring)."""
    import torch

    from nn.complexity import count_macs, count_params
    from nn.data.datasets import load_dataset
    from nn.data.loaders import make_loader
    from nn.evaluation import evaluate
    from nn.io import read_json, read_torch
    from nn.models.registry import build_model, compress
    from nn.training.config import TrainConfig
    from nn.training.loop import train
    from nn.training.runtime import seed_all

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    folder = Path(run)
    cfg, report = read_json(folder / "config.json"), read_json(folder / "report.json")
    d, m, o = cfg["data"], cfg["model"], cfg["optim"]
    run_seed = cfg["runtime"]["seed"]
    seed = run_seed + offset
    extra = {"seed": run_seed, **(d["synthetic"] or {})} if d["name"] == "synthetic" else {}
    bundle = load_dataset(d["name"], d["dir"], subset=d["subset"], **extra)
    input_size = (bundle.in_channels, bundle.image_size, bundle.image_size)
    seed_all(seed)
    model = build_model(m["name"], bundle.num_classes, bundle.in_channels, m["width"],
                        m["shortcut"])
    net = compress(model, read_torch(folder / "select" / "masks.pt"))
    n = epochs or o["epochs"] + o["finetune_epochs"]
    config = TrainConfig(epochs=n, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"],
                         weight_decay=o["weight_decay"], schedule=o["schedule"],
                         warmup_epochs=o["warmup_epochs"], batch_size=o["batch_size"],
                         device="cpu", amp="off", seed=seed, progress=False)
    test = make_loader(bundle, "test", o["eval_batch_size"])
    train(net, make_loader(bundle, "train", o["batch_size"], seed=seed), test, config,
          name=f"scratch {folder.name} seed {seed}")
    return {"run": str(folder), "run_seed": run_seed, "offset": offset, "train_seed": seed,
            "epochs": n, "test_acc": evaluate(net, test),
            "run_test_acc": report["accuracy"]["test_final"],
            "macs": count_macs(net, input_size), "run_macs": report["complexity"]["pruned"]["macs"],
            "macs_ratio": report["complexity"]["macs_ratio"], "params": count_params(net),
            "seconds": time.perf_counter() - t0}


def _arch(text: str) -> tuple[str, str]:
    label, sep, pattern = text.partition("=")
    if not sep or not label.strip() or not pattern.strip():
        raise argparse.ArgumentTypeError(f"--arch must be LABEL=GLOB (e.g. "
                                         f"spr='runs/pareto/t1/seed*/spr/macs-0.3'), got {text!r}")
    return label.strip(), pattern.strip()


def _offsets(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"--seed-offsets must be comma-separated integers "
                                         f">= 0, got {text!r}")
    return out


def find_runs(pattern: str) -> tuple[list[str], list[str]]:
    """``(runs, unfinished)``: the folders ``pattern`` matches that hold every file of
    :data:`RUN_FILES`, and those that do not."""
    runs, unfinished = [], []
    for p in sorted(glob.glob(pattern)):
        if Path(p).is_dir():
            (runs if all((Path(p) / f).is_file() for f in RUN_FILES) else unfinished).append(p)
    return runs, unfinished


def _key(run: str, offset: int, epochs: int | None) -> str:
    text = f"{Path(run).resolve()}|{offset}|{epochs}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def summarize(rows: list[dict]) -> list[dict]:
    """Per label: trainings, mean and spread (sample std) of the scratch accuracy, the runs'
    own mean accuracy, and the mean of (scratch - run) over the trainings."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = [r for r in rows if r["label"] == label]
        own = [r["run_test_acc"] for r in {r["run"]: r for r in rs}.values()]
        scratch_mean, scratch_std = _common.mean_std([r["test_acc"] for r in rs])
        run_mean, run_std = _common.mean_std(own)
        out.append({"label": label, "trainings": len(rs), "runs": len(own),
                    "scratch_mean": scratch_mean, "scratch_std": scratch_std,
                    "run_mean": run_mean, "run_std": run_std,
                    "scratch_minus_run": statistics.fmean(r["test_acc"] - r["run_test_acc"]
                                                          for r in rs),
                    "macs_ratio_mean": statistics.fmean(r["macs_ratio"] for r in rs)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=_arch, action="append", required=True,
                   help="LABEL=GLOB: the run folders of one group (repeatable)")
    p.add_argument("--seed-offsets", type=_offsets, default=[0],
                   help="training seeds, as offsets to each run's seed (default 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: each run's training + fine-tuning epochs)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads each (default 1)")
    p.add_argument("--work", default="runs/from-scratch",
                   help="finished trainings, one JSON each (default runs/from-scratch)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for name in ("jobs", "threads", "epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    labels = [label for label, _ in args.arch]
    if len(set(labels)) != len(labels):
        p.error(f"--arch labels must differ, got {', '.join(labels)}")
    todo = []
    for label, pattern in args.arch:
        runs, unfinished = find_runs(pattern)
        if unfinished:
            p.error(f"--arch {label}: {len(unfinished)} folder(s) lack "
                    f"{' / '.join(RUN_FILES)} (not a finished run): {', '.join(unfinished[:3])}")
        if not runs:
            p.error(f"--arch {label}: no run folder matches {pattern!r}")
        todo += [(label, run, off) for run in runs for off in args.seed_offsets]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = _common.machine_info()
    print(_common.format_machine(info), flush=True)

    def cached(run, off):
        path = work / f"{_key(run, off, args.epochs)}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    rows = {}
    pending = []
    for label, run, off in todo:
        hit = cached(run, off)
        if hit is not None:
            rows[(label, run, off)] = hit
        else:
            pending.append((label, run, off))
    print(f"{len(todo)} trainings: {len(todo) - len(pending)} already done, {len(pending)} to "
          f"run, {args.jobs} at once", flush=True)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(train_one, run, off, args.epochs, args.threads): (label, run, off)
                   for label, run, off in pending}
        for fut in as_completed(futures):
            label, run, off = futures[fut]
            row = fut.result()
            _common.write_json(work / f"{_key(run, off, args.epochs)}.json", row)
            rows[(label, run, off)] = row
            print(f"  {label:14s} {run} seed {row['train_seed']}: from scratch "
                  f"{row['test_acc']:.4f}, the run {row['run_test_acc']:.4f} "
                  f"({row['seconds']:.0f} s)", flush=True)
    out_rows = [{"label": label, **rows[(label, run, off)]} for label, run, off in todo]
    bad = [r["run"] for r in out_rows if r["macs"] != r["run_macs"]]
    if bad:  # the masks rebuilt another network than the run saved: nothing here would hold
        print(f"error: rebuilt MACs differ from the runs' for {', '.join(bad)}", file=sys.stderr)
        return 1
    summary = summarize(out_rows)
    print(_common.table(summary, [("label", "arch", ""), ("trainings", "n", "d"),
                                  ("scratch_mean", "scratch", ".4f"),
                                  ("scratch_std", "sd", ".4f"), ("run_mean", "the runs", ".4f"),
                                  ("run_std", "sd", ".4f"),
                                  ("scratch_minus_run", "scratch-run", "+.4f"),
                                  ("macs_ratio_mean", "MACs", ".3f")]))
    stem = _common.results_path(args.out, "from_scratch_cpu")
    _common.write_json(stem.with_suffix(".json"), {
        "machine": info, "arch": dict(args.arch), "seed_offsets": args.seed_offsets,
        "epochs": args.epochs, "threads": args.threads, "jobs": args.jobs,
        "command": "python -m benchmarks.from_scratch " + shlex.join(
            sys.argv[1:] if argv is None else argv),
        "summary": summary, "trainings": out_rows})
    _common.write_csv(stem.with_suffix(".csv"), out_rows)
    print(f"results: {stem}.json, {stem}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
